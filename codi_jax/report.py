"""``docs/results.md`` and its Fig.-5-style plots from the reproduction's per-variant summaries.

The paper compares methods by FID (sample quality) and LPIPS (fidelity to the target). Offline we
have neither network, so the stand-ins are multi-scale SWD over image patches (a distribution
distance that needs no pretrained network; lower is better) for FID and PSNR / SSIM for LPIPS
(higher is better). FID / LPIPS columns appear when the run had their weight files. A claim
"holds" when the method is better on both PSNR and SWD, is "mixed" when on one, and "does not
hold" when on neither.
"""

from __future__ import annotations

import datetime
import os
from typing import Any


# (variant, sampler) → line label, for the main comparison (Table 1, Fig. 6).
METHODS = (("teacher", "ddim", "Fine-tuned teacher, DDIM"),
           ("teacher", "dpmpp", "Fine-tuned teacher, DPM-Solver++"),
           ("codi", "codi", "CoDi"),
           ("pe_codi", "codi", "PE-CoDi"),
           ("cm", "cm", "CM"),
           ("gd", "ddim", "GD, deterministic"),
           ("gd", "stochastic", "GD, stochastic"),
           ("flash", "flash", "Flash Diffusion"),
           ("flash_lora", "flash", "Flash Diffusion, LoRA r8"),
           ("lora_codi", "codi", "LoRA-CoDi, r8"),
           ("codi_2x", "codi", "CoDi, 2x steps (the teacher's + CM's)"))
# The §5.1 ablations (Figs. 3, 5), each a CoDi run with one switch changed.
ABLATIONS = (("codi", "codi", "CoDi (pretrained, single t, CG, PREv, latent l2)"),
             ("random_init", "codi", "random init"),
             ("sample_t", "codi", "t per sample"),
             ("no_cg", "codi", "no CG"),
             ("predictor_ddim", "codi", "DDIM-v predictor"),
             ("predictor_teacher", "codi", "teacher predictor"),
             ("cg_perceptual", "codi", "perceptual CG"),
             ("codi_seed1", "codi", "CoDi, training seed 1 (the seed spread)"))
METRICS = ("psnr", "ssim", "swd", "lpips", "dists", "fid")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "swd": False, "lpips": False, "dists": False, "fid": False}
CLAIM_STEPS = 4


def _entry(summaries: dict, variant: str, sampler: str, steps: int) -> dict | None:
    s = summaries.get(variant)
    if s is None:
        return None
    return s["results"].get("samplers", {}).get(sampler, {}).get(str(steps))


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "—"
    return f"{v:.4f}" if metric in ("swd", "lpips", "dists", "ssim") else f"{v:.2f}"


def compare(a: dict | None, b: dict | None) -> tuple[str, str]:
    """(verdict, numbers) for "a is better than b" on PSNR and SWD."""
    if a is None or b is None:
        return "not run", "one side has no result"
    wins = [(a[m] > b[m]) == HIGHER_IS_BETTER[m] for m in ("psnr", "swd")]
    verdict = {2: "holds", 1: "mixed", 0: "does not hold"}[sum(wins)]
    numbers = ", ".join(f"{m.upper()} {_fmt(a[m], m)} vs {_fmt(b[m], m)}" for m in ("psnr", "ssim", "swd")
                        if m in a and m in b)
    return verdict, numbers


def claims(summaries: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, numbers at 4 steps unless stated) for each of the paper's claims."""
    n = CLAIM_STEPS
    codi = _entry(summaries, "codi", "codi", n)
    rows = []

    def add(text, a, b):
        rows.append((text, *compare(a, b)))

    add("CoDi@4 beats the fine-tuned teacher@4 with DDIM", codi, _entry(summaries, "teacher", "ddim", n))
    add("CoDi@4 beats the fine-tuned teacher@4 with DPM-Solver++", codi,
        _entry(summaries, "teacher", "dpmpp", n))
    add("CoDi@4 beats the fine-tuned teacher@50 (DDIM)", codi, _entry(summaries, "teacher", "ddim", 50))
    add("CoDi@4 beats the fine-tuned teacher@50 (DPM-Solver++)", codi,
        _entry(summaries, "teacher", "dpmpp", 50))
    add("Pretrained init beats random init", codi, _entry(summaries, "random_init", "codi", n))
    add("CG beats no CG", codi, _entry(summaries, "no_cg", "codi", n))
    add("PREv predictor beats the DDIM-v predictor", codi, _entry(summaries, "predictor_ddim", "codi", n))
    add("PREv predictor beats the teacher predictor", codi,
        _entry(summaries, "predictor_teacher", "codi", n))
    add("A single t per batch beats a t per sample", codi, _entry(summaries, "sample_t", "codi", n))
    add("CoDi beats PE-CoDi (PE-CoDi close behind: see the gap)", codi,
        _entry(summaries, "pe_codi", "codi", n))
    add("CoDi beats CM", codi, _entry(summaries, "cm", "cm", n))
    add("CoDi beats GD (deterministic sampler)", codi, _entry(summaries, "gd", "ddim", n))
    add("CoDi beats GD (stochastic sampler)", codi, _entry(summaries, "gd", "stochastic", n))
    add("CoDi beats Flash Diffusion (not a claim of the paper, which predates it)", codi,
        _entry(summaries, "flash", "flash", n))
    add("CoDi beats LoRA-CoDi (parameter efficiency's cost, as for PE-CoDi)", codi,
        _entry(summaries, "lora_codi", "codi", n))
    codi_2x = _entry(summaries, "codi_2x", "codi", n)
    add("Control: CoDi with CM's total training steps beats CM", codi_2x, _entry(summaries, "cm", "cm", n))
    add("Control: CoDi with GD's total training steps beats GD (stochastic)", codi_2x,
        _entry(summaries, "gd", "stochastic", n))
    add("Control: seed 0 vs seed 1 of CoDi (a verdict here is noise)", codi,
        _entry(summaries, "codi_seed1", "codi", n))
    add("Latent-l2 CG beats perceptual (LPIPS) CG", codi, _entry(summaries, "cg_perceptual", "codi", n))
    return rows


def plot(summaries: dict, lines: tuple, path: str, title: str, condition: dict | None) -> bool:
    """Metric vs sampling steps, one line per (variant, sampler), like the paper's Fig. 5.
    Returns whether there was anything to plot (nothing is written otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if any(m in e for v, s, _ in lines
                                       for e in summaries.get(v, {}).get("results", {})
                                       .get("samplers", {}).get(s, {}).values())]
    if not shown:
        return False
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown) + 2.8, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for variant, sampler, label in lines:
            entries = summaries.get(variant, {}).get("results", {}).get("samplers", {}).get(sampler, {})
            pts = sorted((int(k), e[metric]) for k, e in entries.items() if metric in e and int(k) <= 8)
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=label)
                if metric in entries.get("50", {}):  # a teacher's 50-step reference, as in Table 1
                    ax.axhline(entries["50"][metric], color=line.get_color(), linestyle=":",
                               label=f"{label}, 50 steps")
        if condition and metric in condition:
            ax.axhline(condition[metric], color="gray", linestyle="--", label="bicubic input")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("sampling steps")
        ax.set_title(f"{metric.upper()} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside, not over
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _table(summaries: dict, lines: tuple, steps_filter=None) -> list[str]:
    metrics = [m for m in METRICS if any(m in e for v in summaries.values()
                                         for d in v["results"].get("samplers", {}).values()
                                         for e in d.values())]
    head = "| method | trainable params | train steps | sampler steps | " + " | ".join(
        m.upper() for m in metrics) + " |"
    out = [head, "|" + "---|" * (4 + len(metrics))]
    for variant, sampler, label in lines:
        s = summaries.get(variant)
        if s is None:
            continue
        params = s["results"].get("trainable_params")
        for k, e in sorted(s["results"].get("samplers", {}).get(sampler, {}).items(), key=lambda kv: int(kv[0])):
            if steps_filter and int(k) not in steps_filter:
                continue
            out.append(f"| {label} | {params / 1e6:.2f} M | {s['train_steps']} | {k} | "
                       + " | ".join(_fmt(e.get(m), m) for m in metrics) + " |")
    return out


def write(summaries: dict[str, Any], path: str, *, command: str, commit: str, wall_time_s: float,
          smoke: bool = False) -> str:
    """Writes the report and its plots (``<stem>_methods.png``, ``<stem>_ablations.png``, each
    when it has something to show)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stem = os.path.splitext(path)[0]
    condition = next((s["results"].get("condition") for s in summaries.values()
                      if s["results"].get("condition")), None)
    figures = [name for name, lines, title in (
        ("methods", METHODS, "Methods (Table 1 / Fig. 6 comparison)"),
        ("ablations", ABLATIONS, "CoDi ablations (Figs. 3, 5)"))
        if plot(summaries, lines, f"{stem}_{name}.png", title, condition)]
    not_computed = next((s["results"]["not_computed"] for s in summaries.values()
                         if s["results"].get("not_computed")), {})
    lines = [
        "# Results: the paper's comparisons, reproduced at small scale on this code",
        "",
        *(["**SMOKE RUN: a few training steps per method; these numbers check the pipeline and say "
           "nothing about the claims.**", ""] if smoke else []),
        f"- Command: `{command}`",
        f"- Commit: `{commit}`; written {datetime.date.today().isoformat()}",
        f"- Wall time: {wall_time_s / 60:.1f} min in all "
        "(" + ", ".join(f"{k} {v['wall_time_s'] / 60:.1f}" for k, v in summaries.items()) + " min)",
        _setup_line(summaries),
        "- Metrics: PSNR / SSIM (dm-pix) against the high-resolution target; SWD = multi-scale "
        "sliced Wasserstein distance between patch distributions of the samples and of the targets "
        "(no pretrained network; it stands in for FID). " + (
            "FID / LPIPS: not computed (" + "; ".join(not_computed.values()) + ")."
            if not_computed else "FID / LPIPS from the supplied weight files."),
        "",
        *(f"![{name}]({os.path.basename(stem)}_{name}.png)" for name in figures),
        "",
        f"## The claims, at {CLAIM_STEPS} sampling steps",
        "",
        "A claim holds when the first method is better on both PSNR and SWD, is mixed when on one.",
        "",
        "| claim | here | numbers (first vs second) |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {v} | {n} |" for c, v, n in claims(summaries)]
    lines += ["", "## Table 1 (4 steps; the teacher also at 50)", ""]
    lines += _table(summaries, METHODS, steps_filter={4, 50})
    if condition:
        lines += ["", "Bicubic-upsampled input: " + ", ".join(
            f"{m.upper()} {_fmt(condition[m], m)}" for m in METRICS if m in condition)]
    lines += ["", "## Every method and step count", ""]
    lines += _table(summaries, METHODS)
    lines += ["", "## Ablations, every step count", ""]
    lines += _table(summaries, ABLATIONS)
    lines += ["", _discussion(path)]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _setup_line(summaries: dict[str, Any]) -> str:
    """The run settings, as the runs recorded them (``experiments.run_setup``)."""
    setups = [s["setup"] for s in summaries.values() if "setup" in s]
    if not setups:
        return "- Setup: not recorded by these runs."
    s = setups[0]
    same = all(other == s for other in setups)
    steps = sorted({v["train_steps"] for v in summaries.values()})
    teacher, target = s["gd_steps"]
    return (f"- Setup: teacher `{s['teacher']}`, SR ×4 ({s['degradation']} degradation) on "
            f"{s['image_size']}×{s['image_size']} crops of the `{s['source']}` pictures; batch "
            f"{s['batch_size']}, seed {s['seed']}, the same data order for every method; "
            f"{', '.join(map(str, steps))} training steps; evaluated on {s['eval_examples']} examples of "
            f"{', '.join(s['eval_splits'])} with the same initial noise"
            + ("" if same else " (settings differ between variants: see each summary.json)")
            + f". CM and GD start from the fine-tuned teacher, so they also use its training steps; GD "
            f"splits its budget over the rounds {teacher} → {target} steps. Controls: `codi_2x` trains "
            "twice as long (the teacher's steps plus CM's), `codi_seed1` is CoDi with another "
            "training seed (the seed-to-seed spread).")


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
