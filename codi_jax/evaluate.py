"""Evaluation, sample grids and export of a distilled model.

``run`` samples the held-out split at each configured step count with each configured sampler
(``SAMPLERS``: CoDi's few-step sampler, DDIM and DPM-Solver++ for teachers, GD's stochastic
sampler, CM's multistep sampler), from the same initial noise for every sampler and step count.
It reports PSNR and SSIM (dm-pix) against the targets, a multi-scale patch SWD between the samples
and the targets, and FID / LPIPS when their weight files are configured ("not computed"
otherwise), in ``eval.json`` and TensorBoard, plus a sample grid PNG (condition | one column per
sampler and step count | target). ``export`` writes the distilled model as a diffusers-layout
pipeline folder; ``load_exported`` reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from PIL import Image
from tqdm import tqdm

from codi_jax import diffusion, metrics, models, sharding
from codi_jax.distill import CMLossConfig, make_cm_denoiser
from codi_jax.modeling import Student, Teacher, load_teacher, make_student
from codi_jax.models.adapters import controlnet_config

Array = jax.Array


SAMPLERS = ("codi", "ddim", "dpmpp", "stochastic", "cm")
# The trivial baseline of each task, scored as ``condition``: the picture its condition already is.
TRIVIAL_BASELINES = {"sr": "bicubic upsampling of the low-resolution input",
                     "inpaint": "the masked input (holes mid-grey)",
                     "edit": "the unedited input"}


def _sampler(name: str, student: Student, grid: int, cm: CMLossConfig) -> Callable:
    """``sample(model_fn, z, num_steps, rng)`` of a registered sampler; ``model_fn(z, model_time)``
    is the conditional model with its condition closed over."""
    schedule, prediction_type = student.teacher.schedule, student.teacher.prediction_type
    train_grid = getattr(schedule, "num_train_timesteps", None)

    def deterministic(run):
        return lambda model_fn, z, n, rng: run(
            diffusion.make_denoiser(model_fn, schedule, prediction_type), z, n, rng)

    samplers = {
        # The distilled model only knows the teacher grid.
        "codi": deterministic(lambda d, z, n, rng: diffusion.codi_sample(d, z, schedule, n, grid)),
        # Teachers and GD students: any step count on their own training grid.
        "ddim": deterministic(lambda d, z, n, rng: diffusion.ddim_sample(
            d, z, schedule, diffusion.timesteps(n, train_grid))),
        "dpmpp": deterministic(lambda d, z, n, rng: diffusion.dpm_solver_pp_2m(
            d, z, schedule, diffusion.timesteps(n, train_grid))),
        # GD's stochastic N-step sampler (Meng et al. §3.3).
        "stochastic": deterministic(lambda d, z, n, rng: diffusion.stochastic_sample(
            d, z, schedule, n, rng, train_grid)),
        # CM students: their boundary-parametrized consistency function, multistep sampling on
        # the CM grid.
        "cm": lambda model_fn, z, n, rng: diffusion.consistency_sample(
            make_cm_denoiser(model_fn, schedule, prediction_type, cm), z, schedule,
            diffusion.timesteps(n, cm.grid), rng),
    }
    if name not in samplers:
        raise ValueError(f"eval.samplers: unknown sampler {name!r}; known: {sorted(samplers)}")
    return samplers[name]


def make_sample_fn(student: Student, sampler: str, grid: int, num_steps: int,
                   cm: CMLossConfig = CMLossConfig()) -> Callable:
    """``sample(params, aux, batch, rng) -> images in [−1, 1]`` (jit it). ``grid`` is the teacher
    grid CoDi distilled on; ``cm`` the CM student's boundary scalings and grid."""
    run = _sampler(sampler, student, grid, cm)

    def sample(params, aux, batch, rng):
        data = student.prepare(aux, batch, None)
        k_init, k_sample = jax.random.split(rng)
        z = jax.random.normal(k_init, data["x"].shape, jnp.float32)
        model_fn = lambda z, t: student.model_fn(params, z, t, data["cond"], data["context"])
        return jnp.clip(student.decode(aux, run(model_fn, z, num_steps, k_sample)), -1.0, 1.0)

    return sample


def gradient_energy(images: Array) -> Array:
    """Mean squared finite-difference gradient of each image in [0, 1] (B,): a sharpness measure.
    A blurry output has less than the original, a noisy one more."""
    dy = jnp.diff(images, axis=1)
    dx = jnp.diff(images, axis=2)
    return 0.5 * (jnp.mean(dy**2, axis=(1, 2, 3)) + jnp.mean(dx**2, axis=(1, 2, 3)))


# The jitted samplers of the last student evaluated, by (sampler, grid, steps, cm): the evaluations
# of one run (every split, EMA and online weights, each eval.every) share one compilation. Only one
# student is kept, so a process that evaluates many models does not keep them all alive.
_SAMPLE_FNS: dict[Any, Any] = {"student": None}


def _jitted_sample_fn(student: Student, sampler: str, grid: int, num_steps: int, cm: CMLossConfig) -> Callable:
    if _SAMPLE_FNS["student"] is not student:
        _SAMPLE_FNS.clear()
        _SAMPLE_FNS["student"] = student
    key = (sampler, grid, num_steps, cm)
    if key not in _SAMPLE_FNS:
        _SAMPLE_FNS[key] = jax.jit(make_sample_fn(student, sampler, grid, num_steps, cm))
    return _SAMPLE_FNS[key]


def _metrics(images: Array, targets: Array, mask: Array) -> dict[str, Array]:
    a, b = (images + 1.0) / 2.0, (targets + 1.0) / 2.0
    w = mask.astype(jnp.float32)
    ga, gb = gradient_energy(a), gradient_energy(b)
    return {"psnr": jnp.sum(w * pix.psnr(a, b)), "ssim": jnp.sum(w * pix.ssim(a, b)),
            # Sharpness: the image's gradient energy, the target's, and their log-ratio (0 = as
            # sharp as the original, < 0 blurrier, > 0 noisier).
            "grad_energy": jnp.sum(w * ga), "grad_energy_target": jnp.sum(w * gb),
            "sharpness_log_ratio": jnp.sum(w * jnp.log(ga / jnp.maximum(gb, 1e-12) + 1e-12)),
            "count": jnp.sum(w)}


def _host(a: Array) -> np.ndarray:
    """A global batch as one host array (gathered across processes)."""
    from jax.experimental import multihost_utils

    a = multihost_utils.process_allgather(a, tiled=True) if jax.process_count() > 1 else a
    return np.asarray(a)


class DistributionMetrics:
    """The metrics that compare sets or need a network: multi-scale SWD (``eval.swd``; no network),
    FID (``eval.fid_weights``) and LPIPS (``eval.lpips_weights``), each against the held-out
    targets. Missing weights make a metric ``NotComputed``; its reason goes to the report."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        from codi_jax.metrics import fid, lpips

        self.swd = bool(cfg.eval.swd)
        self.inception = metrics.load_or_not_computed(fid.load_inception, cfg.eval.fid_weights, "FID")
        self.lpips = metrics.load_or_not_computed(
            lambda p: lpips.load_lpips(p.split(","), net=cfg.eval.lpips_net), cfg.eval.lpips_weights,
            "LPIPS")
        self._sets: dict[Any, list[np.ndarray]] = {}

    @property
    def not_computed(self) -> dict[str, str]:
        return {name: m.reason for name, m in (("fid", self.inception), ("lpips", self.lpips))
                if isinstance(m, metrics.NotComputed)}

    def add(self, key: Any, images: Array, targets: Array, mask: Array) -> dict[str, float]:
        """Collects a batch of ``key``'s images (masked examples dropped); returns LPIPS sums."""
        out = {}
        if not isinstance(self.lpips, metrics.NotComputed):
            out["lpips"] = float(jnp.sum(mask.astype(jnp.float32) * self.lpips(images, targets)))
        if self.swd or not isinstance(self.inception, metrics.NotComputed):
            keep = _host(mask).astype(bool)
            # float16 on the host: SD-sized eval sets stay a few hundred MB.
            self._sets.setdefault(key, []).append(_host(images)[keep].astype(np.float16))
        return out

    def compare(self, key: Any, reference: Any) -> dict[str, float]:
        """SWD / FID of the collected set ``key`` against the collected set ``reference``."""
        from codi_jax.metrics import distribution, fid

        if key not in self._sets:
            return {}
        a, b = np.concatenate(self._sets[key]), np.concatenate(self._sets[reference])
        out = {}
        if self.swd:
            out["swd"] = distribution.multiscale_swd(a, b)["swd"]
        if not isinstance(self.inception, metrics.NotComputed):
            out["fid"] = fid.fid(a, b, self.inception)
        return out


def run(cfg: ml_collections.ConfigDict, student: Student, params: Any, aux: Any, workdir: str, *,
        writer=None, step: int = 0, name: str = "eval", split: str | None = None) -> dict:
    """Evaluates ``params`` on the held-out ``split`` (default ``data.eval_split``); writes
    ``<name>.json`` and a sample grid ``<name>_samples.png``."""
    from codi_jax import data as data_lib

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    data_cfg = cfg.data
    if split is not None and split != cfg.data.eval_split:
        data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
        data_cfg.eval_split = split
    dataset = data_lib.make_eval_dataset(data_cfg, batch_size=cfg.eval.batch_size)
    max_batches = max(1, -(-cfg.eval.num_examples // cfg.eval.batch_size))
    steps = [int(n) for n in cfg.eval.steps]
    cm = CMLossConfig.from_mapping(cfg.cm.to_dict())
    fns = {(s, n): _jitted_sample_fn(student, s, cm.grid if s == "cm" else cfg.distill.grid, n, cm)
           for s in cfg.eval.samplers for n in steps}
    metric_fn = jax.jit(_metrics)
    dist = DistributionMetrics(cfg)
    totals: dict[Any, dict[str, float]] = {}
    grid_rows = None
    key = jax.random.PRNGKey(cfg.seed + 1)

    def accumulate(k, images, batch):
        values = jax.device_get(metric_fn(images, batch["image"], batch["mask"]))
        values.update(dist.add(k, images, batch["image"], batch["mask"]))
        for name, v in values.items():
            totals.setdefault(k, {}).setdefault(name, 0.0)
            totals[k][name] += float(v)

    for b, local in enumerate(tqdm(dataset, total=min(len(dataset), max_batches), desc="eval",
                                   disable=jax.process_index() > 0)):
        if b >= max_batches:
            break
        local = _with_text(local, student, cfg)
        batch = sharding.global_batch(local, mesh)
        rng = jax.random.fold_in(key, b)  # the same noise for every sampler and step count
        outputs = {}
        for (s, n), fn in fns.items():
            outputs[(s, n)] = fn(params, aux, batch, rng)
            accumulate((s, n), outputs[(s, n)], batch)
        dist.add("target", batch["image"], batch["image"], batch["mask"])
        conditional = student.config["adapter"] != "none"  # else: pretraining, no input to show
        if conditional and cfg.data.task in TRIVIAL_BASELINES:
            accumulate("condition", batch["cond"][..., :3], batch)
        if b == 0:
            grid_rows = _grid_columns(batch, outputs, cfg.eval.grid_examples)
            grid_labels = ["input"] + [f"{s} {n}" for s, n in sorted(outputs)] + ["original"]
            if not conditional:
                grid_rows, grid_labels = grid_rows[1:], grid_labels[1:]

    def summary(k):
        t = totals[k]
        return dict({name: v / t["count"] for name, v in t.items() if name != "count"},
                    **dist.compare(k, "target"))

    results = {"step": step, "num_examples": int(next(iter(totals.values()))["count"]), "samplers": {}}
    for s, n in sorted(k for k in totals if k != "condition"):
        results["samplers"].setdefault(s, {})[str(n)] = summary((s, n))
    if "condition" in totals:
        results["condition"] = summary("condition")
    if dist.not_computed:
        results["not_computed"] = dist.not_computed
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, f"{name}.json"), "w") as f:
            json.dump(results, f, indent=2)
        grid = _grid_image(grid_rows, grid_labels)
        Image.fromarray(grid).save(os.path.join(workdir, f"{name}_samples.png"))
        if writer is not None:
            writer.write_images(step, {f"{name}/samples": grid[None]})
            writer.write_scalars(step, {f"{name}/{s}_{n}_{k}": v for s, d in results["samplers"].items()
                                        for n, m in d.items() for k, v in m.items()})
    logging.info("%s at step %d: %s", name, step, json.dumps(results))
    return results


def _grid_columns(batch: dict, outputs: dict, n: int) -> list[np.ndarray]:
    """condition | each (sampler, steps) | target, for the first ``n`` examples."""

    def host(a):
        return _host(a)[:n]

    cond = host(batch["cond"])
    size = batch["image"].shape[1:3]
    cond_rgb = cond[..., :3] if cond.shape[-1] >= 3 else np.repeat(cond[..., :1], 3, -1)
    if cond_rgb.shape[1:3] != tuple(size):
        cond_rgb = np.asarray(jax.image.resize(cond_rgb, (cond_rgb.shape[0],) + tuple(size) + (3,), "nearest"))
    return [cond_rgb] + [host(outputs[k]) for k in sorted(outputs)] + [host(batch["image"])]


GRID_TILE = 192  # minimum side of one sample in the grid, in pixels (nearest-neighbour upscaled)


def _grid_image(columns: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """The columns side by side, each sample upscaled (nearest neighbour, so no pixel is invented)
    to at least ``GRID_TILE`` pixels, under a header row that names each column."""
    from PIL import ImageDraw

    rows = [np.concatenate([col[i] for col in columns], axis=1) for i in range(columns[0].shape[0])]
    img = np.round((np.clip(np.concatenate(rows, axis=0), -1, 1) + 1) * 127.5).astype(np.uint8)
    size = columns[0].shape[1]
    k = max(1, -(-GRID_TILE // size))
    img = np.repeat(np.repeat(img, k, axis=0), k, axis=1)
    header = Image.new("RGB", (img.shape[1], 16), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for j, label in enumerate(labels):
        draw.text((j * size * k + 4, 2), label, fill=(0, 0, 0))
    return np.concatenate([np.asarray(header), img], axis=0)


def _with_text(batch: dict, student: Student, cfg) -> dict:
    from codi_jax.train import _with_prompt

    return _with_prompt(batch, student, cfg)


# ----------------------------------------------------------------------------------------- export


def export(student: Student, params: Any, out_dir: str, cfg: ml_collections.ConfigDict) -> str:
    """Writes a diffusers-layout pipeline folder: the teacher pipeline's other components copied,
    the distilled ``unet/``, the adapter (``controlnet/`` in diffusers format for PE-CoDi,
    ``cond_encoder/`` for full CoDi) and ``codi.json``. Written beside ``out_dir`` and renamed
    into place, so an interrupted export never looks complete."""
    from safetensors.numpy import save_file

    teacher = student.teacher
    out_dir = os.path.abspath(out_dir)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out_dir))
    try:
        if teacher.root:
            for entry in os.listdir(teacher.root):
                src = os.path.join(teacher.root, entry)
                # The teacher's own model card (README.md) does not describe the distilled model.
                if entry not in ("unet", "controlnet", "cond_encoder", "codi.json", "README.md") \
                        and not entry.startswith("."):
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
        params = jax.device_get(params)
        models.save(student.module.unet, params["unet"], os.path.join(tmp, "unet"), "unet",
                    config=teacher.unet_config)
        adapter = student.config["adapter"]
        if adapter == "controlnet":
            models.save(student.module.adapter, params["adapter"], os.path.join(tmp, "controlnet"),
                        "controlnet", config=controlnet_config(student.config))
        elif adapter == "cond_encoder":
            os.makedirs(os.path.join(tmp, "cond_encoder"))
            flat = traverse_util.flatten_dict(params["adapter"], sep="/")
            # ascontiguousarray turns μ's 0-d array into shape (1,): keep the original shape.
            save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in flat.items()},
                      os.path.join(tmp, "cond_encoder", "model.safetensors"))
        if teacher.latent and not os.path.exists(os.path.join(tmp, "vae")):
            # A teacher trained from scratch in a separately trained VAE's space (no pipeline root).
            models.save(teacher.vae, jax.device_get(teacher.vae_params), os.path.join(tmp, "vae"), "vae")
        if not os.path.exists(os.path.join(tmp, "scheduler")):
            os.makedirs(os.path.join(tmp, "scheduler"))
            with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
                json.dump(_scheduler_config(teacher), f, indent=2)
        index_path = os.path.join(tmp, "model_index.json")
        index = json.load(open(index_path)) if os.path.exists(index_path) else {"_class_name": "CoDiPipeline"}
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        if teacher.latent:
            index["vae"] = ["diffusers", "AutoencoderKL"]
        index["scheduler"] = index.get("scheduler", ["diffusers", "DDIMScheduler"])
        if adapter == "controlnet":
            index["controlnet"] = ["diffusers", "ControlNetModel"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "codi.json"), "w") as f:
            json.dump({"adapted_config": {k: v for k, v in student.config.items() if k != "unet"},
                       "prediction_type": teacher.prediction_type, "grid": cfg.distill.grid,
                       "text_layer": student.text_layer}, f, indent=2, default=list)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _scheduler_config(teacher: Teacher) -> dict:
    config = {"_class_name": "DDIMScheduler", "prediction_type": teacher.prediction_type,
              "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True}
    if teacher.schedule.name in ("scaled_linear", "linear"):
        betas = 1.0 - teacher.schedule.alphas_cumprod / np.concatenate([[1.0], teacher.schedule.alphas_cumprod[:-1]])
        # The betas were built in float32; 6 significant digits recover the configured values.
        config.update(beta_schedule=teacher.schedule.name, num_train_timesteps=len(betas),
                      beta_start=float(f"{betas[0]:.6g}"), beta_end=float(f"{betas[-1]:.6g}"))
    return config


def load_exported(path: str, **model_overrides: Any) -> tuple[Student, dict, dict, int]:
    """Reads an ``export`` folder: returns (student, params, aux params, teacher grid).

    ``model_overrides`` set ``cfg.model`` fields such as ``dtype``. The adapter's weights are
    checked against the shapes the adapted config implies before anything is returned.
    """
    if path.startswith("embedded:"):  # a model shipped in codi_jax/assets, e.g. "embedded:demo_codi_sr"
        from codi_jax.config_lib import embedded_path
        path = embedded_path(path.split(":", 1)[1])
    from codi_jax.config_lib import base_config
    from codi_jax.models.adapters import init_adapted_params

    with open(os.path.join(path, "codi.json")) as f:
        meta = json.load(f)
    cfg = base_config()
    cfg.model.pretrained = path
    cfg.model.prediction_type = meta["prediction_type"]
    cfg.model.text_layer = meta.get("text_layer", "last")
    for k, v in model_overrides.items():
        setattr(cfg.model, k, v)
    teacher = load_teacher(cfg, jax.random.PRNGKey(0))
    config = dict(meta["adapted_config"], unet=teacher.unet_config)
    student = make_student(cfg, teacher, config)
    params = {"unet": teacher.unet_params}
    if config["adapter"] == "controlnet":
        _, params["adapter"] = models.load(path, "controlnet")
    elif config["adapter"] == "cond_encoder":
        from safetensors.numpy import load_file

        expected = jax.eval_shape(lambda: init_adapted_params(config, teacher.unet_params, jax.random.PRNGKey(0)))
        flat = load_file(os.path.join(path, "cond_encoder", "model.safetensors"))
        want = traverse_util.flatten_dict(expected["adapter"], sep="/")
        bad = sorted(set(want) ^ set(flat)) + sorted(k for k in set(want) & set(flat)
                                                    if tuple(want[k].shape) != flat[k].shape)
        if bad:
            raise ValueError(f"{path}/cond_encoder does not match codi.json's adapted config: {bad[:10]}")
        # float32 master weights, as models.load gives the other components (files may be float16).
        params["adapter"] = traverse_util.unflatten_dict(
            {k: jnp.asarray(v, want[k].dtype) for k, v in flat.items()}, sep="/")
    return student, params, student.aux_params(), int(meta["grid"])
