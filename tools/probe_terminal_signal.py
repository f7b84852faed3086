"""How much does the signal SD's schedule leaves at t = 1 matter to a distilled model?

SD's ``scaled_linear`` schedule ends at α₁ ≈ 0.068: training at t = 1 sees z₁ = α₁ x + σ₁ ε, which
still holds the image, while sampling starts from pure noise. This probe samples an exported model
at 1 step from both starts — z ~ N(0, I) (what sampling does) and z₁ built with the true image
(what training saw) — with the same noise, and prints PSNR/SSIM of each on the held-out split.
A small gap means the model does not lean on the leaked signal (zero-terminal-SNR rescaling would
remove it by construction).

    python tools/probe_terminal_signal.py --model=<export folder | embedded:<name>> [--num=64]
"""
from __future__ import annotations

import argparse
import json

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import config_lib, diffusion
from codi_jax import data as data_lib
from codi_jax.export import load_exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="sr")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args()

    student, params, aux, grid = load_exported(args.model)
    cfg = config_lib.base_config(args.task).data
    cfg.image_size, cfg.eval_split = args.image_size, args.split
    sched, ptype = student.teacher.schedule, student.teacher.prediction_type

    def one_step(batch, rng, leak):
        data = student.prepare(aux, batch, None)
        eps = jax.random.normal(rng, data["x"].shape)
        z = sched.alpha(1.0) * data["x"] + sched.sigma(1.0) * eps if leak else eps
        model_fn = lambda z, mt: student.model_fn(params, z, mt, data["cond"], data["context"])
        x = diffusion.codi_sample(diffusion.make_denoiser(model_fn, sched, ptype), z, sched, 1, grid)
        return jnp.clip(student.decode(aux, x), -1.0, 1.0)

    fns = {leak: jax.jit(lambda b, r, leak=leak: one_step(b, r, leak)) for leak in (False, True)}
    sums = {k: {"psnr": 0.0, "ssim": 0.0} for k in ("noise", "leaked")}
    count = 0
    for i, batch in enumerate(data_lib.make_eval_dataset(cfg, global_batch_size=16, process_index=0, process_count=1)):
        if count >= args.num:
            break
        keep = batch.pop("mask").astype(bool)
        target = (jnp.asarray(batch["image"]) + 1) / 2
        for name, leak in (("noise", False), ("leaked", True)):
            out = (fns[leak](batch, jax.random.PRNGKey(i)) + 1) / 2
            sums[name]["psnr"] += float(np.sum(np.asarray(pix.psnr(out, target))[keep]))
            sums[name]["ssim"] += float(np.sum(np.asarray(pix.ssim(out, target))[keep]))
        count += int(keep.sum())
    result = {k: {m: v / count for m, v in d.items()} for k, d in sums.items()}
    result.update(alpha_1=float(sched.alpha(1.0)), num_examples=count, model=args.model)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
