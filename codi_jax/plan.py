"""On-paper plan of a Stable Diffusion run: compile the real train step without weights, report
per-device memory, FLOPs per step and a *projected* step time on Cloud TPUs.

    python -m codi_jax.plan --config=configs/sr.py:sd15 --devices=8 --batch_per_device=1
    python -m codi_jax.plan --config=configs/sr.py:sd21,pe --devices=8     # PE-CoDi

The teacher (UNet, VAE, text encoder) is built from the shipped diffusers configs
(``models.get_config``) with ``jax.eval_shape``: only shapes and dtypes exist, so SD needs no
download and almost no host memory. The step is ``train.make_train_step`` — the function the
trainer jits — lowered with ``jax.ShapeDtypeStruct`` inputs carrying the trainer's shardings on a
mesh of ``--devices`` virtual CPU devices, and compiled by XLA.

What the numbers are:

* memory: ``compiled.memory_analysis()`` of the per-device SPMD program (arguments + outputs −
  donated aliases + temporaries). It is the CPU backend's buffer assignment; TPU's fusion and
  layouts differ (usually less temporary memory), so read it as an estimate with a margin.
* FLOPs: ``compiled.cost_analysis()`` of the per-device program, i.e. everything the chip executes
  including the recomputation that remat adds (hardware FLOPs, not "model FLOPs").
* step time: FLOPs per device / (peak bf16 FLOP/s × ``--mfu``). A projection, not a measurement:
  communication, input pipeline and the achieved utilisation are assumptions.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app, flags
from ml_collections import config_flags

# Peak dense bf16 FLOP/s per chip (Google Cloud TPU documentation).
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12}
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95}
# Known pipelines → the shipped model configs (codi_jax/assets/model_configs/<preset>).
_PRESET_OF_REPO = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
                   "runwayml/stable-diffusion-v1-5": "sd15",
                   "stabilityai/stable-diffusion-2-1": "sd21"}
# Prediction types of the public checkpoints (their scheduler configs are not shipped).
_PREDICTION_TYPE = {"sd15": "epsilon", "sd21": "v_prediction"}
GIB = 2**30


@dataclasses.dataclass
class PlanResult:
    """One compiled setting and what it needs."""

    preset: str
    variant: str              # "codi" (full) or "pe-codi"
    devices: int
    data: int
    fsdp: int
    batch_per_device: int
    image_size: int
    dtype: str
    remat: str
    trainable_params: int
    frozen_params: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    flops_per_device: float
    compile_seconds: float
    lower_seconds: float
    mfu: float

    @property
    def peak_bytes(self) -> int:
        """Live bytes per device: inputs and outputs (donated state counted once) plus temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def step_seconds(self, chip: str) -> float:
        return self.flops_per_device / (PEAK_BF16_FLOPS[chip] * self.mfu)

    def images_per_second_per_chip(self, chip: str) -> float:
        return self.batch_per_device / self.step_seconds(chip)

    def fits(self, chip: str) -> bool:
        return self.peak_bytes <= HBM_GIB[chip] * GIB

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak_bytes"] = self.peak_bytes
        d["projection"] = {c: {"step_seconds": self.step_seconds(c),
                               "images_per_second_per_chip": self.images_per_second_per_chip(c),
                               "fits_hbm": self.fits(c)} for c in PEAK_BF16_FLOPS}
        return d


def preset_of(cfg: Any, preset: str = "") -> str:
    """The shipped model configs to use: ``preset`` if given, else from ``model.pretrained``
    ("" for ``model.pretrained=""``: the UNet of ``model.unet_config``, pixel space)."""
    if preset:
        return preset
    name = cfg.model.pretrained
    if not name:
        return ""
    if name in _PRESET_OF_REPO:
        return _PRESET_OF_REPO[name]
    raise ValueError(f"plan: cannot tell the shipped model configs of model.pretrained={name!r}; "
                     f"pass --preset (one of {sorted(set(_PRESET_OF_REPO.values()))})")


def abstract_teacher(cfg: Any, preset: str):
    """A ``modeling.Teacher`` whose parameters are ``jax.ShapeDtypeStruct``s (no weights read).

    Modules are built exactly as ``modeling.load_teacher`` builds them (``models.load`` defaults:
    fp32 VAE and text encoder, fp32 UNet params), so the compiled step is the trainer's.
    """
    import jax

    from codi_jax import diffusion, models
    from codi_jax.modeling import Teacher
    from codi_jax.models.clip import CLIPTextModel
    from codi_jax.models.unet import UNet2DConditionModel
    from codi_jax.models.vae import AutoencoderKL

    key = jax.random.PRNGKey(0)

    def shapes(cls, config):
        module = cls.from_config(config)
        inputs = cls.dummy_inputs(config)
        return module, jax.eval_shape(lambda: module.init(key, *inputs))["params"]

    if not preset:  # a pixel-space UNet from the config (what load_teacher builds for pretrained="")
        unet_config = cfg.model.unet_config.to_dict()
        _, unet_params = shapes(UNet2DConditionModel, unet_config)
        return Teacher(unet_config, unet_params, diffusion.get_schedule(cfg.model.schedule),
                       cfg.model.prediction_type or "v_prediction")
    unet_config = models.get_config("unet", preset)
    _, unet_params = shapes(UNet2DConditionModel, unet_config)
    vae, vae_params = shapes(AutoencoderKL, models.get_config("vae", preset))
    text, text_params = shapes(CLIPTextModel, models.get_config("text_encoder", preset))
    return Teacher(unet_config, unet_params, diffusion.get_schedule(cfg.model.schedule),
                   cfg.model.prediction_type or _PREDICTION_TYPE[preset], root=None,
                   vae=vae, vae_params=vae_params, text_encoder=text, text_params=text_params)


def _count(tree: Any) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def compile_step(cfg: Any, preset: str, batch_per_device: int, mfu: float = 0.4,
                 devices: Optional[list] = None) -> PlanResult:
    """Lowers and compiles the trainer's step for ``cfg`` on a mesh of ``devices`` (all by default)."""
    import jax
    import jax.numpy as jnp

    from codi_jax import sharding, train
    from codi_jax.data.config import cond_channels
    from codi_jax.modeling import adapted_config, make_student
    from codi_jax.models import adapters

    devices = list(jax.devices() if devices is None else devices)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
    batch = batch_per_device * len(devices)
    teacher = abstract_teacher(cfg, preset)
    config = adapted_config(cfg.model, teacher, cond_channels(cfg.data))
    student = make_student(cfg.model, teacher, config)
    params = jax.eval_shape(lambda p: adapters.init_adapted_params(config, p, jax.random.PRNGKey(1)),
                            teacher.unet_params)
    mode = cfg.model.trainable if "adapter" in params else "all"
    trainable, frozen = train.partition(params, adapters.trainable_mask(params, mode))
    aux = student.aux_params()
    if cfg.objective == "codi" and cfg.distill.predictor == "teacher":
        aux["teacher"] = teacher.unet_params
    tx, schedule = train.make_optimizer(cfg.train)
    state = jax.eval_shape(functools.partial(train.initial_state, cfg, tx), trainable)

    def on(tree, sh):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    shard = lambda t: sharding.tree_shardings(t, mesh, min_size=cfg.mesh.min_shard_size)  # noqa: E731
    state_sh, frozen_sh, aux_sh = shard(state), shard(frozen), shard(aux)
    size = cfg.data.image_size
    bsh = sharding.batch_sharding(mesh)
    data = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=bsh),
            "cond": jax.ShapeDtypeStruct((batch, size, size, cond_channels(cfg.data)), jnp.float32, sharding=bsh)}
    if teacher.text_encoder is not None:
        length = models_text_length(preset)
        data["text"] = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=bsh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    step = jax.jit(train.make_train_step(cfg, student, tx, schedule),
                   in_shardings=(state_sh, frozen_sh, aux_sh, bsh, sharding.replicated(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step.lower(on(state, state_sh), on(frozen, frozen_sh), on(aux, aux_sh), data, rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return PlanResult(
        preset=preset or "custom", variant="pe-codi" if mode == "adapter" else "codi", devices=len(devices),
        data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], batch_per_device=batch_per_device,
        image_size=size, dtype=cfg.model.dtype, remat=cfg.model.remat or "off",
        trainable_params=_count(trainable), frozen_params=_count(frozen),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        flops_per_device=float(cost.get("flops", 0.0)), compile_seconds=t2 - t1, lower_seconds=t1 - t0,
        mfu=mfu)


def models_text_length(preset: str) -> int:
    from codi_jax import models

    return int(models.get_config("text_encoder", preset)["max_position_embeddings"])


def report(r: PlanResult) -> str:
    """The human-readable summary of one setting."""
    lines = [
        f"plan: {r.preset} {r.variant}, {r.image_size}px, {r.dtype}, remat={r.remat}",
        f"  mesh data={r.data} x fsdp={r.fsdp} ({r.devices} devices), batch {r.batch_per_device}/device "
        f"= {r.batch_per_device * r.devices} global",
        f"  params: {r.trainable_params / 1e6:,.1f} M trainable, {r.frozen_params / 1e6:,.1f} M frozen "
        "(UNet/adapter; VAE and text encoder not counted)",
        f"  compile: lowering {r.lower_seconds:.1f} s, XLA compile {r.compile_seconds:.1f} s (this host)",
        "  per-device memory (XLA CPU buffer assignment): "
        f"arguments {r.argument_bytes / GIB:.2f} GiB, outputs {r.output_bytes / GIB:.2f} GiB, "
        f"donated {r.alias_bytes / GIB:.2f} GiB, temporaries {r.temp_bytes / GIB:.2f} GiB "
        f"-> peak {r.peak_bytes / GIB:.2f} GiB",
        f"  FLOPs per step: {r.flops_per_device / 1e12:.2f} TFLOP per device, "
        f"{r.flops_per_device * r.devices / 1e12:.1f} TFLOP in total",
        f"  PROJECTION at {r.mfu:.0%} of peak bf16 (not measured; communication and input not modelled):",
    ]
    for chip in PEAK_BF16_FLOPS:
        lines.append(f"    TPU {chip:>3}: {PEAK_BF16_FLOPS[chip] / 1e12:.0f} TFLOP/s peak -> "
                     f"{r.step_seconds(chip):.3f} s/step, {r.images_per_second_per_chip(chip):.2f} images/s per chip; "
                     f"{'fits' if r.fits(chip) else 'does NOT fit'} {HBM_GIB[chip]} GiB HBM")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI

config_flags.DEFINE_config_file("config", None, "A configs/<task>.py file with a Stable Diffusion preset.",
                                lock_config=False)
flags.DEFINE_integer("devices", 8, "Virtual CPU devices to compile for (the mesh size).")
flags.DEFINE_integer("batch_per_device", 1, "Examples per device (the global batch is this x devices).")
flags.DEFINE_float("mfu", 0.4, "Assumed fraction of peak bf16 FLOP/s for the projected step time.")
flags.DEFINE_string("preset", "", "Shipped model configs (sd15 | sd21); default: from model.pretrained.")
flags.DEFINE_string("json", "", "Also append the result as one JSON line to this file.")
flags.DEFINE_bool("fast_compile", True, "Skip LLVM optimisation of the CPU code: the plan never runs it, "
                  "and memory/FLOPs come from the HLO passes, which are unchanged.")
flags.DEFINE_string("sweep", "", "Compile a grid, each setting in a fresh process, e.g. "
                    "'batch=1,4,8;fsdp=1,8,32;remat=nothing_saveable,off' (needs --json).")
flags.DEFINE_string("table", "", "Print the markdown table of a --json file of sweep results and exit.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _host_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def sweep_settings(spec: str) -> list[dict]:
    """'batch=1,4;fsdp=1,8;remat=a,off' → the grid of settings, in the order given (first varies slowest)."""
    axes = []
    for part in filter(None, spec.split(";")):
        key, _, values = part.partition("=")
        if key not in ("batch", "fsdp", "remat") or not values:
            raise ValueError(f"--sweep: bad axis {part!r}; use batch=..;fsdp=..;remat=..")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def run_sweep(argv: list[str], spec: str, out: str) -> None:
    """Each setting compiles in its own process: the device count is fixed per process, and the
    compiler's memory is returned between settings. Settings already in ``out`` are skipped, so an
    interrupted sweep resumes."""
    done = {(r["batch_per_device"], r["fsdp"], r["remat"]) for r in _read_json_lines(out)}
    base = [a for a in argv[1:] if not a.startswith(("--sweep", "--devices", "--batch_per_device",
                                                       "--config.mesh.", "--config.model.remat"))]
    for setting in sweep_settings(spec):
        batch, fsdp, remat = int(setting.get("batch", 1)), int(setting.get("fsdp", 8)), setting.get("remat", "")
        if (batch, fsdp, remat or "off") in done:
            continue
        cmd = [sys.executable, "-m", "codi_jax.plan", *base, f"--devices={fsdp}", f"--batch_per_device={batch}",
               "--config.mesh.data=1", f"--config.mesh.fsdp={fsdp}",
               f"--config.model.remat={'' if remat == 'off' else remat}"]
        print("sweep:", " ".join(cmd[1:]), flush=True)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        rc = subprocess.call(cmd, env=env)
        if rc:
            print(f"sweep: setting {setting} failed (exit {rc})", flush=True)


def _read_json_lines(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(results: list[dict], batches=(1, 4, 8), fsdps=(1, 8, 32),
                   remats=("nothing_saveable", "off")) -> str:
    """Per-device memory, fit on v5e (16 GiB) / v4 (32 GiB) and projected images/s per chip."""
    by = {(r["batch_per_device"], r["fsdp"], r["remat"]): r for r in results}
    rows = ["| remat | batch/device | fsdp | peak GiB/device | fits v5e 16 GiB | fits v4 32 GiB "
            "| TFLOP/step/device | img/s/chip v5e | img/s/chip v4 | img/s/chip v5p | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for remat in remats:
        for b in batches:
            for f in fsdps:
                r = by.get((b, f, remat))
                if r is None:
                    rows.append(f"| {remat} | {b} | {f} | not computed | | | | | | | |")
                    continue
                p = r["projection"]
                yes = lambda c: "yes" if p[c]["fits_hbm"] else "no"  # noqa: E731
                rows.append(f"| {remat} | {b} | {f} | {r['peak_bytes'] / GIB:.1f} | {yes('v5e')} | {yes('v4')} "
                            f"| {r['flops_per_device'] / 1e12:.1f} | "
                            + " | ".join(f"{p[c]['images_per_second_per_chip']:.2f}" for c in ("v5e", "v4", "v5p"))
                            + f" | {r['compile_seconds']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    if FLAGS.table:
        print(markdown_table(_read_json_lines(FLAGS.table)))
        return
    if FLAGS.sweep:
        if not FLAGS.json:
            sys.exit("plan: --sweep needs --json (results are collected there)")
        run_sweep(sys.argv, FLAGS.sweep, FLAGS.json)
        return
    # Virtual devices must be configured before JAX creates its CPU backend.
    flags_env = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags_env:
        flags_env += f" --xla_force_host_platform_device_count={FLAGS.devices}"
    if FLAGS.fast_compile and "xla_backend_optimization_level" not in flags_env:
        flags_env += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = flags_env.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.device_count() < FLAGS.devices:
        sys.exit(f"plan: {jax.device_count()} devices available, --devices={FLAGS.devices} requested "
                 "(XLA_FLAGS already sets a smaller device count)")
    cfg = FLAGS.config
    cfg.train.batch_size = FLAGS.batch_per_device * FLAGS.devices
    result = compile_step(cfg, preset_of(cfg, FLAGS.preset), FLAGS.batch_per_device, FLAGS.mfu,
                          jax.devices()[:FLAGS.devices])
    print(report(result))
    print(f"  host: peak resident memory {_host_peak_rss_gib():.2f} GiB")
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            f.write(json.dumps(dict(result.to_json(), host_peak_rss_gib=_host_peak_rss_gib())) + "\n")


if __name__ == "__main__":
    app.run(main)
