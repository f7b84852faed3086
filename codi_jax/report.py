"""``docs/results.md`` and its figures, from the reproduction's per-run files alone.

The files are ``<results>/<method>/curve.json`` (seed 0's training curve and the budget read off
it) and ``<results>/<method>/seed<k>.json`` (the final run of training seed k), written by
``codi_jax.experiments``. Statistics: per method, sampler and step count the mean and the sample
standard deviation over training seeds. A claim "a beats b" is judged per metric on the difference
of the means (oriented so that positive favours a) against its standard error
SE = sqrt(s_a²/n_a + s_b²/n_b): it **holds** above 2 SE, **does not hold** below −2 SE, and is
**inconclusive** between. A one-seed side (the ablations) takes the CoDi runs' seed variance as its
own (said in the table). The paper compares by FID and LPIPS; offline the stand-ins are multi-scale
SWD (a distribution distance without a pretrained network; lower is better) and PSNR / SSIM;
FID / LPIPS columns appear when the runs had weight files.
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
from typing import Sequence

METRICS = ("psnr", "ssim", "swd", "lpips", "dists", "fid")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "swd": False, "lpips": False, "dists": False, "fid": False}
CLAIM_METRICS = ("psnr", "swd")
CLAIM_STEPS = 4

# The Table-1 methods and the §5.1 ablations, in the report's order (method names of experiments).
METHODS = ("teacher", "codi", "pe_codi", "lora_codi", "cm", "gd", "flash", "flash_lora", "codi_2x")
ABLATIONS = ("codi", "random_init", "sample_t", "batch64", "sample_t_batch64", "no_cg", "predictor_ddim",
             "predictor_teacher", "consistency_x", "cg_image_l2", "cg_perceptual")

# (claim, a, b, a's steps, b's steps): "a beats b", each at its best sampler.
CLAIMS = (
    ("CoDi@4 beats the fine-tuned teacher@4", "codi", "teacher", 4, 4),
    ("CoDi@4 beats the fine-tuned teacher@50", "codi", "teacher", 4, 50),
    ("CoDi@1 beats the fine-tuned teacher@4", "codi", "teacher", 1, 4),
    ("CoDi beats CM", "codi", "cm", 4, 4),
    ("CoDi beats GD", "codi", "gd", 4, 4),
    ("CoDi beats Flash Diffusion (not a claim of the paper, which predates it)", "codi", "flash", 4, 4),
    ("Control: CoDi with the teacher's steps added beats CM", "codi_2x", "cm", 4, 4),
    ("Control: CoDi with the teacher's steps added beats GD", "codi_2x", "gd", 4, 4),
    ("Control: CoDi with the teacher's steps added beats Flash", "codi_2x", "flash", 4, 4),
    ("CoDi beats PE-CoDi (the paper: PE-CoDi close behind)", "codi", "pe_codi", 4, 4),
    ("CoDi beats LoRA-CoDi (parameter efficiency's cost)", "codi", "lora_codi", 4, 4),
    ("Pretrained init beats random init", "codi", "random_init", 4, 4),
    ("CG beats no CG", "codi", "no_cg", 4, 4),
    ("PREv predictor beats the DDIM-v predictor", "codi", "predictor_ddim", 4, 4),
    ("PREv predictor beats the teacher predictor", "codi", "predictor_teacher", 4, 4),
    ("A single t per batch beats a t per sample, batch 16", "codi", "sample_t", 4, 4),
    ("A single t per batch beats a t per sample, batch 64", "batch64", "sample_t_batch64", 4, 4),
    ("ε-space consistency (the paper) beats x-space (the public code)", "codi", "consistency_x", 4, 4),
    ("Latent-l2 CG beats pixel-l2 CG through the decoder", "codi", "cg_image_l2", 4, 4),
    ("Latent-l2 CG beats perceptual (LPIPS) CG", "codi", "cg_perceptual", 4, 4),
)


# ------------------------------------------------------------------------------------ reading


def load(results: str) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """(final runs by method, sorted by seed; curves by method) from the files under ``results``."""
    runs: dict[str, list[dict]] = {}
    curves: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(results, "*", "*.json"))):
        with open(path) as f:
            record = json.load(f)
        name = os.path.basename(os.path.dirname(path))
        if os.path.basename(path) == "curve.json":
            curves[name] = record
        elif os.path.basename(path).startswith("seed"):
            runs.setdefault(name, []).append(record)
    for records in runs.values():
        records.sort(key=lambda r: r["seed"])
    return runs, curves


def samplers_of(records: Sequence[dict]) -> list[str]:
    """The raw samplers a method was scored with (not their "+colorfix" variants)."""
    return [s for s in records[0]["results"]["samplers"] if "+" not in s]


def stats(records: Sequence[dict], sampler: str, steps: int, metric: str) -> tuple[float, float | None, int] | None:
    """(mean, sample std or None for one seed, n) of ``metric`` over the seeds."""
    values = [r["results"]["samplers"].get(sampler, {}).get(str(steps), {}).get(metric) for r in records]
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def best_sampler(records: Sequence[dict], steps: int) -> str | None:
    """The sampler with the highest mean PSNR at ``steps`` (each method at its best)."""
    scored = [(stats(records, s, steps, "psnr"), -i, s) for i, s in enumerate(samplers_of(records))]
    # Ties (every sampler's 1 step is the same x̂, to rounding): the method's own (first) sampler.
    scored = [(round(st[0], 4), i, s) for st, i, s in scored if st is not None]
    return max(scored)[2] if scored else None


def verdict(diff: float, se: float | None) -> str:
    if se is None or se == 0:
        return "inconclusive (no seed spread)"
    return "holds" if diff > 2 * se else "does not hold" if diff < -2 * se else "inconclusive"


def judge(runs: dict[str, list[dict]], a: str, b: str, a_steps: int, b_steps: int) -> dict | None:
    """Per claim metric: the oriented difference, its SE and the verdict; None if a side is missing."""
    if a not in runs or b not in runs:
        return None
    sa, sb = best_sampler(runs[a], a_steps), best_sampler(runs[b], b_steps)
    if sa is None or sb is None:
        return None
    out = {"samplers": (sa, sb), "n": (len(runs[a]), len(runs[b]))}
    codi = runs.get("codi", [])
    codi_sampler = best_sampler(codi, a_steps) if codi else None
    for m in CLAIM_METRICS:
        ea, eb = stats(runs[a], sa, a_steps, m), stats(runs[b], sb, b_steps, m)
        if ea is None or eb is None:
            continue
        spread = stats(codi, codi_sampler, a_steps, m) if codi_sampler else None
        fallback = spread[1] if spread else None
        sd_a = ea[1] if ea[1] is not None else fallback
        sd_b = eb[1] if eb[1] is not None else fallback
        sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0
        diff = sign * (ea[0] - eb[0])
        se = math.sqrt(sd_a ** 2 / ea[2] + sd_b ** 2 / eb[2]) if sd_a is not None and sd_b is not None else None
        out[m] = {"a": ea[0], "b": eb[0], "diff": diff, "se": se, "verdict": verdict(diff, se),
                  "borrowed": ea[1] is None or eb[1] is None}
    return out


# ------------------------------------------------------------------------------------ writing


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" if metric in ("swd", "lpips", "dists", "ssim") else f"{v:.2f}"


def _mean_std(st: tuple | None, metric: str) -> str:
    if st is None:
        return "—"
    mean, std, n = st
    return _fmt(mean, metric) + (f" ± {_fmt(std, metric)}" if std is not None else "") + ("" if n > 1 else " (1)")


def _label(runs: dict, name: str) -> str:
    return runs[name][0]["label"] if name in runs else name


def _metrics_present(runs: dict) -> list[str]:
    return [m for m in METRICS if any(m in e for rs in runs.values() for r in rs
                                      for d in r["results"]["samplers"].values() for e in d.values())]


def table(runs: dict, names: Sequence[str], steps_filter: set[int] | None = None,
          best_only: bool = False) -> list[str]:
    metrics = _metrics_present(runs)
    out = ["| method | trainable params | train steps | seeds | sampler | steps | "
           + " | ".join(m.upper() for m in metrics) + " |", "|" + "---|" * (6 + len(metrics))]
    for name in names:
        records = runs.get(name)
        if not records:
            continue
        params = records[0]["results"].get("trainable_params")
        steps = sorted({int(k) for s in samplers_of(records) for k in records[0]["results"]["samplers"][s]})
        for n in steps:
            if steps_filter and n not in steps_filter:
                continue
            for sampler in ([best_sampler(records, n)] if best_only else samplers_of(records)):
                if stats(records, sampler, n, "psnr") is None:
                    continue
                out.append(f"| {_label(runs, name)} | {params / 1e6:.2f} M | {records[0]['train_steps']} | "
                           f"{len(records)} | {sampler} | {n} | "
                           + " | ".join(_mean_std(stats(records, sampler, n, m), m) for m in metrics) + " |")
    return out


def plot_steps(runs: dict, names: Sequence[str], path: str, title: str, condition: dict | None) -> bool:
    """Metric vs sampling steps (≤ 8), each method at its best sampler, error bars = seed std
    (Fig. 5's layout). Returns whether anything was plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if n in runs]
    metrics = [m for m in _metrics_present(runs) if m != "fid"]
    if not names or not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 2.8, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in names:
            pts = []
            for n in (1, 2, 4, 8):
                s = best_sampler(runs[name], n)
                st = stats(runs[name], s, n, metric) if s else None
                if st:
                    pts.append((n, st[0], st[1] or 0.0))
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=_label(runs, name))
        if condition and metric in condition:
            ax.axhline(condition[metric], color="gray", linestyle="--", label="bicubic input")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("sampling steps")
        ax.set_title(f"{metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(curves: dict, labels: dict, path: str) -> bool:
    """4-step PSNR (own sampler) against training steps, one line per curve, budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for name, c in curves.items():
        pts = [(p["step"], p["psnr@4"]) for p in c["points"] if "psnr@4" in p]
        if not pts:
            continue
        line, = ax.plot(*zip(*pts), marker=".", label=f"{labels.get(name, name)} ({c['sampler']})")
        ax.plot([c["budget"]], [dict(pts)[c["budget"]]], marker="o", markersize=10, fillstyle="none",
                color=line.get_color())
    ax.set_xlabel("training steps (batch 16 unless the label says)")
    ax.set_ylabel("4-step PSNR, dB")
    ax.set_title("Training curves of seed 0 (circles: the budget read off each)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: str, path: str, *, command: str, commit: str, smoke: bool = False,
          missing: Sequence[str] = (), protocol: str = "") -> str:
    """Writes the report and its figures (``<stem>_curves.png``, ``_methods.png``,
    ``_ablations.png``, each when it has something to show); keeps the hand-written discussion."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runs, curves = load(results)
    stem = os.path.splitext(path)[0]
    base = os.path.basename(stem)
    rel = os.path.relpath(results, os.path.dirname(os.path.abspath(path)))
    condition = next((rs[0]["results"].get("condition") for rs in runs.values()
                      if rs[0]["results"].get("condition")), None)
    labels = {name: _label(runs, name) for name in runs}
    figures = []
    if plot_curves(curves, labels, f"{stem}_curves.png"):
        figures.append("curves")
    for name, names, title in (("methods", METHODS, "Methods (Table 1), each at its best sampler"),
                               ("ablations", ABLATIONS, "CoDi ablations (§5.1)")):
        if plot_steps(runs, names, f"{stem}_{name}.png", title, condition):
            figures.append(name)
    all_runs = [r for rs in runs.values() for r in rs]
    hours = (sum(r["wall_time_s"] for r in all_runs) + sum(c["wall_time_s"] for c in curves.values())) / 3600
    not_computed = next((r["results"]["not_computed"] for r in all_runs if r["results"].get("not_computed")), {})
    setup = all_runs[0]["setup"] if all_runs else None
    lines = [
        "# Results: the paper's comparisons, reproduced at small scale on this code",
        "",
        *(["**SMOKE RUN: a few training steps per method; these numbers check the pipeline and say "
           "nothing about the claims.**", ""] if smoke else []),
        f"- Command: `{command}` (runs what is missing, then rewrites this page from `{results}/`)",
        f"- Commit: `{commit}`; written {datetime.date.today().isoformat()}",
        f"- Finished: {len(all_runs)} final runs and {len(curves)} curves, {hours:.1f} h of wall time "
        "as recorded by each run (on the machine its file names).",
        "- Missing: " + (", ".join(missing) if missing else "nothing") + ".",
    ]
    if setup:
        lines.append(
            f"- Setup: teacher `{setup['teacher']}`, SR ×4 ({setup['degradation']} degradation) on "
            f"{setup['image_size']}×{setup['image_size']} crops of the `{setup['source']}` pictures; "
            f"evaluated on {setup['eval_examples']} crops of the held-out pictures ("
            f"{', '.join(setup['eval_splits'])}), with the same initial noise for every run.")
    if protocol:
        lines.append(f"- Protocol: {protocol}")
    lines += [
        "- Metrics: PSNR / SSIM (dm-pix) against the high-resolution target; SWD = multi-scale sliced "
        "Wasserstein distance between patch distributions of samples and targets (it stands in for "
        "FID). " + ("FID / LPIPS: not computed (" + "; ".join(not_computed.values()) + ")."
                    if not_computed else "FID / LPIPS from the supplied weight files."),
        "- Verdicts: per metric, the difference of the seed means against its standard error; holds "
        "above 2 SE in the paper's direction, does not hold below −2 SE, inconclusive between. A "
        "one-seed side borrows CoDi's seed variance (marked †).",
        "",
        *(f"![{name}]({base}_{name}.png)" for name in figures),
        "",
        "## Budgets (seed 0's curves)",
        "",
        "| method | sampler | 4-step PSNR at each evaluated step | budget |",
        "|---|---|---|---|",
    ]
    for name, c in curves.items():
        pts = ", ".join(f"{p['step']}: {p['psnr@4']:.2f}" for p in c["points"] if "psnr@4" in p)
        rule = "" if c["flattened"] else " (the cap, still rising)"
        lines.append(f"| {labels.get(name, name)} | {c['sampler']} | {pts} | {c['budget']}{rule} |")
    lines += ["", f"## The claims (each side at its best sampler)", "",
              "| claim | samplers | seeds | " + " | ".join(f"{m.upper()}: a vs b, diff ± SE, verdict"
                                                        for m in CLAIM_METRICS) + " |",
              "|---|---|---|" + "---|" * len(CLAIM_METRICS)]
    for text, a, b, na, nb in CLAIMS:
        j = judge(runs, a, b, na, nb)
        if j is None:
            lines.append(f"| {text} | — | — | " + " | ".join("not run" for _ in CLAIM_METRICS) + " |")
            continue
        cells = []
        for m in CLAIM_METRICS:
            e = j.get(m)
            if e is None:
                cells.append("—")
                continue
            se = "?" if e["se"] is None else _fmt(e["se"], m) + ("†" if e["borrowed"] else "")
            cells.append(f"{_fmt(e['a'], m)} vs {_fmt(e['b'], m)}, {e['diff']:+.4g} ± {se}, **{e['verdict']}**")
        lines.append(f"| {text} | {j['samplers'][0]} / {j['samplers'][1]} | {j['n'][0]} / {j['n'][1]} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Table 1 (each method at its best sampler; 1 and 4 steps, the teacher also at 50)", ""]
    lines += table(runs, METHODS, steps_filter={1, 4, 50}, best_only=True)
    if condition:
        lines += ["", "Bicubic-upsampled input: " + ", ".join(
            f"{m.upper()} {_fmt(condition[m], m)}" for m in METRICS if m in condition)]
    lines += ["", "## Every method, sampler and step count (mean ± std over seeds; (1) = one seed)", ""]
    lines += table(runs, METHODS)
    lines += ["", "## Ablations, every sampler and step count", ""]
    lines += table(runs, [n for n in ABLATIONS if n != "codi"])
    samples = [n for n in (*METHODS, *ABLATIONS) if os.path.exists(os.path.join(results, n, "samples.jpg"))]
    if samples:
        lines += ["", "## Samples (seed 0, held-out crops: input, each sampler and step count, original)", ""]
        lines += [f"- [{_label(runs, n)}]({rel}/{n}/samples.jpg)" for n in dict.fromkeys(samples)]
    lines += ["", _discussion(path)]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


DISCUSSION = "## Discussion"


def _discussion(path: str) -> str:
    """The hand-written analysis at the end of an existing report (from its ``## Discussion``
    heading on), kept when the tables are regenerated."""
    if not os.path.exists(path):
        return f"{DISCUSSION}\n\n(not written yet)\n"
    with open(path) as f:
        text = f.read()
    start = text.find(DISCUSSION)
    return text[start:] if start >= 0 else f"{DISCUSSION}\n\n(not written yet)\n"
