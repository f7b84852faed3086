"""Where does a super-resolution model's error sit: its mean colours, its other low frequencies, or
its detail?

Samples an exported SR model at 1 step on the held-out crops and scores, against the originals,
PSNR of: the raw output; the output with each crop's mean colour replaced by the bicubic input's
(a DC fix); the wavelet colour fix (every low-frequency band from the input, as the evaluation's
``+colorfix``); the bicubic input itself. Also the contrast gain: the least-squares slope of the
output's mean-free pixels on the original's (1 = full contrast, < 1 = shrunk toward the crop's
mean, as a posterior mean that under-uses its condition is), and the same for bicubic.

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
from codi_jax.export import load_exported


def _gain(out: np.ndarray, target: np.ndarray) -> float:
    a = out - out.mean(axis=(1, 2), keepdims=True)
    b = target - target.mean(axis=(1, 2), keepdims=True)
    return float(np.sum(a * b) / np.sum(b * b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num", type=int, default=128)
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
        x = diffusion.codi_sample(diffusion.make_denoiser(model_fn, sched, ptype), z, sched, 1, grid)
        return jnp.clip(student.decode(aux, x), -1.0, 1.0)

    outs, conds, targets = [], [], []
    for i, batch in enumerate(data_lib.make_eval_dataset(cfg, global_batch_size=16, process_index=0,
                                                         process_count=1)):
        if 16 * i >= args.num:
            break
        keep = batch.pop("mask").astype(bool)
        outs.append(np.asarray(one_step(batch, jax.random.PRNGKey(i)))[keep])
        conds.append(np.asarray(batch["cond"])[..., :3][keep])
        targets.append(np.asarray(batch["image"])[keep])
    out, cond, target = (np.concatenate(a) for a in (outs, conds, targets))
    dc = out - out.mean(axis=(1, 2), keepdims=True) + cond.mean(axis=(1, 2), keepdims=True)
    wavelet = np.asarray(color_fix.wavelet_color_fix(jnp.asarray(out), jnp.asarray(cond), levels))

    def psnr(a):
        return float(np.mean(pix.psnr((jnp.clip(jnp.asarray(a), -1, 1) + 1) / 2, (jnp.asarray(target) + 1) / 2)))

    report = {"examples": len(out), "psnr_raw": psnr(out), "psnr_mean_colour_fixed": psnr(dc),
              "psnr_wavelet_colour_fixed": psnr(wavelet), "psnr_bicubic": psnr(cond),
              "contrast_gain_model": _gain(out, target), "contrast_gain_bicubic": _gain(cond, target),
              "mean_colour_error_model": float(np.mean(np.abs(out.mean(axis=(1, 2)) - target.mean(axis=(1, 2))))),
              "mean_colour_error_bicubic": float(np.mean(np.abs(cond.mean(axis=(1, 2)) - target.mean(axis=(1, 2)))))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
