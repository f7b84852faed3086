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

from codi_jax import throughput

# The Cloud TPU chips projected onto, as ``jax.Device.device_kind`` names them; their peaks are
# the trainer's MFU table (codi_jax/throughput.py).
_TPU_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5"}
PEAK_BF16_FLOPS = {chip: throughput.peak_flops(kind) for chip, kind in _TPU_KINDS.items()}
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95}
# Known pipelines → the shipped model configs (codi_jax/assets/model_configs/<preset>).
_PRESET_OF_REPO = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
                   "runwayml/stable-diffusion-v1-5": "sd15",
                   "stabilityai/stable-diffusion-2-1": "sd21"}
# Prediction types of the public checkpoints (their scheduler configs are not shipped).
_PREDICTION_TYPE = {"sd15": "epsilon", "sd21": "v_prediction"}
GIB = 2**30
# Printed beside every CPU-compiled figure: what a TPU or GPU allocates differs.
CPU_CAVEAT = ("CPU compiler: no fused attention, fp32 widening, CPU buffer assignment; "
              "not what a TPU or GPU allocates")


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
    compile_seconds: float    # lowering and XLA compilation, this host
    mfu: float
    backend: str              # the platform that compiled it: "cpu" figures are estimates

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


def preset_configs(preset: str) -> dict[str, dict]:
    """The shipped diffusers configs of ``preset``'s UNet, VAE and text encoder."""
    from codi_jax import models

    return {kind: models.get_config(kind, preset) for kind in ("unet", "vae", "text_encoder")}


def random_teacher(cfg: Any, configs: dict[str, dict], prediction_type: str, rng: Any = None):
    """A ``modeling.Teacher`` of the architectures in ``configs`` (``{"unet": …}``, plus ``"vae"`` and
    ``"text_encoder"`` for a latent text-to-image model): with ``rng``, random weights (benchmarks);
    without, ``jax.ShapeDtypeStruct``s only (no memory). Modules are built as ``models.load``
    builds them (fp32 params, fp32 VAE and text encoder), so the compiled step is the trainer's."""
    import jax

    from codi_jax import diffusion
    from codi_jax.modeling import Teacher
    from codi_jax.models.clip import CLIPTextModel
    from codi_jax.models.unet import UNet2DConditionModel
    from codi_jax.models.vae import AutoencoderKL

    def made(cls, config, key):
        module = cls.from_config(config)
        inputs = cls.dummy_inputs(config)
        init = lambda: module.init(key, *inputs)["params"]  # noqa: E731
        return module, (jax.eval_shape(init) if rng is None else jax.jit(init)())

    keys = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, 3)
    _, unet_params = made(UNet2DConditionModel, configs["unet"], keys[0])
    teacher = Teacher(configs["unet"], unet_params, diffusion.get_schedule(cfg.model.schedule), prediction_type)
    if "vae" in configs:
        teacher.vae, teacher.vae_params = made(AutoencoderKL, configs["vae"], keys[1])
    if "text_encoder" in configs:
        teacher.text_encoder, teacher.text_params = made(CLIPTextModel, configs["text_encoder"], keys[2])
    return teacher


def abstract_teacher(cfg: Any, preset: str):
    """The teacher of ``preset`` (``""``: the pixel-space UNet of ``model.unet_config``, what
    ``load_teacher`` builds for ``model.pretrained=""``) as shapes only: no weights read."""
    if not preset:
        return random_teacher(cfg, {"unet": cfg.model.unet_config.to_dict()},
                              cfg.model.prediction_type or "v_prediction")
    return random_teacher(cfg, preset_configs(preset), cfg.model.prediction_type or _PREDICTION_TYPE[preset])


def abstract_student(cfg: Any, teacher: Any) -> tuple[Any, dict]:
    """The adapted student of ``teacher`` and the shapes of its initial params (``build_student``
    without computing anything)."""
    import jax

    from codi_jax.data.config import cond_channels
    from codi_jax.modeling import adapted_config, make_student
    from codi_jax.models import adapters

    config = adapted_config(cfg.model, teacher, cond_channels(cfg.data))
    params = jax.eval_shape(lambda p: adapters.init_adapted_params(config, p, jax.random.PRNGKey(1)),
                            teacher.unet_params)
    return make_student(cfg.model, teacher, config), params


def batch_shapes(cfg: Any, student: Any, global_batch: int) -> dict:
    """The data batch the train step takes (``image``, ``cond`` and, for a teacher that reads text,
    ``text`` token ids) as ``jax.ShapeDtypeStruct``s."""
    import jax
    import jax.numpy as jnp

    from codi_jax.data.config import cond_channels

    size = cfg.data.image_size
    data = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
            "cond": jax.ShapeDtypeStruct((global_batch, size, size, cond_channels(cfg.data)), jnp.float32)}
    encoder = student.teacher.text_encoder
    if encoder is not None:
        data["text"] = jax.ShapeDtypeStruct((global_batch, encoder.max_position_embeddings), jnp.int32)
    return data


def _count(tree: Any) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def compile_step(cfg: Any, preset: str, batch_per_device: int, mfu: float = 0.4,
                 devices: Optional[list] = None) -> PlanResult:
    """Lowers and compiles the trainer's step for ``cfg`` on a mesh of ``devices`` (all by default):
    ``train.abstract_setup`` and ``train.compile_train_step``, the trainer's own code."""
    import jax

    from codi_jax import sharding, train

    devices = list(jax.devices() if devices is None else devices)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
    student, params = abstract_student(cfg, abstract_teacher(cfg, preset))
    parts = train.abstract_setup(cfg, mesh, student, params)
    t0 = time.perf_counter()
    _, cost = train.compile_train_step(cfg, parts, mesh, batch_shapes(cfg, student, batch_per_device * len(devices)))
    seconds = time.perf_counter() - t0
    variant = "pe-codi" if "adapter" in params and cfg.model.trainable == "adapter" else "codi"
    return PlanResult(
        preset=preset or "custom", variant=variant, devices=len(devices),
        data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], batch_per_device=batch_per_device,
        image_size=cfg.data.image_size, dtype=cfg.model.dtype, remat=cfg.model.remat or "off",
        trainable_params=_count(parts.state["params"]), frozen_params=_count(parts.frozen),
        argument_bytes=cost.argument_bytes, output_bytes=cost.output_bytes, alias_bytes=cost.alias_bytes,
        temp_bytes=cost.temp_bytes, generated_code_bytes=cost.generated_code_bytes,
        flops_per_device=cost.flops, compile_seconds=seconds, mfu=mfu, backend=cost.backend)


def report(r: PlanResult) -> str:
    """The human-readable summary of one setting."""
    caveat = f" [{CPU_CAVEAT}]" if r.backend == "cpu" else ""
    lines = [
        f"plan: {r.preset} {r.variant}, {r.image_size}px, {r.dtype}, remat={r.remat}; compiled by XLA:{r.backend.upper()}",
        f"  mesh data={r.data} x fsdp={r.fsdp} ({r.devices} devices), batch {r.batch_per_device}/device "
        f"= {r.batch_per_device * r.devices} global",
        f"  params: {r.trainable_params / 1e6:,.1f} M trainable, {r.frozen_params / 1e6:,.1f} M frozen "
        "(UNet/adapter; the VAE and text encoder are in the memory figures, not here)",
        f"  compile: {r.compile_seconds:.1f} s (lowering and XLA, this host)",
        f"  per-device memory (XLA:{r.backend.upper()} buffer assignment{caveat}): "
        f"arguments {r.argument_bytes / GIB:.2f} GiB, outputs {r.output_bytes / GIB:.2f} GiB, "
        f"donated {r.alias_bytes / GIB:.2f} GiB, temporaries {r.temp_bytes / GIB:.2f} GiB "
        f"-> peak {r.peak_bytes / GIB:.2f} GiB",
        f"  FLOPs per step (XLA:{r.backend.upper()} count): {r.flops_per_device / 1e12:.2f} TFLOP per device, "
        f"{r.flops_per_device * r.devices / 1e12:.1f} TFLOP in total",
        f"  PROJECTION at {r.mfu:.0%} of peak bf16 (not measured; communication and input not modelled):",
    ]
    for chip in PEAK_BF16_FLOPS:
        lines.append(f"    TPU {chip:>3}: {PEAK_BF16_FLOPS[chip] / 1e12:.0f} TFLOP/s peak -> "
                     f"{r.step_seconds(chip):.3f} s/step, {r.images_per_second_per_chip(chip):.2f} images/s per chip; "
                     f"{'fits' if r.fits(chip) else 'does NOT fit'} {HBM_GIB[chip]} GiB HBM"
                     + (" by the CPU estimate" if r.backend == "cpu" else ""))
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
    # Results written before the backend was recorded all came from the CPU compiler.
    backends = sorted({r.get("backend", "cpu") for r in results}) or ["cpu"]
    rows = [f"Compiled by XLA:{'/'.join(b.upper() for b in backends)}"
            + (f" ({CPU_CAVEAT}: the memory figures and fits are estimates)" if "cpu" in backends else ""),
            "",
            "| remat | batch/device | fsdp | peak GiB/device | fits v5e 16 GiB | fits v4 32 GiB "
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
