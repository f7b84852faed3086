"""Evaluation of a model on a held-out split: metrics, sample grids, TensorBoard and JSON.

``run`` samples the split at each configured step count with each configured sampler (see
``codi_jax.sampling``), from the same initial noise for every sampler and step count. It reports
PSNR, SSIM and sharpness (gradient energy) against the targets, a multi-scale patch SWD between the
samples and the targets, and FID / LPIPS when their weight files are configured ("not computed"
otherwise), in ``<name>.json`` and TensorBoard, plus a sample grid PNG (condition | one column per
sampler and step count | target). The task's trivial baseline (``TRIVIAL_BASELINES``) is scored
beside them as ``condition``; with ``eval.color_fix``, SR outputs are scored a second time after
the wavelet colour fix (``codi_jax.color_fix``), as ``<sampler>+colorfix``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from codi_jax import color_fix, config_lib, metrics, sharding
from codi_jax.distill import CMLossConfig
from codi_jax.modeling import Student
from codi_jax.sampling import JittedSamplers

Array = jax.Array
# One compilation per shape for every evaluation of a run (eval.every), not one per call of run.
_wavelet_color_fix = jax.jit(color_fix.wavelet_color_fix, static_argnums=2)


# The trivial baseline of each task, scored as ``condition``: the picture its condition already is.
TRIVIAL_BASELINES = {"sr": "bicubic upsampling of the low-resolution input",
                     "inpaint": "the masked input (holes mid-grey)",
                     "edit": "the unedited input"}


def gradient_energy(images: Array) -> Array:
    """Mean squared finite-difference gradient of each image in [0, 1] (B,): a sharpness measure.
    A blurry output has less than the original, a noisy one more."""
    dy = jnp.diff(images, axis=1)
    dx = jnp.diff(images, axis=2)
    return 0.5 * (jnp.mean(dy**2, axis=(1, 2, 3)) + jnp.mean(dx**2, axis=(1, 2, 3)))


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
    FID (``eval.fid_weights``), LPIPS (``eval.lpips_weights``) and DISTS (``eval.dists_weights``),
    each against the held-out targets. Missing weights make a metric ``NotComputed``; its reason
    goes to the report."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.swd = bool(cfg.eval.swd)
        self.inception, lpips, dists = metrics.load_networks(
            cfg.eval.fid_weights, cfg.eval.lpips_weights, cfg.eval.lpips_net, cfg.eval.dists_weights)
        self.paired = {"lpips": lpips, "dists": dists}   # per-image distances to the target
        self._sets: dict[Any, list[np.ndarray]] = {}

    @property
    def not_computed(self) -> dict[str, str]:
        return {name: m.reason for name, m in (("fid", self.inception), *self.paired.items())
                if isinstance(m, metrics.NotComputed)}

    def add(self, key: Any, images: Array, targets: Array, mask: Array) -> dict[str, float]:
        """Collects a batch of ``key``'s images (masked examples dropped); returns the sums of the
        per-image distances (LPIPS, DISTS) that were loaded."""
        out = {}
        for name, metric in self.paired.items():
            if not isinstance(metric, metrics.NotComputed):
                out[name] = float(jnp.sum(mask.astype(jnp.float32) * metric(images, targets)))
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
        writer=None, step: int = 0, name: str = "eval", split: str | None = None,
        samplers: JittedSamplers | None = None) -> dict:
    """Evaluates ``params`` on the held-out ``split`` (default ``data.eval_split``); writes
    ``<name>.json`` and a sample grid ``<name>_samples.png``. Pass the same ``samplers`` to every
    evaluation of one student so they share their compilations."""
    from codi_jax import data as data_lib

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    data_cfg = cfg.data
    if split is not None and split != cfg.data.eval_split:
        data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
        data_cfg.eval_split = split
    dataset = data_lib.make_eval_dataset(data_cfg, global_batch_size=cfg.eval.batch_size)
    max_batches = max(1, -(-cfg.eval.num_examples // cfg.eval.batch_size))
    steps = [int(n) for n in cfg.eval.steps]
    cm = CMLossConfig.from_mapping(cfg.cm.to_dict())
    samplers = samplers or JittedSamplers(student)
    fns = {(s, n): samplers.get(s, config_lib.model_grid(cfg), n, cm)
           for s in cfg.eval.samplers for n in steps}
    metric_fn = jax.jit(_metrics)
    conditional = student.config["adapter"] != "none"  # else: pretraining, no input to show
    # SR outputs are also scored with the wavelet colour fix (low frequencies from the bicubic
    # input, color_fix.py) as "<sampler>+colorfix", beside the raw outputs.
    fix_fn = None
    if cfg.eval.color_fix and conditional and cfg.data.task == "sr":
        levels = color_fix.levels_for_scale(cfg.data.sr.scale)
        fix_fn = lambda images, cond: _wavelet_color_fix(images, cond[..., :3], levels)
    dist = DistributionMetrics(cfg)
    totals: dict[Any, dict[str, float]] = {}
    grid_rows = None
    key = jax.random.PRNGKey(cfg.eval.seed + 1)

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
        local = student.with_prompt(local)
        batch = sharding.global_batch(local, mesh)
        rng = jax.random.fold_in(key, b)  # the same noise for every sampler and step count
        outputs = {}
        for (s, n), fn in fns.items():
            outputs[(s, n)] = fn(params, aux, batch, rng)
            accumulate((s, n), outputs[(s, n)], batch)
            if fix_fn is not None:
                outputs[(f"{s}+colorfix", n)] = fix_fn(outputs[(s, n)], batch["cond"])
                accumulate((f"{s}+colorfix", n), outputs[(f"{s}+colorfix", n)], batch)
        dist.add("target", batch["image"], batch["image"], batch["mask"])
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


def summary_line(results: dict) -> str:
    """``codi 1 step 21.54 dB / 0.546, 4 steps ...; condition 23.38 dB / 0.575``: PSNR / SSIM of
    each sampler and step count, for the console."""
    def score(m):
        return f"{m['psnr']:.2f} dB / {m['ssim']:.3f}"

    parts = [f"{s} " + ", ".join(f"{n} step{'s' * (n != '1')} {score(m)}" for n, m in d.items())
             for s, d in results.get("samplers", {}).items()]
    if "condition" in results:
        parts.append(f"condition {score(results['condition'])}")
    return "; ".join(parts) + f" ({results.get('num_examples', 0)} examples)"


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



def _main(argv: list[str]) -> None:
    """``python -m codi_jax.evaluate``: an exported SR model on a paired test folder (see
    ``codi_jax.paired_eval``)."""
    import sys

    from absl import flags

    from codi_jax import paired_eval

    del argv
    f = flags.FLAGS
    for name in ("model", "dataset", "output"):
        if not getattr(f, name):
            sys.exit(f"evaluate: --{name} is required")
    if not f.dataset.startswith("folder:"):
        sys.exit(f"evaluate: --dataset={f.dataset}: expected folder:<path> (HR/ and LR/ inside)")
    try:
        results = paired_eval.evaluate_folder(f.model, f.dataset[len("folder:"):], f.output,
                                              [int(n) for n in f.steps.split(",") if n], f.seed, f.color_fix,
                                              f.tile, f.overlap, f.batch, f.degradation,
                                              f.fid_weights, f.lpips_weights, f.lpips_net, f.dists_weights)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"evaluate: {err}")
    print(f"evaluate: {results['num_pictures']} pictures, x{results['protocol']['scale']}; "
          f"bicubic {results['bicubic']['psnr']:.2f} dB / {results['bicubic']['ssim']:.4f} (Y)")
    for n, m in results["steps"].items():
        paired = "".join(f", {k.upper()} {m[k]:.4f}" for k in ("lpips", "dists") if k in m)
        print(f"  {n} step(s): PSNR-Y {m['psnr']:.2f} dB, SSIM-Y {m['ssim']:.4f}; RGB {m['psnr_rgb']:.2f} dB{paired}")
    print(f"evaluate: wrote {os.path.join(f.output, 'eval.json')}, eval.csv, steps_<n>/, psnr_vs_steps.png")


if __name__ == "__main__":
    # The flags exist only when this is the command: the trainer imports this module too.
    from absl import app, flags

    flags.DEFINE_string("model", None, "An export folder, or embedded:<name>.")
    flags.DEFINE_string("dataset", None, "folder:<path> with HR/ and LR/ (matching names), or HR/ alone.")
    flags.DEFINE_string("output", None, "Where eval.json, eval.csv, the pictures and the plot go.")
    flags.DEFINE_string("steps", "1,2,4", "Comma-separated step counts.")
    flags.DEFINE_integer("seed", 0, "The initial noise's seed.")
    flags.DEFINE_bool("color_fix", True, "The wavelet colour fix (low frequencies from the bicubic input).")
    flags.DEFINE_integer("tile", 0, "Tile side in output pixels; 0 = the model's training size.")
    flags.DEFINE_integer("overlap", -1, "Tile overlap in output pixels; -1 = tile / 4.")
    flags.DEFINE_integer("batch", 1, "Tiles per model call.")
    flags.DEFINE_string("degradation", "bicubic", "How LR pictures are made when the folder has HR/ only.")
    flags.DEFINE_string("fid_weights", "", "Inception-v3 weights for FID (see codi_jax/metrics/fid.py); auto: "
                        "fetched and cached (codi_jax/metrics/fetch.py); none: not computed.")
    flags.DEFINE_string("lpips_weights", "", "LPIPS backbone + heads, comma-separated files; auto: fetched; "
                        "none: not computed.")
    flags.DEFINE_string("lpips_net", "alex", "LPIPS backbone: alex or vgg.")
    flags.DEFINE_string("dists_weights", "", "DISTS: VGG16 + alpha/beta, comma-separated files (see "
                        "codi_jax/metrics/dists.py); auto: fetched; none: not computed.")
    app.run(_main)
