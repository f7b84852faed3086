"""Cost of one Flash Diffusion train step, per loss combination, in forward+backwards of the adapted model.

    python benchmarks/flash_step.py [--configs sr] [--teacher_steps 4] [--compile]

The Flash step (``train.make_flash_train_step``) is: the teacher's ``teacher_steps`` solver steps
from z_t (eq. 2, forward only), the student's forward+backward, then with the adversarial term the
frozen teacher encoder and the head on the re-noised student sample (forward+backward through the
student), with DMD one teacher and one student forward at the re-noised point, and with the
adversarial term again the discriminator's own step (a student forward and two encoder passes).
So the expected ratio is about 1 + teacher_steps/3 for the distillation term alone, plus ~1/3 per
extra full forward. Each row is counted on the unoptimised HLO (XLA's ``cost_analysis`` of the
lowered step; ``--compile`` also compiles it), against ``jax.grad`` of the adapted model's output
w.r.t. its trainable params on the same batch (``benchmarks/train_step.py``'s fwd+bwd). XLA counts
a loop body once whatever its trip count, so the teacher's solver scan is counted as one forward:
the ``step`` column adds the other ``teacher_steps − 1`` forwards (one forward's FLOPs, counted
alike, times that) — the ``as lowered`` column is XLA's raw count.

Configs as in ``benchmarks/train_step.py`` (random teacher of the config's architecture, synthetic
batches): ``sr`` is the embedded default (the miniature SD's latent UNet at 64 px crops, batch 16).
Not a test: FLOPs do not depend on the machine; the run takes a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.train_step import _counted, _raw_context_student, _synthetic_batch, make_config  # noqa: E402

COMBINATIONS = {"distil": (0.0, 0.0), "distil+adv": (0.1, 0.0), "distil+dmd": (0.0, 0.1),
                "distil+adv+dmd": (0.1, 0.1)}


def measure(name: str, teacher_steps: int, compile_: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from codi_jax import sharding, train

    mesh = sharding.make_mesh(-1, 1)
    cfg = make_config(name)
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")   # the random teacher's values do not matter
    try:
        s = train.setup(cfg, mesh)
    finally:
        jax.config.update("jax_default_prng_impl", default_impl)
    student = _raw_context_student(s.student)
    batch = _synthetic_batch(cfg, student, mesh, np.random.default_rng(0))
    params = train.combine(s.state["params"], s.frozen)

    data = student.prepare(s.aux, batch, jax.random.PRNGKey(2))
    t = jnp.full((cfg.train.batch_size,), 0.5, jnp.float32)
    model_args = (s.state["params"], s.frozen, data["x"], student.teacher.schedule.model_time(t),
                  data["cond"], data["context"])

    def fwd_bwd(p, frozen, z, model_time, cond, context):
        out = lambda q: jnp.mean(jnp.square(student.model_fn(train.combine(q, frozen), z, model_time, cond, context)))
        return jax.grad(out)(p)

    fb = _counted(jax.jit(fwd_bwd).lower(*model_args), compile_)
    fwd = _counted(jax.jit(lambda p, frozen, z, mt, c, ctx: student.model_fn(
        train.combine(p, frozen), z, mt, c, ctx)).lower(*model_args), compile_=False)[0]
    rows = []
    for combo, (adv, dmd) in COMBINATIONS.items():
        c = make_config(name)
        c.objective = "flash"
        c.flash.teacher_steps, c.flash.adv_weight, c.flash.dmd_weight = teacher_steps, adv, dmd
        copied = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        sf = train.setup(c, mesh, built=(student, copied))
        sf = dataclasses.replace(sf, student=student)
        step = _counted(train.jit_train_step(c, sf, mesh).lower(sf.state, sf.frozen, sf.aux, batch,
                                                                 jax.random.PRNGKey(1)), compile_)
        total = step[0] + (teacher_steps - 1) * fwd
        rows.append({"config": name, "losses": combo, "teacher_steps": teacher_steps,
                     "step_flops_lowered": step[0], "step_flops": total, "fwd_flops": fwd,
                     "fwdbwd_flops": fb[0], "ratio": total / fb[0],
                     "step_flops_compiled": step[1], "fwdbwd_flops_compiled": fb[1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="sr")
    parser.add_argument("--teacher_steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also count the compiled executables")
    args = parser.parse_args()
    print(f"{'config':8} {'losses':16} {'teacher steps':>13} {'as lowered':>11} {'step GFLOP':>11} "
          f"{'fwd+bwd GFLOP':>14} {'ratio':>6}")
    for name in args.configs.split(","):
        for r in measure(name, args.teacher_steps, args.compile):
            print(f"{r['config']:8} {r['losses']:16} {r['teacher_steps']:13d} {r['step_flops_lowered'] / 1e9:11.2f} "
                  f"{r['step_flops'] / 1e9:11.2f} "
                  f"{r['fwdbwd_flops'] / 1e9:14.2f} {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
