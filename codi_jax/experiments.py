"""The small-scale reproduction of the paper's comparisons (Table 1, Figs. 3 and 5) on this code.

``python -m codi_jax.experiments --workdir=runs/reproduce`` trains every variant below on the
embedded data (the embedded teacher, ``config_lib.EMBEDDED_TEACHER``, SR ×4), with the same seed, data order, batch and
step budget for every method, evaluates them all the same way (``evaluate.run``: PSNR, SSIM and
multi-scale SWD at 1/2/4/8 steps; FID / LPIPS with ``--fid_weights`` / ``--lpips_weights``), and
writes ``docs/results.md`` plus Fig.-5-style plots. Variants already evaluated in the workdir are
not rerun (a stopped run resumes, mid-training too, from the checkpoints). ``--smoke`` runs the
same pipeline with a handful of steps (the test suite's version).

Budgets are fixed here, up front, for every method; nothing is chosen after seeing results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Any, Sequence

import ml_collections
from absl import app, flags, logging

from codi_jax import config_lib

# Every method: 300 steps of batch 16 (half the embedded CoDi default, so that the eleven runs fit
# about an hour on a 2-core CPU), seed 0, 64 held-out crops.
STEPS = 300
SMOKE_STEPS = 2  # one per GD round: the smoke run's GD has two (16 → 8 → 4 steps)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the comparison: a ``configs/sr.py`` preset plus dotted-key overrides."""

    name: str
    label: str
    preset: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    teacher: str | None = None     # variant whose export is this one's conditional teacher
    needs_lpips: bool = False      # runs only with LPIPS weights (the perceptual CG ablation)
    budget: float = 1.0            # training steps as a multiple of STEPS


VARIANTS: tuple[Variant, ...] = (
    Variant("teacher", "Fine-tuned teacher", "finetune"),
    Variant("codi", "CoDi"),
    Variant("pe_codi", "PE-CoDi", "pe"),
    Variant("cm", "CM", "cm", teacher="teacher"),
    Variant("gd", "GD", "gd", teacher="teacher"),
    # Flash Diffusion from the same teacher, all weights and (the paper's setting) rank-8 LoRA;
    # LoRA-CoDi beside PE-CoDi: the parameter-efficient variants with their trainable counts.
    Variant("flash", "Flash Diffusion", "flash", teacher="teacher"),
    Variant("flash_lora", "Flash Diffusion, LoRA r8", "flash_lora", teacher="teacher"),
    Variant("lora_codi", "LoRA-CoDi, r8", overrides={"model.lora_rank": 8}),
    Variant("random_init", "CoDi, random init", overrides={"model.init": "random"}),
    Variant("sample_t", "CoDi, t per sample", overrides={"distill.timestep_sampling": "sample"}),
    Variant("no_cg", "CoDi, no CG", overrides={"distill.cg_weight": 0.0}),
    Variant("predictor_ddim", "CoDi, DDIM-v predictor", overrides={"distill.predictor": "ddim"}),
    Variant("predictor_teacher", "CoDi, teacher predictor", overrides={"distill.predictor": "teacher"}),
    Variant("cg_perceptual", "CoDi, perceptual CG", overrides={"distill.cg_distance": "perceptual"},
            needs_lpips=True),
    # Controls added after the first results (docs/results.md, Discussion): CM and GD also use the
    # teacher's fine-tuning steps, so this is CoDi with the same total training steps as they have.
    Variant("codi_2x", "CoDi, 2x steps", budget=2.0),
    # The same, for the spread between two training seeds: differences below it are noise.
    Variant("codi_seed1", "CoDi, seed 1", overrides={"seed": 1}),
)


def variant_config(v: Variant, workdir: str, *, smoke: bool = False, fid_weights: str = "",
                   lpips_weights: str = "") -> ml_collections.ConfigDict:
    """The config of variant ``v``: its preset, its overrides, and the shared budget."""
    cfg = config_lib.task_config("sr", v.preset)
    # The reproduction follows the paper (one t per batch; the embedded demo draws one per
    # example), so the `sample_t` ablation keeps its meaning.
    cfg.distill.timestep_sampling = "batch"
    cfg.update_from_flattened_dict(v.overrides)
    if v.teacher:
        cfg.model.conditional_teacher = os.path.join(workdir, v.teacher, "export")
    cfg.eval.fid_weights, cfg.eval.lpips_weights = fid_weights, lpips_weights
    cfg.eval.num_examples = 64
    if smoke:
        config_lib.make_minimal(cfg, SMOKE_STEPS)
        # The smoke run checks the pipeline (every variant, the report), not the models: the small
        # pixel-space demo teacher compiles in a fraction of the miniature Stable Diffusion's time.
        cfg.model.pretrained = config_lib.DEMO_TEACHER
        cfg.train.warmup_steps = 1
        cfg.train.checkpoint_every = SMOKE_STEPS
        cfg.gd.teacher_steps = 16
        cfg.eval.grid_examples = 2
        cfg.eval.steps = (1,)
        cfg.eval.splits = cfg.eval.splits[:1]
        cfg.eval.online = False
    else:
        cfg.train.num_steps = int(STEPS * v.budget)
    return cfg


def run_setup(cfg: ml_collections.ConfigDict) -> dict:
    """The settings a report states about a run (read from its config, never retyped)."""
    return {"teacher": cfg.model.pretrained, "image_size": cfg.data.image_size,
            "batch_size": cfg.train.batch_size, "seed": cfg.seed, "source": cfg.data.source,
            "degradation": cfg.data.sr.degradation, "eval_examples": cfg.eval.num_examples,
            "eval_splits": list(cfg.eval.splits) or [cfg.data.eval_split],
            "gd_steps": [cfg.gd.teacher_steps, cfg.gd.target_steps]}


def run_variant(v: Variant, workdir: str, **kwargs: Any) -> dict:
    """Trains and evaluates ``v`` in ``<workdir>/<name>`` unless its ``summary.json`` exists."""
    from codi_jax import train

    out = os.path.join(workdir, v.name)
    summary_path = os.path.join(out, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    cfg = variant_config(v, workdir, **kwargs)
    start = time.time()
    try:
        results = train.train_and_evaluate(cfg, out)
    except train.Preempted as stop:
        # SIGTERM: the checkpoint is saved; stop everything, the next invocation resumes here.
        raise SystemExit(f"{v.name}: preempted at step {stop.step}; rerun to resume") from None
    summary = {"name": v.name, "label": v.label, "train_steps": cfg.train.num_steps,
               "wall_time_s": time.time() - start, "results": results, "setup": run_setup(cfg)}
    with open(summary_path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(summary_path + ".tmp", summary_path)  # a summary is there only when complete
    return summary


def run_all(workdir: str, variants: Sequence[Variant] = VARIANTS, **kwargs: Any) -> dict[str, dict]:
    summaries = {}
    for v in variants:
        if v.needs_lpips and not kwargs.get("lpips_weights"):
            logging.warning("%s: skipped, it needs LPIPS weights (--lpips_weights)", v.name)
            continue
        logging.info("=== %s (%s)", v.name, v.label)
        summaries[v.name] = run_variant(v, workdir, **kwargs)
    return summaries


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/reproduce", "Where each variant's run goes (<workdir>/<variant>).")
flags.DEFINE_string("report", "docs/results.md", "The Markdown report; the plots go beside it.")
flags.DEFINE_bool("smoke", False, "A few steps per variant: checks the pipeline, not the claims.")
flags.DEFINE_list("only", [], "Run only these variants (and the teacher they need).")
flags.DEFINE_string("fid_weights", "", "Inception-v3 weight file for FID (else: not computed).")
flags.DEFINE_string("lpips_weights", "", "LPIPS weight file(s), comma-separated (else: not computed).")


def main(argv):
    del argv
    from codi_jax import report

    variants = VARIANTS
    if FLAGS.only:
        unknown = sorted(set(FLAGS.only) - {v.name for v in VARIANTS})
        if unknown:
            raise ValueError(f"--only: unknown variants {unknown}; known: {[v.name for v in VARIANTS]}")
        wanted = set(FLAGS.only) | {v.teacher for v in VARIANTS if v.name in FLAGS.only and v.teacher}
        variants = tuple(v for v in VARIANTS if v.name in wanted)
    summaries = run_all(FLAGS.workdir, variants, smoke=FLAGS.smoke, fid_weights=FLAGS.fid_weights,
                        lpips_weights=FLAGS.lpips_weights)
    command = (f"python -m codi_jax.experiments --workdir={FLAGS.workdir}"
               + (" --smoke" if FLAGS.smoke else "")
               + (f" --only={','.join(FLAGS.only)}" if FLAGS.only else ""))
    report.write(summaries, FLAGS.report, command=command, commit=git_commit(),
                 wall_time_s=sum(s["wall_time_s"] for s in summaries.values()), smoke=FLAGS.smoke)


if __name__ == "__main__":
    app.run(main)
