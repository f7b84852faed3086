"""The small-scale reproduction of the paper's comparisons (Table 1, Figs. 3 and 5) on this code.

``python -m codi_jax.experiments --workdir=runs/reproduce`` runs whatever is missing and rewrites
``docs/results.md`` from the per-run files under ``docs/results/``. SR ×4 on the embedded data,
from the embedded miniature Stable Diffusion (``config_lib.EMBEDDED_TEACHER``). The protocol is
fixed here, before any result, and is the same for every method:

1. **A budget from a curve.** Seed 0 of each method trains to ``STEP_CAP`` steps (constant learning
   rate), evaluated every ``EVAL_EVERY`` steps (its first sampler at ``CURVE_STEPS`` on the
   evaluation crops) with a checkpoint kept at each. Its budget is the first evaluated step that
   no later evaluation beats at 4 steps by more than ``FLAT_DB`` dB PSNR; the cap when only the
   last does (then the report says "still rising"). Two exceptions, stated in the report: GD gets
   the cap (its rounds halve the step count as training goes, so one curve cannot show it
   converging), and ``codi_2x`` gets CoDi's budget plus the fine-tuned teacher's (CoDi with the
   training steps CM, GD and Flash also had).
2. **The final runs.** Every seed of a method trains exactly its budget and is evaluated with every
   sampler that applies to it (``SAMPLERS``) at every step count, on ``EVAL_EXAMPLES`` crops of the
   held-out pictures. Seed 0 is its curve run's checkpoint at the budget: with a constant learning
   rate that is the model a run of that many steps ends with. The seed changes only the training
   randomness (``cfg.seed``): data order and degradations (``data.seed``) and the evaluation's
   noise (``eval.seed``) are the same for every run. Baselines distilled from the fine-tuned
   teacher (CM, GD, Flash) use the teacher of their own seed.
3. **Files, not reruns.** A finished curve writes ``docs/results/<method>/curve.json``, a finished
   final run ``docs/results/<method>/seed<k>.json`` (metrics, trainable parameters, config hash,
   commit, wall time); a run whose file holds the same config hash is never run again, so the
   reproduction continues across sessions and machines once the files are committed. The hash
   covers the config and the teacher's weight files, so a new teacher makes every file stale.

``--smoke`` runs the same pipeline with a handful of steps on the small pixel-space demo teacher
(the test suite's version). ``--report_only`` rewrites the report from the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
from typing import Any, Iterator, Sequence

import ml_collections
from absl import app, flags, logging
from flax import traverse_util

from codi_jax import config_lib

STEP_CAP = 3000          # the longest curve (batch 16)
EVAL_EVERY = 500         # the curves' evaluation interval, and the budgets' resolution
FLAT_DB = 0.15           # "flattened": nothing later beats it by more than this (4-step PSNR)
CURVE_STEPS = (1, 4)     # the step counts the curves record
EVAL_EXAMPLES = 128      # crops of the four held-out pictures (all of them)
GRID_EXAMPLES = 2        # rows of each final run's sample grid (seed 0's is kept, as a JPEG)
HEADLINE_SEEDS = 3       # training seeds of the Table-1 methods; the ablations have one

# Every sampler that applies to a model, by objective, and the step counts it is scored at. The
# first sampler is the method's own (the one its curve records).
SAMPLERS = {
    "diffusion": (("ddim", "dpmpp", "stochastic"), (1, 2, 4, 8, 50, 200)),
    "codi": (("codi", "renoise"), (1, 2, 4, 8)),
    "cm": (("cm", "cm_ddim"), (1, 2, 4, 8)),
    "gd": (("ddim", "stochastic"), (1, 2, 4, 8)),
    "flash": (("renoise", "codi"), (1, 2, 4)),
}

SMOKE = {"cap": 4, "every": 2, "examples": 8}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the comparison: a ``configs/sr.py`` preset plus dotted-key overrides."""

    name: str
    label: str
    preset: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    teacher: str | None = None     # variant whose export (same seed) is this one's conditional teacher
    needs_lpips: bool = False      # runs only with LPIPS weights (the perceptual CG ablation)
    seeds: int = 1
    budget: str = "curve"          # curve | cap | codi+teacher (see the module docstring)
    curve_of: str | None = None    # the variant whose curve run serves as this one's (same config)


H = HEADLINE_SEEDS
VARIANTS: tuple[Variant, ...] = (
    Variant("teacher", "Fine-tuned teacher", "finetune", seeds=H),
    Variant("codi", "CoDi", seeds=H),
    Variant("pe_codi", "PE-CoDi", "pe", seeds=H),
    Variant("cm", "CM", "cm", teacher="teacher", seeds=H),
    Variant("gd", "GD", "gd", teacher="teacher", seeds=H, budget="cap"),
    # Flash Diffusion from the same teacher, all weights and (the paper's setting) rank-8 LoRA;
    # LoRA-CoDi beside PE-CoDi: the parameter-efficient variants with their trainable counts.
    Variant("flash", "Flash Diffusion", "flash", teacher="teacher", seeds=H),
    Variant("flash_lora", "Flash Diffusion, LoRA r8", "flash_lora", teacher="teacher", seeds=H),
    Variant("lora_codi", "LoRA-CoDi, r8", overrides={"model.lora_rank": 8}, seeds=H),
    # The control: CM, GD and Flash also had the teacher's fine-tuning steps.
    Variant("codi_2x", "CoDi, + the teacher's steps", seeds=H, budget="codi+teacher", curve_of="codi"),
    # §5.1's ablations, each CoDi with one switch changed, and the ones the issue tracker added.
    Variant("random_init", "CoDi, random init", overrides={"model.init": "random"}),
    Variant("sample_t", "CoDi, t per sample", overrides={"distill.timestep_sampling": "sample"}),
    Variant("batch64", "CoDi, batch 64 (4 accumulated)",
            overrides={"train.batch_size": 64, "train.grad_accum": 4}),
    Variant("sample_t_batch64", "CoDi, t per sample, batch 64",
            overrides={"distill.timestep_sampling": "sample", "train.batch_size": 64, "train.grad_accum": 4}),
    Variant("no_cg", "CoDi, no CG", overrides={"distill.cg_weight": 0.0}),
    Variant("predictor_ddim", "CoDi, DDIM-v predictor", overrides={"distill.predictor": "ddim"}),
    Variant("predictor_teacher", "CoDi, teacher predictor", overrides={"distill.predictor": "teacher"}),
    Variant("consistency_x", "CoDi, x-space consistency", overrides={"distill.consistency_space": "x"}),
    Variant("cg_image_l2", "CoDi, pixel-l2 CG (through the decoder)",
            overrides={"distill.cg_distance": "image_l2"}),
    Variant("cg_perceptual", "CoDi, perceptual CG", overrides={"distill.cg_distance": "perceptual"},
            needs_lpips=True),
)
BY_NAME = {v.name: v for v in VARIANTS}


def base_variant_config(v: Variant, *, smoke: bool = False, fid_weights: str = "",
                        lpips_weights: str = "") -> ml_collections.ConfigDict:
    """``v``'s config before the run-specific settings: its preset, its overrides, the protocol."""
    cfg = config_lib.task_config("sr", v.preset)
    # The reproduction follows the paper (one t per batch; the embedded demo draws one per
    # example), so the `sample_t` ablation keeps its meaning.
    cfg.distill.timestep_sampling = "batch"
    cfg.train.lr_schedule = "constant"  # so a curve's checkpoint at b is a b-step run's model
    cfg.update_from_flattened_dict(v.overrides)
    cfg.eval.fid_weights, cfg.eval.lpips_weights = fid_weights, lpips_weights
    cfg.eval.samplers, cfg.eval.steps = SAMPLERS[cfg.objective]
    cfg.eval.splits, cfg.eval.online = ("eval",), False
    cfg.eval.num_examples, cfg.eval.grid_examples = EVAL_EXAMPLES, GRID_EXAMPLES
    if smoke:
        config_lib.make_minimal(cfg, SMOKE["cap"])
        # The smoke run checks the pipeline (every stage, the report), not the models: the small
        # pixel-space demo teacher compiles in a fraction of the miniature Stable Diffusion's time.
        cfg.model.pretrained = config_lib.DEMO_TEACHER
        cfg.train.warmup_steps = 1
        cfg.gd.teacher_steps = 16
        cfg.eval.num_examples = cfg.eval.batch_size = SMOKE["examples"]
        cfg.eval.grid_examples = 2
        cfg.eval.steps = tuple(n for n in cfg.eval.steps if n <= 4)[:2] or (1,)
        if cfg.train.grad_accum > 1:
            cfg.train.batch_size = 4 * cfg.train.grad_accum
    return cfg


def curve_config(cfg: ml_collections.ConfigDict, smoke: bool) -> ml_collections.ConfigDict:
    """Seed 0 to the cap, evaluated (own sampler, ``CURVE_STEPS``) and checkpointed every interval."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cap, every = (SMOKE["cap"], SMOKE["every"]) if smoke else (STEP_CAP, EVAL_EVERY)
    cfg.seed = 0
    cfg.train.num_steps, cfg.eval.every, cfg.train.checkpoint_every = cap, every, every
    cfg.train.keep_checkpoints = cap // every + 1
    cfg.eval.samplers = cfg.eval.samplers[:1]
    cfg.eval.steps = tuple(n for n in CURVE_STEPS if n in cfg.eval.steps)
    cfg.eval.color_fix = False
    cfg.export = False
    return cfg


def flat_budget(points: Sequence[tuple[int, float]]) -> tuple[int, bool]:
    """(budget, flattened) of a curve of (step, 4-step PSNR): the first step that no later one
    beats by more than ``FLAT_DB``; the last step, not flattened, when only it qualifies."""
    points = sorted(points)
    for i, (step, psnr) in enumerate(points[:-1]):
        if max(p for _, p in points[i + 1:]) - psnr <= FLAT_DB:
            return step, True
    return points[-1][0], False


# ------------------------------------------------------------------------------------ files


def _digest_files(root: str) -> str:
    """sha256 over the weight and config files under ``root`` (a teacher folder or file)."""
    h = hashlib.sha256()
    paths = [root] if os.path.isfile(root) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
        if f.endswith((".safetensors", ".msgpack", ".json", ".bin")))
    for p in paths:
        h.update(os.path.relpath(p, root).encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


# Settings that change how a run is logged and stored, never its numbers.
NOT_HASHED = ("eval.grid_examples", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")
# Switches added after results were recorded, with the value that means "off": hashed only when set
# to something else, so the runs recorded before they existed stay valid.
HASHED_WHEN_SET = {"distill.rollout_fraction": 0.0}


def config_hash(cfg: ml_collections.ConfigDict, teacher_hash: str | None = None) -> str:
    """What makes two runs the same run: the config (less the conditional teacher's path, which
    names a workdir, and ``NOT_HASHED``) and the pretrained teacher's files, or the conditional
    teacher's own hash."""
    flat = traverse_util.flatten_dict(cfg.to_dict(), sep=".")
    for key in ("model.conditional_teacher", *NOT_HASHED):
        flat.pop(key, None)
    for key, off in HASHED_WHEN_SET.items():
        if flat.get(key) == off:
            del flat[key]
    pretrained = config_lib.embedded_path(cfg.model.pretrained)
    blob = json.dumps({"config": flat, "teacher": teacher_hash or _digest_files(pretrained)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write(path: str, record: dict) -> None:
    """Atomically: a file is there only when complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """What a run's wall time was measured on."""
    import jax

    return f"{jax.device_count()} × {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores"


def run_setup(cfg: ml_collections.ConfigDict) -> dict:
    """The settings a report states about a run (read from its config, never retyped)."""
    return {"teacher": cfg.model.pretrained, "image_size": cfg.data.image_size,
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seed": cfg.seed, "data_seed": cfg.data.seed, "eval_seed": cfg.eval.seed,
            "source": cfg.data.source, "degradation": cfg.data.sr.degradation,
            "eval_examples": cfg.eval.num_examples, "eval_splits": list(cfg.eval.splits),
            "gd_steps": [cfg.gd.teacher_steps, cfg.gd.target_steps]}


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass
class Reproduction:
    """Runs what is missing of the protocol; ``workdir`` holds checkpoints and exports (not kept),
    ``results`` the per-run files (committed)."""

    workdir: str
    results: str
    smoke: bool = False
    fid_weights: str = ""
    lpips_weights: str = ""

    def _cfg(self, v: Variant) -> ml_collections.ConfigDict:
        return base_variant_config(v, smoke=self.smoke, fid_weights=self.fid_weights,
                                   lpips_weights=self.lpips_weights)

    def _teacher_hash(self, v: Variant, seed: int) -> str | None:
        if v.teacher is None:
            return None
        return self.final(BY_NAME[v.teacher], seed)["config_hash"]

    def _with_teacher(self, cfg: ml_collections.ConfigDict, v: Variant, seed: int) -> ml_collections.ConfigDict:
        if v.teacher:
            cfg.model.conditional_teacher = self.teacher_export(BY_NAME[v.teacher], seed)
        return cfg

    def curve(self, v: Variant) -> dict:
        """``v``'s curve (run if missing): points and budget."""
        source = BY_NAME[v.curve_of] if v.curve_of else v
        cfg = curve_config(self._cfg(source), self.smoke)
        digest = config_hash(cfg, self._teacher_hash(source, 0))
        path = os.path.join(self.results, source.name, "curve.json")
        record = _read(path)
        if record is not None and record["config_hash"] == digest:
            return record
        if record is not None:
            logging.warning("%s: stale (config changed); run again", path)
        out = os.path.join(self.workdir, source.name, "curve")
        cfg = self._with_teacher(cfg, source, 0)
        start = time.time()
        _train(cfg, out, source.name)
        points = []
        with open(os.path.join(out, "eval_log.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                points.append({"step": r["step"], **{
                    f"{m}@{n}": e[m] for n, e in r["samplers"][cfg.eval.samplers[0]].items()
                    for m in ("psnr", "ssim", "swd") if m in e}})
        points = sorted({p["step"]: p for p in points}.values(), key=lambda p: p["step"])
        budget, flattened = flat_budget([(p["step"], p["psnr@4"]) for p in points])
        record = {"name": source.name, "config_hash": digest, "commit": git_commit(), "machine": machine(),
                  "wall_time_s": time.time() - start, "sampler": cfg.eval.samplers[0],
                  "points": points, "budget": budget, "flattened": flattened}
        _write(path, record)
        return record

    def budget(self, v: Variant) -> tuple[int, str]:
        """(training steps, how they were chosen) of ``v``."""
        if v.budget == "cap":
            return self.curve(v)["points"][-1]["step"], "the cap (GD's rounds: no single curve)"
        if v.budget == "codi+teacher":
            b = self.curve(BY_NAME["codi"])["budget"] + self.curve(BY_NAME["teacher"])["budget"]
            return b, "CoDi's budget + the fine-tuned teacher's"
        c = self.curve(v)
        return c["budget"], "flattened" if c["flattened"] else "the cap, still rising"

    def final(self, v: Variant, seed: int) -> dict:
        """``v``'s final run of ``seed`` (run if missing)."""
        steps, rule = self.budget(v)
        cfg = self._cfg(v)
        cfg.seed, cfg.train.num_steps = seed, steps
        digest = config_hash(cfg, self._teacher_hash(v, seed))
        path = os.path.join(self.results, v.name, f"seed{seed}.json")
        record = _read(path)
        if record is not None and record["config_hash"] == digest:
            return record
        from codi_jax import train

        cfg = self._with_teacher(cfg, v, seed)
        out = self._final_dir(v, seed)
        start = time.time()
        source = BY_NAME[v.curve_of] if v.curve_of else v
        curve_dir = os.path.join(self.workdir, source.name, "curve")
        curve_steps = {p["step"] for p in self.curve(source)["points"]}
        results = None
        if seed == 0 and steps in curve_steps:
            # The curve's checkpoint at the budget is this run's model (constant learning rate);
            # on a machine without the curve's checkpoints, the run is trained again below.
            curve_cfg = self._with_teacher(curve_config(self._cfg(source), self.smoke), source, 0)
            restore_cfg = _resumable_as(cfg, curve_cfg)
            try:
                results = train.evaluate_checkpoint(restore_cfg, curve_dir, step=steps, out=out)
            except FileNotFoundError as missing:
                logging.warning("%s seed 0: %s; training it", v.name, missing)
            else:
                if v.name in {other.teacher for other in VARIANTS}:
                    train.export_checkpoint(restore_cfg, curve_dir, step=steps, out=out)
        if results is None:
            results = _train(cfg, out, v.name)
        if seed == 0:  # one sample grid per method for the report, as a JPEG to keep the repo light
            from PIL import Image

            os.makedirs(os.path.join(self.results, v.name), exist_ok=True)
            Image.open(os.path.join(out, "eval_samples.png")).convert("RGB").save(
                os.path.join(self.results, v.name, "samples.jpg"), quality=85)
        record = {"name": v.name, "label": v.label, "seed": seed, "train_steps": steps,
                  "budget_rule": rule, "config_hash": digest, "commit": git_commit(), "machine": machine(),
                  "wall_time_s": time.time() - start, "results": results, "setup": run_setup(cfg)}
        _write(path, record)
        return record

    def _final_dir(self, v: Variant, seed: int) -> str:
        return os.path.join(self.workdir, v.name, f"seed{seed}")

    def teacher_export(self, teacher: Variant, seed: int) -> str:
        """The export of ``teacher``'s final run of ``seed``, retrained (without evaluation) when
        its file exists but this workdir lacks the export (a new machine)."""
        self.final(teacher, seed)
        export = os.path.join(self._final_dir(teacher, seed), "export")
        if not os.path.isdir(export):
            cfg = self._cfg(teacher)
            cfg.seed, cfg.train.num_steps = seed, self.budget(teacher)[0]
            cfg.eval.num_examples = 0
            _train(cfg, self._final_dir(teacher, seed), teacher.name)
        return export

    def plan(self, variants: Sequence[Variant]) -> Iterator[tuple[Variant, int]]:
        """Every (variant, seed), seed 0 of every variant first: each method's curve and first
        final run before any second seed."""
        most = max(v.seeds for v in variants)
        for seed in range(most):
            for v in variants:
                if seed < v.seeds:
                    yield v, seed

    def run(self, variants: Sequence[Variant] = VARIANTS) -> None:
        for v, seed in self.plan(variants):
            if v.needs_lpips and not self.lpips_weights:
                logging.warning("%s: skipped, it needs LPIPS weights (--lpips_weights)", v.name)
                continue
            logging.info("=== %s (%s), seed %d", v.name, v.label, seed)
            self.final(v, seed)

    def missing(self, variants: Sequence[Variant] = VARIANTS) -> list[str]:
        """The curves and final runs without a file (a stale file counts as done until a run
        finds it stale)."""
        out = []
        for v in variants:
            source = v.curve_of or v.name
            curve = f"{source} curve"
            if not os.path.exists(os.path.join(self.results, source, "curve.json")) and curve not in out:
                out.append(curve)
            out += [f"{v.name} seed {k}" for k in range(v.seeds)
                    if not os.path.exists(os.path.join(self.results, v.name, f"seed{k}.json"))]
        return out


def _train(cfg: ml_collections.ConfigDict, out: str, name: str) -> dict:
    """``train.train_and_evaluate``; a preempted run stops the whole reproduction."""
    from codi_jax import train

    try:
        return train.train_and_evaluate(cfg, out)
    except train.Preempted as stop:
        # SIGTERM: the checkpoint is saved; stop everything, the next invocation resumes here.
        raise SystemExit(f"{name}: preempted at step {stop.step}; rerun to resume") from None


def _resumable_as(cfg: ml_collections.ConfigDict, curve_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The final run's config (its evaluation) with the curve run's training settings, under
    which the curve's checkpoints open (and are kept: ``train.keep_checkpoints``)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.train = curve_cfg.train
    return out


# ------------------------------------------------------------------------------------ main

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/reproduce", "Checkpoints and exports (<workdir>/<variant>/...).")
flags.DEFINE_string("results", "docs/results", "The per-run result files the report is made of "
                    "(with --smoke: <workdir>/results unless given).")
flags.DEFINE_string("report", "docs/results.md", "The Markdown report; its plots go beside it "
                    "(with --smoke: <workdir>/results.md unless given).")
flags.DEFINE_bool("smoke", False, "A few steps per run: checks the pipeline, not the claims.")
flags.DEFINE_bool("report_only", False, "Only rewrite the report from the result files.")
flags.DEFINE_list("only", [], "Run only these variants (and the teachers they need).")
flags.DEFINE_string("fid_weights", "", "Inception-v3 weight file for FID (else: not computed).")
flags.DEFINE_string("lpips_weights", "", "LPIPS weight file(s), comma-separated (else: not computed).")


def protocol(smoke: bool = False) -> str:
    """The protocol in a sentence, from the constants above (for the report)."""
    cap, every = (SMOKE["cap"], SMOKE["every"]) if smoke else (STEP_CAP, EVAL_EVERY)
    return (f"seed 0 of each method trains to {cap} steps at a constant learning rate, evaluated every "
            f"{every}; its budget is the first evaluated step that no later one beats by more than "
            f"{FLAT_DB} dB at 4 steps (GD: the cap; CoDi + the teacher's steps: the sum of both "
            f"budgets); {HEADLINE_SEEDS} training seeds per Table-1 method and one per ablation, each "
            "training exactly its budget (seed 0: its curve's checkpoint there), with the same data "
            "order, degradations and evaluation noise; every sampler that applies, at every step count.")


def select(only: Sequence[str]) -> tuple[Variant, ...]:
    if not only:
        return VARIANTS
    unknown = sorted(set(only) - set(BY_NAME))
    if unknown:
        raise ValueError(f"--only: unknown variants {unknown}; known: {sorted(BY_NAME)}")
    wanted = set(only)
    for name in only:
        v = BY_NAME[name]
        wanted |= {n for n in (v.teacher, v.curve_of) if n}
        if v.budget == "codi+teacher":
            wanted |= {"codi", "teacher"}
    return tuple(v for v in VARIANTS if v.name in wanted)


def main(argv):
    del argv
    from codi_jax import report

    results, path = FLAGS.results, FLAGS.report
    if FLAGS.smoke:  # never over the committed results
        results = results if FLAGS["results"].present else os.path.join(FLAGS.workdir, "results")
        path = path if FLAGS["report"].present else os.path.join(FLAGS.workdir, "results.md")
    repro = Reproduction(FLAGS.workdir, results, smoke=FLAGS.smoke, fid_weights=FLAGS.fid_weights,
                         lpips_weights=FLAGS.lpips_weights)
    if not FLAGS.report_only:
        repro.run(select(FLAGS.only))
    command = f"python -m codi_jax.experiments --workdir={FLAGS.workdir}" + (" --smoke" if FLAGS.smoke else "")
    report.write(results, path, command=command, commit=git_commit(), smoke=FLAGS.smoke,
                 missing=repro.missing(), protocol=protocol(FLAGS.smoke))


if __name__ == "__main__":
    app.run(main)
