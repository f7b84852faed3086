"""Why does a super-resolution model lose PSNR at several steps: does it, at intermediate t, take
the low frequencies from z_t instead of from its condition?

On the held-out crops, for an exported SR model:

* ``single_t``: x̂(z_t, c) at each grid time t with z_t built from the *original's* latent
  (z_t = α_t x + σ_t ε) — what training sees. PSNR of the decoded x̂ raw and wavelet-colour-fixed,
  PSNR of its low band alone (the band the colour fix replaces) against the original's, and the
  MSE of the latent's 2x2-cell means against the original latent's (the low band before the
  decoder). A model that reads its low frequencies from the condition keeps the low band at every
  t; one that reads them from z_t loses it where z_t's low band is noisy. The same with ε's spatial mean
  removed (``noise_mean_free``) separates the noise's mean from its other low frequencies.
* ``from_one_step``: the same, with z_t built from the model's own 1-step x̂ (a smooth posterior-mean
  estimate, not a data point) instead of the original: what the second sampling step sees.
* ``trajectory``: the 4-step sampler, each step's decoded x̂, with the same three numbers — for the
  deterministic sampler, for re-noising with fresh noise, and for re-noising with fresh noise whose
  spatial mean is removed.

    python tools/probe_sr_steps.py --model=<export folder | embedded:<name>> [--num=128] [--steps=4]
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
from codi_jax.diffusion.parametrization import ddim_update
from codi_jax.distill.codi import local_means
from codi_jax.export import load_exported


def _mean_free(e: jax.Array) -> jax.Array:
    return e - e.mean(axis=(1, 2), keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    student, params, aux, grid = load_exported(args.model)
    cfg = config_lib.base_config("sr").data
    sched, ptype = student.teacher.schedule, student.teacher.prediction_type
    levels = color_fix.levels_for_scale(cfg.sr.scale)
    ts = diffusion.timesteps(args.steps, grid)
    probe_ts = sorted({*ts[:-1].tolist(), 0.1}, reverse=True)

    @jax.jit
    def run(batch, rng):
        data = student.prepare(aux, batch, None)
        x0 = data["x"]
        model_fn = lambda zz, mt: student.model_fn(params, zz, mt, data["cond"], data["context"])
        denoise = diffusion.make_denoiser(model_fn, sched, ptype)
        k_eps, k_init, k_renoise = jax.random.split(rng, 3)
        eps = jax.random.normal(k_eps, x0.shape)
        out = {}
        for t in probe_ts:
            for name, e in (("", eps), ("noise_mean_free ", _mean_free(eps))):
                out[f"single_t {name}t={t:.2f}"] = denoise(sched.alpha(t) * x0 + sched.sigma(t) * e, t)[0]
        z_init = jax.random.normal(k_init, x0.shape)
        x_one = denoise(z_init, 1.0)[0]
        for t in probe_ts[1:]:
            out[f"from_one_step t={t:.2f}"] = denoise(sched.alpha(t) * x_one + sched.sigma(t) * eps, t)[0]
        keys = jax.random.split(k_renoise, len(ts))
        for mode in ("deterministic", "renoise", "renoise_mean_free"):
            z = z_init
            for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
                x_hat, eps_hat = denoise(z, t)
                out[f"trajectory {mode} step {i + 1} (t={t:.2f})"] = x_hat
                if mode != "deterministic":
                    eps_hat = jax.random.normal(keys[i], z.shape)
                    if mode == "renoise_mean_free":
                        eps_hat = _mean_free(eps_hat)
                z = ddim_update(x_hat, eps_hat, sched.alpha(s), sched.sigma(s))
        latent_err = {k: jnp.mean((local_means(v, 2) - local_means(x0, 2)) ** 2, axis=(1, 2, 3))
                      for k, v in out.items()}
        return {k: jnp.clip(student.decode(aux, v), -1.0, 1.0) for k, v in out.items()}, latent_err

    outs, latent_errs, conds, targets = {}, {}, [], []
    for i, batch in enumerate(data_lib.make_eval_dataset(cfg, global_batch_size=16, process_index=0,
                                                         process_count=1)):
        if 16 * i >= args.num:
            break
        keep = batch.pop("mask").astype(bool)
        images, latent_err = run(batch, jax.random.PRNGKey(i))
        for k, v in images.items():
            outs.setdefault(k, []).append(np.asarray(v)[keep])
            latent_errs.setdefault(k, []).append(np.asarray(latent_err[k])[keep])
        conds.append(np.asarray(batch["cond"])[..., :3][keep])
        targets.append(np.asarray(batch["image"])[keep])
    cond, target = jnp.asarray(np.concatenate(conds)), jnp.asarray(np.concatenate(targets))
    target_low = color_fix.low_pass(target, levels)

    def psnr(a, b):
        return round(float(jnp.mean(pix.psnr((jnp.clip(a, -1, 1) + 1) / 2, (b + 1) / 2))), 2)

    report = {"examples": int(target.shape[0]), "times": [float(t) for t in ts],
              "bicubic": {"raw": psnr(cond, target), "low_band": psnr(color_fix.low_pass(cond, levels), target_low)}}
    for k, v in outs.items():
        img = jnp.asarray(np.concatenate(v))
        report[k] = {"raw": psnr(img, target),
                     "colour_fixed": psnr(color_fix.wavelet_color_fix(img, cond, levels), target),
                     "low_band": psnr(color_fix.low_pass(img, levels), target_low),
                     "latent_low_band_mse": round(float(np.mean(np.concatenate(latent_errs[k]))), 4)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
