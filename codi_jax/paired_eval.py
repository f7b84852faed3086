"""A super-resolution model on a paired test set, scored as the SR literature scores it
(``python -m codi_jax.evaluate --model=... --dataset=folder:<path> --steps=1,2,4 --output=...``).

The test set is a folder in the RealSR / DRealSR / DIV2K-val layout: ``HR/`` and ``LR/`` with
matching file names (stems), or ``HR/`` alone, whose LR pictures are then made by the declared
degradation (``bicubic``: an antialiased bicubic downscale by the model's scale, the classic
benchmark). Each HR picture is cropped to a multiple of the scale, as the LR's size × scale
(the StableSR / OSEDiff protocol crops their 512 px patches beforehand; pass those folders).
The whole LR picture is super-resolved (``codi_jax.predict``'s tiling), so any size works.

Scores (``codi_jax.metrics.sr``): PSNR and SSIM on the Y channel with ``scale`` border pixels
cropped, and on RGB (labelled ``_rgb``), per picture and averaged; the bicubic upsampling of the LR
picture is scored beside the model. LPIPS and DISTS (per picture, whole pictures) and FID (the set
of outputs against the HR set, Inception-v3 pool features at 299 px) are computed from the weight
files given (``--lpips_weights``, ``--dists_weights``, ``--fid_weights``; ``codi_jax/metrics``)
and written as not computed, with the reason, without them.

Writes ``eval.json``, ``eval.csv`` (one row per picture and step count), the predicted pictures
(``steps_<n>/<name>.png``) and ``psnr_vs_steps.png`` (PSNR-Y and SSIM-Y against the step count,
bicubic as a line: the layout of the CoDi paper's Fig. 5).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from codi_jax import metrics, predict
from codi_jax.metrics import sr as sr_metrics

def paired_files(root: str) -> list[tuple[str, str | None]]:
    """(HR file, LR file or None) for each picture of ``root/HR``, matched to ``root/LR`` by stem."""
    hr_dir, lr_dir = os.path.join(root, "HR"), os.path.join(root, "LR")
    if not os.path.isdir(hr_dir):
        raise FileNotFoundError(f"--dataset: {root} has no HR/ folder (the layout is HR/ and LR/ with matching names)")
    lr = {}
    if os.path.isdir(lr_dir):
        lr = {os.path.splitext(n)[0]: os.path.join(lr_dir, n) for n in os.listdir(lr_dir)
              if n.lower().endswith(predict.IMAGE_EXTENSIONS)}
    pairs = []
    for name in sorted(os.listdir(hr_dir)):
        if not name.lower().endswith(predict.IMAGE_EXTENSIONS):
            continue
        stem = os.path.splitext(name)[0]
        if lr and stem not in lr:
            raise FileNotFoundError(f"--dataset: {os.path.join(lr_dir, stem)}.* is missing (the pair of HR/{name})")
        pairs.append((os.path.join(hr_dir, name), lr.get(stem)))
    if not pairs:
        raise FileNotFoundError(f"--dataset: no pictures in {hr_dir}")
    return pairs


def _uint8(signed: np.ndarray) -> np.ndarray:
    return np.round((signed + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def _signed(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32)[None] / 127.5 - 1.0


def _scores(out: np.ndarray, hr: np.ndarray, scale: int, networks: dict) -> dict:
    """The SR protocol's scores of the 8-bit ``out`` against ``hr``; LPIPS / DISTS with those of
    ``networks`` (name → metric) that were loaded."""
    scores = {"psnr": sr_metrics.psnr(out, hr, scale), "ssim": sr_metrics.ssim(out, hr, scale),
              "psnr_rgb": sr_metrics.psnr(out, hr, scale, y=False), "ssim_rgb": sr_metrics.ssim(out, hr, scale, y=False)}
    for name, metric in networks.items():
        if not isinstance(metric, metrics.NotComputed):
            scores[name] = float(metric(_signed(out), _signed(hr))[0])
    return scores


def _fid_scores(sets: dict[str, list[np.ndarray]], targets: list[np.ndarray], inception) -> dict:
    """FID of each set of pictures in ``sets`` against ``targets`` (8-bit, any sizes: the
    extractor resizes each to its input size), or why it is not computed. The targets' features
    are extracted once for all sets."""
    from codi_jax.metrics import fid

    if isinstance(inception, metrics.NotComputed):
        return {k: f"not computed: {inception.reason}" for k in sets}
    if len(targets) < 2:
        return {k: "not computed: FID needs at least 2 pictures" for k in sets}
    features = lambda pictures: np.concatenate([inception(_signed(p)) for p in pictures])
    reference = features(targets)
    return {k: fid.fid_from_features(features(v), reference) for k, v in sets.items()}


def evaluate_folder(model: str, root: str, output: str, steps: Sequence[int], seed: int = 0,
                    color_fix: bool = True, tile: int = 0, overlap: int = -1, batch: int = 1,
                    degradation: str = "bicubic", fid_weights: str = "", lpips_weights: str = "",
                    lpips_net: str = "alex", dists_weights: str = "") -> dict:
    """Scores ``model`` on the paired folder ``root`` at each step count; writes into ``output``."""
    import tensorflow as tf

    inception, lpips, dists = metrics.load_networks(fid_weights, lpips_weights, lpips_net, dists_weights)
    networks = {"lpips": lpips, "dists": dists}
    p = predict.load_predictor(model)
    if p.task != "sr":
        raise ValueError(f"--model: the SR protocol needs a super-resolution model; this one's task is {p.task!r}")
    if degradation != "bicubic":
        raise ValueError(f"--degradation: unknown value {degradation!r}; known: ['bicubic']")
    tile = tile or p.image_size
    overlap = tile // 4 if overlap < 0 else overlap
    s = p.scale
    rows, per_step, pictures = [], {n: [] for n in steps}, {n: [] for n in steps}
    bicubic, targets, upsampled = [], [], []
    pairs = paired_files(root)
    for hr_path, lr_path in pairs:
        hr_full = predict.read_rgb01(hr_path)
        if lr_path is None:  # the declared degradation
            side = (hr_full.shape[0] // s, hr_full.shape[1] // s)
            lr = tf.clip_by_value(tf.image.resize(hr_full, side, "bicubic", antialias=True), 0.0, 1.0).numpy()
        else:
            lr = predict.read_rgb01(lr_path)
        h, w = lr.shape[0] * s, lr.shape[1] * s
        if hr_full.shape[0] < h or hr_full.shape[1] < w:
            raise ValueError(f"{hr_path}: {hr_full.shape[1]}x{hr_full.shape[0]} is smaller than its LR "
                             f"picture x{s} ({w}x{h})")
        hr = np.round(hr_full[:h, :w] * 255).astype(np.uint8)
        cond = predict.sr_condition(lr, s)
        name = os.path.splitext(os.path.basename(hr_path))[0]
        base = _scores(_uint8(cond), hr, s, networks)
        bicubic.append(base)
        targets.append(hr)
        upsampled.append(_uint8(cond))
        rows.append({"picture": name, "method": "bicubic", "steps": "", **base})
        for n in steps:
            out = predict.predict(p, cond, n, seed, tile, overlap, batch)
            if color_fix:
                out = predict.color_fixed(out, cond, s)
            pixels = _uint8(out)
            os.makedirs(os.path.join(output, f"steps_{n}"), exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(output, f"steps_{n}", f"{name}.png"))
            score = _scores(pixels, hr, s, networks)
            per_step[n].append(score)
            pictures[n].append(pixels)
            rows.append({"picture": name, "method": "codi" + ("+colorfix" if color_fix else ""), "steps": n, **score})

    def mean(scores):
        return {k: float(np.mean([x[k] for x in scores])) for k in scores[0]}

    results = {"model": model, "dataset": root, "num_pictures": len(bicubic),
               "protocol": {"scale": s, "crop_border": s, "y_channel": "ITU-R BT.601, Y in [16, 235]",
                            "ssim": "Gaussian 11x11, sigma 1.5, valid region", "images": "8-bit",
                            "lr": "LR/ folder" if any(lr for _, lr in pairs) else f"{degradation} x{s}",
                            "color_fix": color_fix, "seed": seed, "tile": tile, "overlap": overlap},
               "steps": {str(n): mean(v) for n, v in per_step.items()}, "bicubic": mean(bicubic),
               "fid": _fid_scores({"bicubic": upsampled, **{str(n): pictures[n] for n in steps}}, targets, inception)}
    for name, metric in networks.items():
        if isinstance(metric, metrics.NotComputed):
            results[name] = f"not computed: {metric.reason}"
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output, "eval.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(results, os.path.join(output, "psnr_vs_steps.png"))
    return results


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(n) for n in results["steps"]]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "psnr", "PSNR-Y (dB)"), (axes[1], "ssim", "SSIM-Y")):
        ax.plot(steps, [results["steps"][str(n)][key] for n in steps], "o-", label="CoDi")
        ax.axhline(results["bicubic"][key], color="gray", ls="--", label="bicubic")
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{os.path.basename(os.path.normpath(results['dataset']))}: {results['num_pictures']} pictures, "
                 f"x{results['protocol']['scale']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
