"""Where does a super-resolution model's error sit: its mean colours, its other low frequencies, or
its detail?

Samples an exported SR model at 1 step on the held-out crops and scores, against the originals,
PSNR of: the raw output; the output with each crop's mean colour replaced by the bicubic input's
(a DC fix); the wavelet colour fix (every low-frequency band from the input, as the evaluation's
``+colorfix``); the bicubic input itself. Also the contrast gain: the least-squares slope of the
output's mean-free pixels on the original's (1 = full contrast, < 1 = shrunk toward the crop's
mean, as a posterior mean that under-uses its condition is), and the same for bicubic.

Then where the mean-colour error comes from, per held-out picture (the crops interleave the
pictures, see ``data/embedded.py``): each crop's mean-colour error (bias and rms over the crops)
of the output and of bicubic; the same output sampled from noise whose spatial mean is removed
(SD's schedule leaves signal at t = 1, so a model can read the noise's mean as colour); and the
autoencoder alone: the original's own latent, Gaussian-blurred by ``--blur`` latent pixels (a
smooth latent like the 1-step posterior-mean estimate; each σ's latent MSE to the model's 1-step
latent is printed beside it), decoded. A decoder that shifts the colours of smooth latents shows here with no
model involved.

    python tools/probe_sr_error_bands.py --model=<export folder | embedded:<name>> [--num=128]
"""
from __future__ import annotations

import argparse
import json

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import color_fix, config_lib, diffusion
from codi_jax import data as data_lib
from codi_jax.data.embedded import HELD_OUT_IMAGES
from codi_jax.export import load_exported


def _gain(out: np.ndarray, target: np.ndarray) -> float:
    a = out - out.mean(axis=(1, 2), keepdims=True)
    b = target - target.mean(axis=(1, 2), keepdims=True)
    return float(np.sum(a * b) / np.sum(b * b))


def blur(z: np.ndarray, sigma: float, radius: int = 4) -> np.ndarray:
    """(B, h, w, C) latents through a separable Gaussian of ``sigma`` latent pixels (edges replicated)."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(z, pad, mode="edge")
        z = sum(k[i] * np.take(p, np.arange(i, i + z.shape[axis]), axis=axis) for i in range(2 * radius + 1))
    return z


def colour_error(images: np.ndarray, target: np.ndarray) -> dict:
    """Each crop's mean-colour error: its mean over the crops per channel (bias) and its rms."""
    e = images.mean(axis=(1, 2)) - target.mean(axis=(1, 2))
    return {"bias_rgb": [round(float(v), 4) for v in e.mean(axis=0)], "rms": round(float(np.sqrt(np.mean(e**2))), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--blur", default="0.7,1.0,1.5", help="latent blur sigmas (latent pixels)")
    args = parser.parse_args()

    student, params, aux, grid = load_exported(args.model)
    cfg = config_lib.base_config("sr").data
    sched, ptype = student.teacher.schedule, student.teacher.prediction_type
    levels = color_fix.levels_for_scale(cfg.sr.scale)

    @jax.jit
    def one_step(batch, rng):
        data = student.prepare(aux, batch, None)
        z = jax.random.normal(rng, data["x"].shape)
        model_fn = lambda zz, mt: student.model_fn(params, zz, mt, data["cond"], data["context"])
        sample = lambda z0: diffusion.codi_sample(diffusion.make_denoiser(model_fn, sched, ptype), z0, sched, 1, grid)
        x, x_mean_free = sample(z), sample(z - z.mean(axis=(1, 2), keepdims=True))
        return to_images(x), to_images(x_mean_free), x, data["x"]

    def to_images(latents):
        return jnp.clip(student.decode(aux, latents), -1.0, 1.0)

    outs, mean_free, latents, true_latents, conds, targets = [], [], [], [], [], []
    for i, batch in enumerate(data_lib.make_eval_dataset(cfg, global_batch_size=16, process_index=0,
                                                         process_count=1)):
        if 16 * i >= args.num:
            break
        keep = batch.pop("mask").astype(bool)
        o, o_mean_free, x_hat, x = (np.asarray(a)[keep] for a in one_step(batch, jax.random.PRNGKey(i)))
        outs.append(o), mean_free.append(o_mean_free), latents.append(x_hat), true_latents.append(x)
        conds.append(np.asarray(batch["cond"])[..., :3][keep])
        targets.append(np.asarray(batch["image"])[keep])
    out, out_mean_free, x_hat, x, cond, target = (np.concatenate(a) for a in (
        outs, mean_free, latents, true_latents, conds, targets))
    dc = out - out.mean(axis=(1, 2), keepdims=True) + cond.mean(axis=(1, 2), keepdims=True)
    wavelet = np.asarray(color_fix.wavelet_color_fix(jnp.asarray(out), jnp.asarray(cond), levels))

    def psnr(a, sel=slice(None)):
        return float(np.mean(pix.psnr((jnp.clip(jnp.asarray(a[sel]), -1, 1) + 1) / 2, (jnp.asarray(target[sel]) + 1) / 2)))

    report = {"examples": len(out), "psnr_raw": psnr(out), "psnr_mean_colour_fixed": psnr(dc),
              "psnr_wavelet_colour_fixed": psnr(wavelet), "psnr_bicubic": psnr(cond),
              "contrast_gain_model": _gain(out, target), "contrast_gain_bicubic": _gain(cond, target),
              "mean_colour_error_model": float(np.mean(np.abs(out.mean(axis=(1, 2)) - target.mean(axis=(1, 2))))),
              "mean_colour_error_bicubic": float(np.mean(np.abs(cond.mean(axis=(1, 2)) - target.mean(axis=(1, 2)))))}
    sigmas = [float(v) for v in args.blur.split(",") if v]
    blurred_latents = {sigma: blur(x, sigma) for sigma in sigmas}
    blurred = {sigma: np.asarray(jax.jit(to_images)(jnp.asarray(b))) for sigma, b in blurred_latents.items()}
    report["latent_mse_to_model"] = {"unblurred": float(np.mean((x - x_hat) ** 2)),
                                     **{f"blur {s}": float(np.mean((b - x_hat) ** 2)) for s, b in blurred_latents.items()}}
    report["psnr_noise_mean_free"] = psnr(out_mean_free)
    names = list(HELD_OUT_IMAGES)
    pictures = {}
    for k, name in enumerate(names):
        sel = np.arange(len(out)) % len(names) == k  # the eval split interleaves the pictures
        pictures[name] = {
            "psnr_model": psnr(out, sel), "psnr_bicubic": psnr(cond, sel),
            "colour_model": colour_error(out[sel], target[sel]), "colour_bicubic": colour_error(cond[sel], target[sel]),
            "colour_noise_mean_free": colour_error(out_mean_free[sel], target[sel]),
            **{f"colour_decoded_blur_{s}": colour_error(b[sel], target[sel]) for s, b in blurred.items()}}
    report["pictures"] = pictures
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
