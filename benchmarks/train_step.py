"""Cost of one CoDi train step against one forward+backward of the adapted UNet (FLOPs and time).

    python benchmarks/train_step.py [--steps 2] [--warmup 1] [--configs sr,sd_pe,sd_full]
                                    [--no_teacher | --teacher_time] [--inline]

Algorithm 1 needs one online forward+backward plus one target (EMA) forward, so a step should cost
about 4/3 of a forward+backward (the target forward is ~1/3 of a fwd+bwd when every weight trains);
the goal is a FLOPs ratio <= 1.36. The public reference implementation's step adds a frozen-teacher
forward (``distill.predictor=teacher`` here, 3 evaluations), printed as the comparison row.

Configs (synthetic global batches through ``sharding.global_batch``; no data pipeline, no teacher
asset: ``model.pretrained=""`` random-initialises the teacher of the same architecture):

* ``sr``      the shared embedded settings (``configs/sr.py:base``): the miniature Stable
              Diffusion's latent UNet (random weights) fed 64x64x4 synthetic "latents" as data (no
              VAE; a real run's latents are 16x16x4), batch 16, full CoDi (``cond_encoder``,
              trainable ``all``).
* ``sd_pe``   SD-like small latent UNet: 3 levels, block_out_channels 64/128/128, 2 layers per
              block, CrossAttnDownBlock2D x2 + DownBlock2D (mirrored up), UNetMidBlock2DCrossAttn,
              ``attention_head_dim`` 8 (diffusers' SD meaning: 8 heads), cross_attention_dim 64 fed a
              random text context of 8 tokens; 32x32x4 "latents" fed as pixel-space data (no VAE),
              4-channel condition, batch 4. PE-CoDi (``controlnet`` adapter, trainable ``adapter``).
* ``sd_full`` the same UNet, full CoDi (``cond_encoder``, ``all``).

Columns: compiled FLOPs (XLA ``cost_analysis`` of the compiled executable) of the train step and of
fwd+bwd (``jax.grad`` of mean(out^2) of ``ConditionedUNet.apply`` w.r.t. the trainable params only,
same batch and dtype), their ratio, median wall times over ``--steps`` calls after ``--warmup``
(``block_until_ready``), examples/s of the step, and the peak host RSS of the config's process
(each config runs in its own subprocess unless ``--inline``). The FLOPs breakdown under the table
splits the step into fwd+bwd, one forward of the conditioned model, and the optimizer/EMA tail.
The ``predictor=teacher`` row is counted on the unoptimised HLO unless ``--teacher_time``.

The ratio floor is 1 + fwd/(fwd+bwd): ~4/3 when every weight trains (``sr``, ``sd_full``), higher
for PE-CoDi (``sd_pe``), whose backward skips the frozen UNet's weight gradients and its encoder.

Not a test: times depend on the machine and its load; FLOPs do not. Runtime is dominated by XLA
compiles (setup's random teacher init, step, fwd+bwd): on a 2-core CPU at load ~10 the ``sr`` config
took ~4 min and each SD-like config ~10 min; ``--configs sr`` is the quick check.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONFIGS = ("sr", "sd_pe", "sd_full")
TARGET_RATIO = 1.36

# The SD-like small latent UNet (see the module docstring).
SD_SMALL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
}
CONTEXT_TOKENS = 8


def make_config(name: str, predictor: str = "prev"):
    from codi_jax import config_lib

    if name == "sr":
        c = config_lib.base_config("sr")
    elif name in ("sd_pe", "sd_full"):
        # The inpaint task's condition has 4 channels (the data pipeline itself is not used).
        c = config_lib.base_config("inpaint")
        c.model.unet_config = SD_SMALL_UNET
        c.train.batch_size = 4
        if name == "sd_pe":
            c.model.adapter, c.model.trainable = "controlnet", "adapter"
        else:
            c.model.adapter, c.model.trainable = "cond_encoder", "all"
    else:
        raise ValueError(f"--configs: unknown config {name!r}; known: {list(CONFIGS)}")
    c.model.pretrained = ""  # random teacher of the same architecture: no shipped asset needed
    c.distill.predictor = predictor
    return c


def _interleaved_times(fns: dict, steps: int, warmup: int) -> dict:
    """Median wall time of each zero-argument callable; the calls are interleaved (A B A B ...) so
    that load from other processes on a shared machine hits every measurement alike."""
    import jax

    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _maxrss_mib() -> float:
    # Linux reports KiB, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _synthetic_batch(cfg, student, mesh, rng) -> dict:
    import numpy as np

    from codi_jax import sharding
    from codi_jax.models.unet import UNetArch, has_cross_attention

    unet = student.config["unet"]
    b, size = cfg.train.batch_size, cfg.data.image_size
    batch = {"image": rng.uniform(-1, 1, (b, size, size, unet["in_channels"])).astype(np.float32),
             "cond": rng.uniform(-1, 1, (b, size, size, student.config["cond_channels"])).astype(np.float32)}
    if has_cross_attention(UNetArch.from_config(unet)):
        batch["text"] = rng.standard_normal((b, CONTEXT_TOKENS, unet["cross_attention_dim"])).astype(np.float32)
    return sharding.global_batch(batch, mesh)


def _raw_context_student(student):
    """The student with ``context(aux, tokens) = tokens``: the batch's "text" entry is already the
    (random) encoder hidden states, since a ``pretrained=""`` teacher has no text encoder."""
    from codi_jax.modeling import Student

    class RawContextStudent(Student):
        def context(self, aux, tokens):
            return tokens

    return RawContextStudent(**{f.name: getattr(student, f.name) for f in dataclasses.fields(Student)})


def _with_teacher(s, cfg, mesh):
    """The setup of ``cfg`` (``distill.predictor=teacher``: ``train.parameter_groups`` adds the frozen
    teacher copy) from ``s``'s model and initial params, without a second random teacher init.
    The params are copied: ``s``'s state is donated by its own step."""
    import jax
    import jax.numpy as jnp

    from codi_jax import train

    params = jax.tree.map(lambda x: jnp.array(x, copy=True), train.combine(s.state["params"], s.frozen))
    return train.setup(cfg, mesh, built=(s.student, params))


def _counted(lowered, compile_: bool = True):
    """(lowered FLOPs, compiled FLOPs or nan, compiled or None)."""
    low = _flops_of(lowered.cost_analysis())
    if not compile_:
        return low, float("nan"), None
    compiled = lowered.compile()
    return low, _flops_of(compiled.cost_analysis()), compiled


def _flops_of(cost) -> float:
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0]
    return float((cost or {}).get("flops", float("nan")))


def worker(name: str, steps: int, warmup: int, teacher: bool, teacher_time: bool = False) -> dict:
    """Everything measured for one config (run in a fresh process: the peak RSS is this config's)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from codi_jax import sharding, train
    from codi_jax.distill import ema_update

    t_start = time.perf_counter()
    mesh = sharding.make_mesh(-1, 1)
    cfg = make_config(name)
    # The random teacher init under threefry takes XLA ~1 min to compile here; its values do not
    # matter for cost, so setup draws them with the rbg PRNG. The step itself uses the default PRNG.
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    try:
        s = train.setup(cfg, mesh)
    finally:
        jax.config.update("jax_default_prng_impl", default_impl)
    s = dataclasses.replace(s, student=_raw_context_student(s.student))
    batch = _synthetic_batch(cfg, s.student, mesh, np.random.default_rng(0))
    base_rng = jax.random.PRNGKey(1)
    res = {"config": name, "batch": cfg.train.batch_size, "setup_s": time.perf_counter() - t_start,
           "params_trainable": int(sum(x.size for x in jax.tree.leaves(s.state["params"]))),
           "params_frozen": int(sum(x.size for x in jax.tree.leaves(s.frozen)))}

    # (a) the train step.
    t0 = time.perf_counter()
    step_args = (s.state, s.frozen, s.aux, batch, base_rng)
    res["step_flops_lowered"], res["step_flops"], step = _counted(
        train.jit_train_step(cfg, s, mesh).lower(*step_args))
    res["step_compile_s"] = time.perf_counter() - t0

    # (b) one forward+backward of the adapted UNet, grad w.r.t. the trainable params only.
    student, frozen = s.student, s.frozen
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), s.state["params"])  # the state is donated
    data = student.prepare(s.aux, batch, jax.random.PRNGKey(2))
    t = jnp.full((cfg.train.batch_size,), 10 / cfg.distill.grid, jnp.float32)  # one t per batch, as the step
    model_args = (params, frozen, data["x"], student.teacher.schedule.model_time(t), data["cond"], data["context"])

    def fwd(p, frozen, z, model_time, cond, context):
        return student.model_fn(train.combine(p, frozen), z, model_time, cond, context)

    def fwd_bwd(*args):
        mse = lambda p: jnp.mean(jnp.square(fwd(p, *args[1:]).astype(jnp.float32)))
        return jax.grad(mse)(args[0])

    res["fwdbwd_flops_lowered"], res["fwdbwd_flops"], fb = _counted(jax.jit(fwd_bwd).lower(*model_args))
    # Breakdown (unoptimised-HLO counts, no compile): one forward, and the step's optimizer/EMA tail
    # (a replica of make_train_step's last lines: AdamW with clipping, EMA, finite guard).
    res["fwd_flops_lowered"] = _counted(jax.jit(fwd).lower(*model_args), compile_=False)[0]
    decay = cfg.train.ema_decay

    def tail(state, grads):
        updates, opt_state = s.tx.update(grads, state["opt_state"], state["params"])
        p = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": p, "target": ema_update(state["target"], p, decay),
               "round_teacher": state["round_teacher"],
               "ema": ema_update(state["ema"], p, cfg.train.eval_ema_decay), "opt_state": opt_state}
        grad_norm = optax.global_norm(grads)
        new = jax.tree.map(lambda n, o: jnp.where(jnp.isfinite(grad_norm), n, o), new, state)
        return new, grad_norm, s.schedule(state["step"])

    res["tail_flops_lowered"] = _counted(jax.jit(tail).lower(s.state, params), compile_=False)[0]

    # The reference-structure comparison: predictor=teacher (a third, frozen-teacher evaluation).
    fns = {}
    if teacher:
        cfg_t = make_config(name, "teacher")
        s_t = _with_teacher(s, cfg_t, mesh)
        t0 = time.perf_counter()
        res["teacher_step_flops_lowered"], res["teacher_step_flops"], step_t = _counted(
            train.jit_train_step(cfg_t, s_t, mesh).lower(s_t.state, s_t.frozen, s_t.aux, batch, base_rng),
            compile_=teacher_time)
        res["teacher_compile_s"] = time.perf_counter() - t0
        holder_t = {"state": s_t.state}

        def run_teacher():
            holder_t["state"], metrics = step_t(holder_t["state"], s_t.frozen, s_t.aux, batch, base_rng)
            return metrics

    holder = {"state": s.state}

    def run_step():
        holder["state"], metrics = step(holder["state"], s.frozen, s.aux, batch, base_rng)
        return metrics

    fns = {"step": run_step, "fwdbwd": lambda: fb(*model_args)}
    if teacher and teacher_time:
        fns["teacher_step"] = run_teacher
    t0 = time.perf_counter()
    res.update({k + "_time": v for k, v in _interleaved_times(fns, steps, warmup).items()})
    res["timing_s"] = time.perf_counter() - t0
    res["rss_mib"] = _maxrss_mib()
    return res


def _fmt_flops(x: float) -> str:
    return f"{x / 1e9:.2f}G"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--no_teacher", action="store_true", help="skip the predictor=teacher comparison")
    parser.add_argument("--teacher_time", action="store_true",
                        help="also compile and time the predictor=teacher step (default: FLOPs of its "
                             "unoptimised HLO only, which agree with the compiled count to <1%%)")
    parser.add_argument("--inline", action="store_true", help="run every config in this process (one RSS peak)")
    parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(worker(args._worker, args.steps, args.warmup, not args.no_teacher,
                                            args.teacher_time)))
        return

    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            parser.error(f"--configs: unknown config {n!r}; known: {list(CONFIGS)}")
    import jax

    print("$ python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} (jaxlib {getattr(jax.lib, '__version__', '?')}), platform {dev.platform} "
          f"({dev.device_kind}), {jax.device_count()} device(s), {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f}), python {platform.python_version()}")
    print(f"float32 compute; times: median of {args.steps} interleaved calls after {args.warmup} warm-up\n",
          flush=True)

    results = []
    for n in names:
        t0 = time.perf_counter()
        if args.inline:
            res = worker(n, args.steps, args.warmup, not args.no_teacher, args.teacher_time)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--_worker", n, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + (["--no_teacher"] if args.no_teacher else []) + (
                       ["--teacher_time"] if args.teacher_time else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"config {n}: worker failed (exit {proc.returncode})")
            res = json.loads(lines[-1][len("RESULT "):])
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"  {n}: {res['wall_s']:.0f} s (setup {res['setup_s']:.0f} s, step compile "
              f"{res['step_compile_s']:.0f} s, timing {res['timing_s']:.0f} s)", flush=True)
    print()
    print_table(results, not args.no_teacher)


def print_table(results: list, teacher: bool) -> None:
    cols = [("config", 8), ("batch", 5), ("trainable", 9), ("frozen", 7), ("step FLOPs", 10),
            ("f+b FLOPs", 10), ("FLOPs ratio", 11), ("step ms", 8), ("f+b ms", 8), ("time ratio", 10),
            ("ex/s", 6), ("peak RSS", 9)]

    def row(values):
        return " ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, ((_, w), v) in enumerate(zip(cols, values)))

    head = row([c for c, _ in cols])
    print(head)
    print("-" * len(head))
    for r in results:
        print(row([r["config"], r["batch"], f"{r['params_trainable'] / 1e6:.2f}M",
                   f"{r['params_frozen'] / 1e6:.2f}M", _fmt_flops(r["step_flops"]),
                   _fmt_flops(r["fwdbwd_flops"]), f"{r['step_flops'] / r['fwdbwd_flops']:.3f}",
                   f"{r['step_time'] * 1e3:.0f}", f"{r['fwdbwd_time'] * 1e3:.0f}",
                   f"{r['step_time'] / r['fwdbwd_time']:.3f}", f"{r['batch'] / r['step_time']:.1f}",
                   f"{r['rss_mib']:.0f}MiB"]))
    if teacher:
        print("\npredictor=teacher (the reference step structure: + a frozen-teacher forward, 3 evaluations)")
        for r in results:
            if r.get("teacher_step_time") is not None:
                print(f"{r['config']:8s} step {_fmt_flops(r['teacher_step_flops'])}  FLOPs ratio "
                      f"{r['teacher_step_flops'] / r['fwdbwd_flops']:.3f}  step {r['teacher_step_time'] * 1e3:.0f} ms"
                      f"  time ratio {r['teacher_step_time'] / r['fwdbwd_time']:.3f}"
                      f"  ({r['teacher_step_flops'] / r['step_flops']:.3f}x the prev step's FLOPs)")
            else:  # unoptimised-HLO counts on both sides (--teacher_time for compiled counts and times)
                low, fb = r["teacher_step_flops_lowered"], r["fwdbwd_flops_lowered"]
                print(f"{r['config']:8s} step {_fmt_flops(low)}  FLOPs ratio {low / fb:.3f} (unoptimised HLO; "
                      f"--teacher_time compiles and times it)  ({low / r['step_flops_lowered']:.3f}x the prev "
                      "step's FLOPs)")
    print("\nFLOPs breakdown of the (prev) step, unoptimised-HLO counts (Lowered.cost_analysis), "
          "in units of one fwd+bwd:")
    for r in results:
        fb = r["fwdbwd_flops_lowered"]
        rest = r["step_flops_lowered"] - fb - r["fwd_flops_lowered"] - r["tail_flops_lowered"]
        print(f"{r['config']:8s} fwd+bwd 1 + target fwd {r['fwd_flops_lowered'] / fb:.4f} + AdamW/clip/EMA tail "
              f"{r['tail_flops_lowered'] / fb:.4f} + rest (noise, loss, glue) {rest / fb:+.4f} = "
              f"{r['step_flops_lowered'] / fb:.4f}   (compiled: {r['step_flops'] / r['fwdbwd_flops']:.4f}; "
              f"lowered/compiled step {r['step_flops_lowered'] / r['step_flops']:.3f}, "
              f"f+b {fb / r['fwdbwd_flops']:.3f})")
    print(f"\ngoal: step/fwd+bwd FLOPs ratio <= {TARGET_RATIO} (Algorithm 1's floor ~4/3 when every weight "
          "trains); peak RSS: max RSS of the config's process (setup, both steps, fwd+bwd)")


if __name__ == "__main__":
    main()
