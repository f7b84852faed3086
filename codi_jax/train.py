"""The trainer: one jitted, sharded step per global batch; orbax checkpoints; clu metrics.

Read top to bottom: ``train_and_evaluate`` builds mesh → teacher → adapted student → optimizer →
state (restored if the workdir has a checkpoint) → jitted step, then loops, then evaluates and
exports. The step (``make_train_step``) is Algorithm 1: prepare the batch (VAE/text, frozen),
take the loss's gradient w.r.t. the trainable parameters only, apply AdamW, update the EMA target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from codi_jax import console, diffusion, distributed, evaluate, sharding, throughput
from codi_jax.distill import (CMLossConfig, CoDiLossConfig, FlashLossConfig, ProgressiveLossConfig,
                              ema_update, make_cm_loss, make_codi_loss, make_flash_losses,
                              make_progressive_loss)
from codi_jax.distill.flash import FlashLosses
from codi_jax.export import export, load_exported
from codi_jax.models import adapters, lora
from codi_jax.models.discriminator import LatentDiscriminator
from codi_jax.modeling import Student, build_student, load_teacher, with_guidance_input
from codi_jax.sampling import JittedSamplers

OBJECTIVES = ("codi", "diffusion", "cm", "gd", "flash")
# Objectives with a consistency target θ⁻ (the EMA of Algorithm 1's last line) in the loss.
TARGET_OBJECTIVES = ("codi", "cm")
# Objectives that distil a fine-tuned conditional teacher (model.conditional_teacher).
BASELINE_OBJECTIVES = ("cm", "gd", "flash")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the last checkpoint holds the last good state."""


class Preempted(Exception):
    """SIGTERM stopped the run after saving a checkpoint at ``step``; rerunning resumes there."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved step {step}; rerun the same command to resume")
        self.step = step


# ---------------------------------------------------------------------------------------- params


def partition(params: Any, mask: Any) -> tuple[dict, dict]:
    """Splits ``params`` into (trainable, frozen) nested dicts by a boolean ``mask``. The frozen
    part gets no gradient, no optimizer state and no EMA copy (PE-CoDi's UNet is not duplicated)."""
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
    if t.lr_schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1)), optax.constant_schedule(t.lr)],
            [max(t.warmup_steps, 1)])
    elif t.lr_schedule == "cosine":
        if t.warmup_steps >= t.num_steps:
            raise ValueError(f"train.warmup_steps ({t.warmup_steps}) must be below train.num_steps "
                             f"({t.num_steps}) for the cosine schedule")
        schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1), t.num_steps)
    else:
        raise ValueError(f"train.lr_schedule: unknown value {t.lr_schedule!r}; known: ['constant', 'cosine']")
    transforms = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    transforms.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
    if t.mu_lr_scale != 1.0:
        # Adam moves every parameter by about lr per step whatever its gradient, so the scalar
        # gate μ of eq. 10 needs ~1/lr steps to open; short runs give it a larger step.
        is_mu = lambda params: traverse_util.path_aware_map(lambda path, _: path[-1] == "mu", params)
        transforms.append(optax.masked(optax.scale(t.mu_lr_scale), is_mu))
    return optax.chain(*transforms), schedule


# ------------------------------------------------------------------------------------------ step


def make_loss(cfg: ml_collections.ConfigDict, student: Student, student_steps: int | None = None
              ) -> Callable:
    """``loss(params, second_params, aux, batch, rng)`` of ``cfg.objective`` on full param trees.

    ``second_params`` are CoDi's / CM's consistency target θ⁻ (``state["target"]``), and for
    ``gd`` the frozen teacher of the current round (``state["round_teacher"]``, whose student
    samples in ``student_steps``). CM's teacher is ``aux["teacher"]``.
    """
    teacher = student.teacher
    schedule, prediction_type = teacher.schedule, teacher.prediction_type
    if cfg.objective == "diffusion":
        base = diffusion.make_diffusion_loss(student.model_fn, schedule, prediction_type)
        return lambda params, target, aux, batch, rng: base(params, batch, rng)
    if cfg.objective == "cm":
        cm_cfg = CMLossConfig.from_mapping(cfg.cm.to_dict())

        def cm_loss(params, target, aux, batch, rng):
            teacher_fn = functools.partial(student.model_fn, aux["teacher"])
            return make_cm_loss(student.model_fn, teacher_fn, schedule, prediction_type, cm_cfg)(
                params, target, batch, rng)

        return cm_loss
    if cfg.objective == "gd":
        gd_cfg = ProgressiveLossConfig.from_mapping(cfg.gd.to_dict())

        def gd_loss(params, target, aux, batch, rng):
            teacher_fn = functools.partial(student.model_fn, target)
            return make_progressive_loss(student.model_fn, teacher_fn, schedule, prediction_type,
                                         student_steps, gd_cfg)(params, batch, rng)

        return gd_loss
    if cfg.objective == "flash":
        raise ValueError("objective 'flash' has two losses (generator and discriminator): see "
                         "make_flash_losses / make_train_step")
    if cfg.objective != "codi":
        raise ValueError(f"objective: unknown value {cfg.objective!r}; known: {list(OBJECTIVES)}")
    loss_cfg = CoDiLossConfig.from_mapping(cfg.distill.to_dict())
    _check_guidance(cfg, student, loss_cfg.guided)

    def loss(params, target, aux, batch, rng):
        teacher_fn = student.teacher_fn(aux["teacher"]) if "teacher" in aux else None
        uncond_fn = None
        if loss_cfg.guided:   # the unconditional branch: the frozen teacher, the prompt dropped
            empty = empty_prompt_context(student, aux)
            uncond_fn = lambda z, model_time, context: teacher_fn(z, model_time, empty(context))
        codi = make_codi_loss(
            student.model_fn, schedule, prediction_type, loss_cfg, teacher_fn=teacher_fn,
            decode_fn=functools.partial(student.decode, aux) if teacher.latent else (lambda x: x),
            perceptual_fn=_perceptual_fn(cfg, loss_cfg), uncond_fn=uncond_fn)
        return codi(params, target, batch, rng)

    return loss


def _check_guidance(cfg: ml_collections.ConfigDict, student: Student, guided: bool) -> None:
    """A guided objective trains a guidance-aware student (and only then does w reach it)."""
    if guided and not student.guidance_input:
        section = "distill" if cfg.objective == "codi" else cfg.objective
        raise ValueError(f"{section}.guidance_max > 0 distils classifier-free-guided targets into a "
                         "student that reads w: set model.guidance_input=True (preset 'guided')")


def empty_prompt_context(student: Student, aux: dict) -> Callable[[Any], Any]:
    """``context → the empty prompt's context`` (same batch size): classifier-free guidance's
    dropped condition for a teacher that reads text; ``None`` stays ``None`` (no text)."""
    if student.teacher.tokenizer is None:
        return lambda context: None
    from codi_jax.models import clip

    ids, _ = clip.tokenize(student.teacher.tokenizer, [""])
    ids = jnp.asarray(ids)

    def empty(context):
        if context is None:
            return None
        return student.context(aux, jnp.broadcast_to(ids, (context.shape[0],) + ids.shape[1:]))

    return empty


def _perceptual_fn(cfg: ml_collections.ConfigDict, loss_cfg: CoDiLossConfig) -> Callable | None:
    """LPIPS for the ``cg_distance=perceptual`` ablation, from ``eval.lpips_weights``."""
    if loss_cfg.cg_distance != "perceptual" or not loss_cfg.cg_weight:
        return None
    from codi_jax.metrics import fetch, lpips

    if not cfg.eval.lpips_weights:
        raise ValueError("distill.cg_distance: 'perceptual' needs LPIPS weights; set "
                         "eval.lpips_weights (see codi_jax/metrics/lpips.py for the files)")
    files = fetch.resolve(cfg.eval.lpips_weights, f"lpips:{cfg.eval.lpips_net}")
    return lpips.load_lpips(files.split(","), net=cfg.eval.lpips_net)


@dataclasses.dataclass(frozen=True)
class Round:
    """One training round: its student's step count (GD; ``None`` for the other objectives) and
    the first training step it owns."""

    student_steps: int | None
    start: int


def training_rounds(cfg: ml_collections.ConfigDict) -> list[Round]:
    """Progressive distillation's halvings for ``gd``, one round otherwise. ``train.num_steps`` is
    split as evenly as the integers allow (a later round takes one step more)."""
    if cfg.objective != "gd":
        return [Round(None, 0)]
    steps = ProgressiveLossConfig.from_mapping(cfg.gd.to_dict()).rounds()
    if cfg.train.num_steps < len(steps):
        raise ValueError(f"train.num_steps: {cfg.train.num_steps} is fewer than the {len(steps)} GD "
                         f"rounds {cfg.gd.teacher_steps} → {cfg.gd.target_steps} steps")
    return [Round(n, r * cfg.train.num_steps // len(steps)) for r, n in enumerate(steps)]


def current_round(rounds: list[Round], step: int) -> Round:
    """The round that owns training step ``step``."""
    return [r for r in rounds if r.start <= step][-1]


def evaluation_decay(decay: float, step: jax.Array) -> jax.Array:
    """The evaluation EMA's decay at ``step``: ramped up as (1 + n) / (10 + n) (TF's num_updates
    rule) to ``decay``, so a short run's average is not dominated by the initial weights."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def flash_losses(cfg: ml_collections.ConfigDict, student: Student, aux: dict) -> FlashLosses:
    """Flash Diffusion's generator and discriminator losses (``distill/flash.py``): the student
    against the frozen conditional teacher ``aux["teacher"]``, whose UNet encoder feeds the
    discriminator head (the latent only: the condition is enforced by the distillation term)."""
    flash_cfg = FlashLossConfig.from_mapping(cfg.flash.to_dict())
    _check_guidance(cfg, student, flash_cfg.guided)
    teacher = student.teacher
    unet, head = student.module.unet, LatentDiscriminator()
    uncond_fn = None
    if flash_cfg.guided:
        if teacher.tokenizer is None:
            raise ValueError("flash.guidance_max > 0: the conditional teacher's classifier-free "
                             "guidance drops the text prompt, and this teacher reads no text")
        empty = empty_prompt_context(student, aux)
        uncond_fn = lambda cond, context: (cond, empty(context))

    def features(z, model_time, context):
        return unet.apply({"params": aux["teacher"]["unet"]}, z, model_time, context, method="encode")

    return make_flash_losses(
        student.model_fn, functools.partial(student.conditional_fn, aux["teacher"]), features,
        lambda params, f: head.apply({"params": params}, f), teacher.schedule,
        teacher.prediction_type, flash_cfg, uncond_fn=uncond_fn)


def discriminator_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The discriminator head's own Adam (constant ``flash.disc_lr``), state ``disc_opt_state``."""
    return optax.adam(cfg.flash.disc_lr)


def init_discriminator(cfg: ml_collections.ConfigDict, feature_channels: int) -> dict:
    """The head's initial params: they depend on the teacher encoder's channel count only."""
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xD15C)
    return LatentDiscriminator().init(key, jnp.zeros((1, 4, 4, feature_channels), jnp.float32))["params"]


def make_flash_train_step(cfg: ml_collections.ConfigDict, student: Student, tx: optax.GradientTransformation,
                          schedule: Callable) -> Callable:
    """Flash Diffusion's step: a generator update of the student (eq. 6), then a discriminator
    update (eq. 4) against the *updated* student's samples, each applied only if finite."""
    if cfg.train.grad_accum != 1:
        raise ValueError("train.grad_accum: objective 'flash' takes no gradient accumulation yet")
    disc_tx = discriminator_optimizer(cfg)

    def step(state, frozen, aux, batch, base_rng):
        k_prep, k_loss = jax.random.split(jax.random.fold_in(base_rng, state["step"]))
        data = student.prepare(aux, batch, k_prep)
        losses = flash_losses(cfg, student, aux)
        progress = state["step"].astype(jnp.float32) / cfg.train.num_steps

        (loss, metrics), grads = jax.value_and_grad(
            lambda p: losses.generator(combine(p, frozen), state["disc"], data, k_loss, progress),
            has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.global_norm(grads)
        g_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda n, o: jnp.where(g_ok, n, o),
                                         (optax.apply_updates(state["params"], updates), opt_state),
                                         (state["params"], state["opt_state"]))

        disc, disc_opt_state, d_ok = state["disc"], state["disc_opt_state"], jnp.asarray(True)
        if cfg.flash.adv_weight:
            (d_loss, d_metrics), d_grads = jax.value_and_grad(
                lambda d: losses.discriminator(d, combine(params, frozen), data, k_loss, progress),
                has_aux=True)(disc)
            d_updates, d_state = disc_tx.update(d_grads, disc_opt_state, disc)
            d_ok = jnp.isfinite(d_loss) & jnp.isfinite(optax.global_norm(d_grads))
            disc, disc_opt_state = jax.tree.map(lambda n, o: jnp.where(d_ok, n, o),
                                                (optax.apply_updates(disc, d_updates), d_state),
                                                (disc, disc_opt_state))
            metrics = dict(metrics, **d_metrics)
        new = {"step": state["step"] + 1, "params": params, "target": state["target"],
               "round_teacher": state["round_teacher"],
               "ema": jax.tree.map(lambda n, o: jnp.where(g_ok, n, o),
                                   ema_update(state["ema"], params, evaluation_decay(cfg.train.eval_ema_decay, state["step"])),
                                   state["ema"]),
               "opt_state": opt_state, "disc": disc, "disc_opt_state": disc_opt_state}
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state["step"]), progress=progress,
                       finite=(g_ok & d_ok).astype(jnp.float32))
        return new, metrics

    return step


def make_train_step(cfg: ml_collections.ConfigDict, student: Student, tx: optax.GradientTransformation,
                    schedule: Callable, student_steps: int | None = None, first_step: int = 0
                    ) -> Callable:
    """``step(state, frozen, aux, batch, base_rng) -> (state, metrics)``, pure and jittable.

    ``student_steps`` and ``first_step`` describe the current GD round (whose optimizer, and so
    learning-rate schedule, restarted at ``first_step``)."""
    if cfg.objective == "flash":
        return make_flash_train_step(cfg, student, tx, schedule)
    loss_fn = make_loss(cfg, student, student_steps)
    accum = cfg.train.grad_accum

    def step(state, frozen, aux, batch, base_rng):
        # The step's randomness depends only on (seed, step): a resumed run draws what an
        # uninterrupted one would.
        k_prep, k_loss = jax.random.split(jax.random.fold_in(base_rng, state["step"]))
        data = student.prepare(aux, batch, k_prep)
        # GD reads the current round's frozen teacher (see ``begin_round``), CoDi / CM their θ⁻.
        second = combine(state["round_teacher"] if cfg.objective == "gd" else state["target"], frozen)

        def micro_grad(params, micro, key):
            def f(p):
                return loss_fn(combine(p, frozen), second, aux, micro, key)
            return jax.value_and_grad(f, has_aux=True)(params)

        if accum == 1:
            (loss, metrics), grads = micro_grad(state["params"], data, k_loss)
        else:
            # Gradient accumulation: the batch is split into `accum` micro-batches, scanned so
            # only one micro-batch's activations are alive at a time.
            micro = jax.tree.map(lambda a: a.reshape((accum, -1) + a.shape[1:]), data)

            def body(carry, inputs):
                m, key = inputs
                (l, met), g = micro_grad(state["params"], m, key)
                return jax.tree.map(jnp.add, carry, (l, met, g)), None

            shapes = jax.eval_shape(micro_grad, state["params"], jax.tree.map(lambda a: a[0], micro), k_loss)
            (l0, m0), g0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            zeros = (l0, m0, g0)
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, jax.random.split(k_loss, accum)))
            loss, metrics, grads = jax.tree.map(lambda a: a / accum, (loss, metrics, grads))

        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params,
               "target": (ema_update(state["target"], params, cfg.train.ema_decay)
                          if cfg.objective in TARGET_OBJECTIVES else state["target"]),
               "round_teacher": state["round_teacher"],
               "ema": ema_update(state["ema"], params, evaluation_decay(cfg.train.eval_ema_decay, state["step"])),
               "opt_state": opt_state}
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state untouched (only the step counter moves), so the
        # host can stop one step later without a NaN ever reaching the parameters.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        new["step"] = state["step"] + 1
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state["step"] - first_step),
                       finite=finite.astype(jnp.float32))
        mu = traverse_util.flatten_dict(params).get(("adapter", "mu"))
        if mu is not None:
            metrics["mu"] = jnp.mean(mu)
            if mu.size > 1:  # per-level gates: the trajectory of each
                metrics.update({f"mu_{i}": m for i, m in enumerate(jnp.ravel(mu))})
        return new, metrics

    return step


# ----------------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


# The config keys a resumed run must share with the run that wrote the checkpoint: they fix the
# state's structure, the objective, the model or the data order. Anything else (train.num_steps,
# the learning rate, evaluation and logging settings) may change between a stop and a resume.
RESUME_KEYS = ("seed", "data.seed", "objective", "model.pretrained", "model.unet_config", "model.vae",
               "model.init", "model.adapter", "model.trainable", "model.per_level_mu", "model.mu_knots",
               "model.guidance_input", "model.cond_input", "model.hint_channels", "model.prediction_type",
               "model.conditional_teacher", "model.vae_config", "model.lora_rank", "model.lora_convs",
               "model.lora_modules", "data.task", "data.source",
               "train.batch_size", "distill.grid", "gd.teacher_steps", "gd.target_steps")


def _json_record(tree: Any) -> Any:
    return json.loads(json.dumps(tree, default=list))  # tuples → lists, as JSON stores them


def save_checkpoint(mgr: ocp.CheckpointManager, step: int, state: Any, cfg: ml_collections.ConfigDict,
                    model_config: dict | None = None, force: bool = False) -> None:
    """Saves ``state`` with the run's config (``config``) and the adapted-model config (``model``)
    as JSON items beside it, so a workdir says what its checkpoints are."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(_json_record(cfg.to_dict()))}
    if model_config is not None:
        items["model"] = ocp.args.JsonSave(_json_record(model_config))
    mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
    """The newest checkpoint that restores; corrupt ones are skipped with a warning. Restoring onto
    ``abstract_state``'s shardings reshards (any mesh shape)."""
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as err:  # noqa: BLE001 — any failure means: this checkpoint is unusable.
            logging.warning("checkpoint %d in %s cannot be restored (%s: %s); trying the previous one",
                            step, mgr.directory, type(err).__name__, err)
    return None


def stored_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config saved with the newest readable checkpoint of ``workdir`` (None if it has none)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    mgr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                options=ocp.CheckpointManagerOptions(read_only=True))
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            return ml_collections.ConfigDict(mgr.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore())).config)
        except Exception:  # noqa: BLE001 — an older or corrupt checkpoint: try the previous one.
            continue
    return None


def check_resumable(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """Refuses to continue ``workdir``'s checkpoints with a config that differs from theirs in
    ``RESUME_KEYS`` (a workdir without checkpoints accepts any config)."""
    stored = stored_config(workdir)
    if stored is None:
        return
    old = traverse_util.flatten_dict(_json_record(stored.to_dict()), sep=".")
    new = traverse_util.flatten_dict(_json_record(cfg.to_dict()), sep=".")
    keys = sorted(k for k in set(old) | set(new) if any(k == r or k.startswith(r + ".") for r in RESUME_KEYS))
    differing = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in keys
                 if old.get(k) != new.get(k)]
    if differing:
        raise ValueError("the workdir's checkpoints belong to a run with another config; use another "
                         "--workdir or the same settings (" + "; ".join(differing) + ")")


class PreemptionFlag:
    """A preemption notice (SIGTERM: Cloud TPU, SLURM, Kubernetes), for the loop to save and stop.

    One process: a SIGTERM handler sets an event that ``stop_after`` reads. Several processes:
    JAX's preemption sync manager (started by ``jax.distributed.initialize``, which also installs
    its SIGTERM handler, so none is installed here) takes the notice on any process, spreads it
    through the coordination service and agrees in the background on one step at which every
    process stops. The loop asks it every step without a collective of its own: a per-step
    ``process_allgather`` would block each host on the others every step and stall JAX's
    asynchronous dispatch."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        self._synced = jax.process_count() > 1
        if not self._synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def stop_after(self, step: int) -> bool:
        """Whether to save and stop once ``step`` steps are done: on several processes, the same
        answer on each (every process must ask at every step, as the sync manager requires)."""
        if self._synced:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Setup:
    """Everything the loop needs besides data: model, state and the shardings of each input. The
    trees hold device arrays (``setup``) or, for planning and ahead-of-time compilation,
    ``jax.ShapeDtypeStruct``s carrying the same shardings (``abstract_setup``)."""

    student: Student
    state: dict
    state_sharding: Any
    frozen: dict
    frozen_sharding: Any
    aux: dict
    aux_sharding: Any
    tx: optax.GradientTransformation
    schedule: Callable

    def abstract_state(self) -> Any:
        """Shapes, dtypes and shardings of the state: the restore target for orbax."""
        return sharding.with_shardings(self.state, self.state_sharding)


def build(cfg: ml_collections.ConfigDict) -> tuple[Student, dict]:
    """The model to train and its initial params: the adapted teacher (or, for the baselines, the
    fine-tuned conditional teacher). Callers place the params; ``setup`` builds them on the host."""
    if cfg.objective in BASELINE_OBJECTIVES and not cfg.model.conditional_teacher:
        raise ValueError(f"objective {cfg.objective!r} distils a fine-tuned conditional teacher: set "
                         "model.conditional_teacher to the export/ folder of a run of the `finetune` "
                         "preset")
    if cfg.model.conditional_teacher:
        student, params = load_conditional_teacher(cfg)
    else:
        from codi_jax.data.config import cond_channels

        k_teacher, k_adapter = jax.random.split(jax.random.PRNGKey(cfg.seed))
        teacher = load_teacher(cfg.model, k_teacher)
        student, params = build_student(cfg.model, teacher, cond_channels(cfg.data), k_adapter)
    if cfg.model.guidance_input and cfg.objective not in ("codi", "flash"):
        raise ValueError(f"model.guidance_input: objective {cfg.objective!r} has no guidance-aware "
                         "mode (codi and flash do)")
    if cfg.model.guidance_input:   # also makes a plain conditional teacher's student guidance-aware
        student, params = with_guidance_input(student, params, cfg.model.guidance)
    if cfg.model.lora_rank:
        # A key of its own: the runs without LoRA keep their initialisation.
        k_lora = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x10_7A)
        params = lora.add_lora(params, cfg.model.lora_rank, k_lora, cfg.model.lora_modules,
                               cfg.model.lora_convs, skip=adapters.new_weights_mask(params))
    return student, params


def parameter_groups(cfg: ml_collections.ConfigDict, student: Student, params: dict) -> tuple[dict, dict, dict]:
    """(trainable, frozen, aux) of the initial ``params`` (arrays or shapes alike): the trainable
    part gets gradients, optimizer state and EMAs; the frozen part and ``aux`` (VAE, text encoder,
    a frozen teacher copy) do not. The one home of this rule, for the trainer and the planners."""
    mode = cfg.model.trainable if "adapter" in params else "all"
    mask = adapters.trainable_mask(params, mode)
    if lora.has_lora(params):   # the factors and the new weights train; pretrained weights do not
        new = adapters.new_weights_mask(params)
        mask = jax.tree.map(lambda m, t: bool(m and t), mask, lora.trainable_mask(params, new))
    trainable, frozen = partition(params, mask)
    aux = student.aux_params()
    if cfg.objective == "codi" and (cfg.distill.predictor == "teacher" or cfg.distill.guidance_max > 0):
        # The teacher's UNet, frozen: the online one moves under "all" (or its LoRA factors do).
        # The guidance-aware mode's unconditional branch is this teacher too.
        aux["teacher"] = lora.merge(params)["unet"]
    if cfg.objective in ("cm", "flash"):
        # The whole conditional teacher, frozen; the student starts as it (a guidance-aware
        # student's new w embedding is not the teacher's).
        aux["teacher"] = {k: v for k, v in lora.merge(params).items() if k != "w_embed"}
    return trainable, frozen, aux


def abstract_setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, student: Student,
                   params: dict) -> Setup:
    """The ``Setup`` of ``student`` and its initial ``params`` (arrays or shapes) with every tree as
    shapes and shardings only: what ``plan.py`` and the benchmarks compile, and what ``setup``
    fills. No device memory is used."""
    trainable, frozen, aux = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          parameter_groups(cfg, student, params))
    tx, schedule = make_optimizer(cfg.train)
    state = jax.eval_shape(functools.partial(initial_state, cfg, tx, feature_channels=_feature_channels(student)),
                           trainable)
    shard = functools.partial(sharding.tree_shardings, mesh=mesh, min_size=cfg.mesh.min_shard_size)
    state_sh, frozen_sh, aux_sh = shard(state), shard(frozen), shard(aux)
    return Setup(student, sharding.with_shardings(state, state_sh), state_sh,
                 sharding.with_shardings(frozen, frozen_sh), frozen_sh,
                 sharding.with_shardings(aux, aux_sh), aux_sh, tx, schedule)


def setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          built: tuple[Student, dict] | None = None) -> Setup:
    """Teacher, student, frozen/trainable split, optimizer and the initial sharded state.

    The weights are read and adapted in host memory (``built``, by default ``build(cfg)``) and each
    array is placed once, with its sharding. Afterwards no unsharded copy stays on a device: the
    student's teacher keeps only the placed VAE / text encoder and the UNet's shapes."""
    if built is None:
        with jax.default_device(sharding.host_device()):
            built = build(cfg)
    student, params = built
    parts = abstract_setup(cfg, mesh, student, params)
    trainable, frozen, aux = jax.device_get(parameter_groups(cfg, student, params))
    del params, built
    frozen = jax.device_put(frozen, parts.frozen_sharding)
    aux = jax.device_put(aux, parts.aux_sharding)
    params_sh = parts.state_sharding["params"]
    state = jax.jit(functools.partial(initial_state, cfg, parts.tx, feature_channels=_feature_channels(student)),
                    in_shardings=(params_sh,),
                    out_shardings=parts.state_sharding)(jax.device_put(trainable, params_sh))
    teacher = dataclasses.replace(
        student.teacher, unet_params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                  student.teacher.unet_params),
        vae_params=aux.get("vae"), text_params=aux.get("text"))
    return dataclasses.replace(parts, student=dataclasses.replace(student, teacher=teacher),
                               state=state, frozen=frozen, aux=aux)


def _feature_channels(student: Student) -> int:
    """Channels of the UNet encoder's output, which Flash's discriminator head reads."""
    return student.module.unet.arch.block_out_channels[-1]


def initial_state(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation, trainable: dict,
                  feature_channels: int = 0) -> dict:
    """The train state at step 0: the trainable params, θ⁻ (``target``: CoDi / CM), GD's frozen
    teacher of the current round (``round_teacher``), the evaluation EMA (``ema``: what is
    evaluated and exported) and the optimizer state. An entry an objective does not use is {};
    Flash adds its discriminator head (``disc``) and that head's optimizer state."""
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable,
             "target": trainable if cfg.objective in TARGET_OBJECTIVES else {},
             "round_teacher": trainable if cfg.objective == "gd" else {},
             "ema": trainable, "opt_state": tx.init(trainable)}
    if cfg.objective == "flash":
        disc = init_discriminator(cfg, feature_channels)
        state.update(disc=disc, disc_opt_state=discriminator_optimizer(cfg).init(disc))
    return state


def load_conditional_teacher(cfg: ml_collections.ConfigDict) -> tuple[Student, dict]:
    """The exported fine-tuned conditional model of ``model.conditional_teacher`` and its params,
    built with this config's compute options."""
    student, params, _, _ = load_exported(
        cfg.model.conditional_teacher, dtype=cfg.model.dtype, remat=cfg.model.remat,
        attention=cfg.model.attention)
    return student, params


def jit_train_step(cfg: ml_collections.ConfigDict, parts: Setup, mesh: jax.sharding.Mesh,
                   student_steps: int | None = None, first_step: int = 0) -> Callable:
    """The train step (of the GD round ``student_steps`` starting at ``first_step``) jitted over
    ``mesh``, the state donated."""
    return jax.jit(make_train_step(cfg, parts.student, parts.tx, parts.schedule, student_steps, first_step),
                   in_shardings=(parts.state_sharding, parts.frozen_sharding, parts.aux_sharding,
                                 sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                   out_shardings=(parts.state_sharding, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def compile_train_step(cfg: ml_collections.ConfigDict, parts: Setup, mesh: jax.sharding.Mesh, batch: dict,
                       student_steps: int | None = None, first_step: int = 0) -> tuple[Any, throughput.StepCost]:
    """``jit_train_step`` lowered for ``parts``' trees and a batch shaped as ``batch`` (arrays or
    shapes), compiled ahead of time, and XLA's analysis of it. Only shapes and shardings are read,
    so ``parts`` may be abstract (``plan.py``) or hold state already donated."""
    data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
            for k, v in batch.items()}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    lowered = jit_train_step(cfg, parts, mesh, student_steps, first_step).lower(
        parts.abstract_state(), sharding.with_shardings(parts.frozen, parts.frozen_sharding),
        sharding.with_shardings(parts.aux, parts.aux_sharding), data, rng)
    compiled = lowered.compile()
    return compiled, throughput.step_cost(compiled, mesh.devices.flat[0].platform)


def begin_round(parts: Setup) -> Callable:
    """``state -> state`` at a GD round boundary: the student just trained becomes the frozen
    teacher (``round_teacher``) and the start of the next student, whose optimizer starts afresh. The
    teacher lives in the checkpointed state, so a resumed run needs nothing else."""

    def start(state):
        # The evaluation EMA restarts too: it must not average students of other step counts.
        return {"step": state["step"], "params": state["params"], "target": {},
                "round_teacher": state["params"], "ema": state["params"],
                "opt_state": parts.tx.init(state["params"])}

    return jax.jit(start, in_shardings=(parts.state_sharding,), out_shardings=parts.state_sharding,
                   donate_argnums=(0,))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint), then evaluates and
    exports. Returns the evaluation results; raises ``Preempted`` when SIGTERM stopped it."""
    # clu's summary writers load TensorFlow: imported here, so that planning and step benchmarks
    # (which never train) run where TensorFlow is not installed.
    from clu import metric_writers, periodic_actions

    from codi_jax import data as data_lib

    check_resumable(workdir, cfg)  # before anything is built: a refused resume costs nothing
    rounds = training_rounds(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if cfg.train.batch_size % (mesh.size * cfg.train.grad_accum):
        raise ValueError(f"train.batch_size: {cfg.train.batch_size} does not split into "
                         f"{cfg.train.grad_accum} micro-batches over {mesh.size} devices")
    parts = setup(cfg, mesh)
    student, state, frozen, aux = parts.student, parts.state, parts.frozen, parts.aux
    if student.teacher.tokenizer is not None and cfg.data.task == "edit" and not cfg.data.tokenizer:
        # Per-example instructions are tokenized by the data pipeline with the teacher's tokenizer.
        cfg.data.tokenizer = os.path.join(student.teacher.root, "tokenizer")

    mgr = checkpoint_manager(workdir, cfg)
    restored = restore_latest(mgr, parts.abstract_state())
    if restored is not None:
        state = restored
        console.say(f"resumed from step {int(state['step'])}")
    start = int(state["step"])
    step_fn = None
    base_rng = jax.device_put(jax.device_get(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)),
                              sharding.replicated(mesh))
    speed = None  # images/s and MFU between log steps, from the compiled step's FLOPs

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in _flat_config(cfg).items()})
    report = periodic_actions.ReportProgress(num_train_steps=cfg.train.num_steps, writer=writer)
    preempted = PreemptionFlag()
    batches = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size,
                                           seed=cfg.data.seed, start_step=start)
    samplers = JittedSamplers(student)  # compiled once for every evaluation of this run
    pending = None  # metrics of the previous step, fetched one step late to keep the device busy
    try:
        for step in range(start, cfg.train.num_steps):
            round_ = current_round(rounds, step)
            batch = sharding.global_batch(student.with_prompt(next(batches)), mesh)
            if step_fn is None or step == round_.start:
                if step == round_.start and step > 0:
                    state = begin_round(parts)(state)
                step_fn, cost = compile_train_step(cfg, parts, mesh, batch, round_.student_steps, round_.start)
                distributed.wait_for_every_process(f"codi_jax_step_{step}_compiled")
                speed = _log_compiled(cost, cfg, mesh, writer, workdir, step)
            state, metrics = step_fn(state, frozen, aux, batch, base_rng)
            if pending is not None:
                _check_and_log(*pending, writer, cfg, workdir, speed)
            pending = (step, metrics)
            report(step + 1)
            done = step + 1
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.num_steps \
                    and cfg.eval.num_examples > 0:
                evaluate_all(cfg, student, state, frozen, aux, workdir, writer, online=False,
                             samplers=samplers)
                speed.restart(done)  # the evaluation's time is not the step's
            saved = done % cfg.train.checkpoint_every == 0 or done == cfg.train.num_steps
            if saved:
                save_checkpoint(mgr, done, state, cfg, student.config)
            if preempted.stop_after(done):
                if not saved:
                    save_checkpoint(mgr, done, state, cfg, student.config, force=True)
                mgr.wait_until_finished()
                logging.warning("SIGTERM: saved step %d and stopped", done)
                raise Preempted(done)
        if pending is not None:
            _check_and_log(*pending, writer, cfg, workdir, speed, force=True)
    finally:
        mgr.wait_until_finished()
        preempted.restore()

    params = final_params(state, frozen)
    results = {}
    if cfg.eval.num_examples > 0:
        results = evaluate_all(cfg, student, state, frozen, aux, workdir, writer, online=cfg.eval.online,
                               samplers=samplers)
    results["trainable_params"] = trainable_count(state)
    if cfg.export:
        if jax.process_count() > 1:
            # fsdp may split parameters (and the placed VAE, which a teacher without a pipeline
            # folder exports) across processes: every process takes part in gathering them (a
            # collective) before process 0 alone writes the export.
            from jax.experimental import multihost_utils
            params, vae = multihost_utils.process_allgather((params, student.teacher.vae_params), tiled=True)
            student = dataclasses.replace(student, teacher=dataclasses.replace(student.teacher, vae_params=vae))
        if jax.process_index() == 0:
            export(student, params, os.path.join(workdir, "export"), cfg)
    writer.flush()
    return results


def trainable_count(state: dict) -> int:
    """How many parameters the run trains (PE-CoDi's and LoRA's counts against CoDi's)."""
    return int(sum(x.size for x in jax.tree.leaves(state["params"])))


def final_params(state: dict, frozen: dict, weights: str = "ema") -> dict:
    """What is evaluated and exported: the evaluation EMA of the trained weights (``"ema"``, the
    same kind of weights for every objective), or the online weights (``"online"``)."""
    return combine(state["ema"] if weights == "ema" else state["params"], frozen)


def evaluate_all(cfg: ml_collections.ConfigDict, student: Student, state: dict, frozen: dict, aux: dict,
                 workdir: str, writer=None, online: bool = False,
                 samplers: JittedSamplers | None = None) -> dict:
    """Evaluates the EMA weights on every split of ``eval.splits`` (and, with ``online``, the online
    weights on the first), appends each result to ``eval_log.jsonl`` and returns the EMA's result
    on the first split, with the others under ``"splits"`` / ``"online"``."""
    samplers = samplers or JittedSamplers(student)
    step = int(state["step"])
    splits = tuple(cfg.eval.splits) or (cfg.data.eval_split,)
    runs = [(split, "ema") for split in splits] + ([(splits[0], "online")] if online else [])
    out = {}
    for i, (split, weights) in enumerate(runs):
        # eval.json for the first split, <split>.json for the others, eval_online.json.
        name = "eval" if i == 0 else split if weights == "ema" else "eval_online"
        res = evaluate.run(cfg, student, final_params(state, frozen, weights), aux, workdir,
                           writer=writer, step=step, name=name, split=split, samplers=samplers)
        append_jsonl(workdir, "eval_log.jsonl", {"step": step, "split": split, "weights": weights, **res})
        console.say(f"{name} at step {step}: {evaluate.summary_line(res)}")
        if i == 0:
            out = dict(res)
        elif weights == "ema":
            out.setdefault("splits", {})[split] = res
        else:
            out["online"] = res
    return out


def _restore_for(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> tuple[Setup, dict]:
    """The setup of ``cfg`` and the checkpoint of ``workdir`` at ``step`` (default: the newest)."""
    check_resumable(workdir, cfg)
    parts = setup(cfg, sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp))
    mgr = checkpoint_manager(workdir, cfg)
    if step is None:
        restored = restore_latest(mgr, parts.abstract_state())
    elif step in mgr.all_steps():
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
            parts.abstract_state()))).state
    else:
        raise FileNotFoundError(f"no checkpoint of step {step} under {workdir}/checkpoints "
                                f"(it has {sorted(mgr.all_steps())})")
    if restored is None:
        raise FileNotFoundError(f"mode={cfg.mode}: no restorable checkpoint under {workdir}/checkpoints")
    return parts, restored


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                        out: str | None = None) -> dict:
    """``mode=eval``: evaluates the checkpoint of ``workdir`` at ``step`` (default: the newest),
    writing the results to ``out`` (default: ``workdir``)."""
    parts, restored = _restore_for(cfg, workdir, step)
    results = evaluate_all(cfg, parts.student, restored, parts.frozen, parts.aux, out or workdir,
                           online=cfg.eval.online)
    return dict(results, trainable_params=trainable_count(restored))


def export_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                      out: str | None = None) -> str:
    """``mode=export``: writes ``<out or workdir>/export`` from the evaluation EMA of the checkpoint
    at ``step`` (default: the newest; single process)."""
    parts, restored = _restore_for(cfg, workdir, step)
    return export(parts.student, final_params(restored, parts.frozen), os.path.join(out or workdir, "export"), cfg)


def _log_compiled(cost: throughput.StepCost, cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  writer, workdir: str, step: int) -> throughput.Throughput:
    """Logs XLA's FLOPs and memory analysis of the just compiled step (console, TensorBoard,
    ``compile_log.jsonl``) and returns the throughput meter that starts with it."""
    device = mesh.devices.flat[0]
    peak = throughput.peak_flops(device.device_kind, cfg.train.peak_flops_per_chip)
    console.say(f"{cost.summary()}; {device.device_kind} x {mesh.size}: peak "
                + (f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else "unknown (no MFU; set train.peak_flops_per_chip)"))
    record = dict(dataclasses.asdict(cost), peak_bytes=cost.peak_bytes, device_kind=device.device_kind,
                  devices=mesh.size, peak_flops_per_chip=peak)
    writer.write_scalars(step, {f"compile/{k}": float(v) for k, v in record.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    append_jsonl(workdir, "compile_log.jsonl", {"step": step, **record})
    speed = throughput.Throughput(cfg.train.batch_size, cost.flops, peak)
    speed.restart(step)
    return speed


def _check_and_log(step: int, metrics: dict, writer, cfg, workdir: str,
                   speed: throughput.Throughput | None = None, force: bool = False) -> None:
    metrics = jax.device_get(metrics)
    if not metrics.pop("finite"):
        raise NonFiniteLossError(f"step {step + 1}: the loss or its gradient is NaN/Inf "
                                 f"(loss={metrics['loss']}); the parameters were not updated and "
                                 "the last checkpoint holds the last good state")
    if force or (step + 1) % cfg.train.log_every == 0:
        scalars = {k: float(v) for k, v in metrics.items()}
        # Fetching this step's metrics waited for it to finish: the time since the last log point
        # covers exactly the steps in between. Under perf/, apart from the run's train/ values
        # (which are the same on any machine).
        perf = speed.record(step + 1) if speed is not None else {}
        writer.write_scalars(step + 1, {**{f"train/{k}": v for k, v in scalars.items()},
                                        **{f"perf/{k}": v for k, v in perf.items()}})
        console.say(console.progress_line(step + 1, cfg.train.num_steps, scalars["loss"], perf))
        scalars.update(perf)
        # The curve as a small text file, to commit with results.
        append_jsonl(workdir, "train_log.jsonl", {"step": step + 1, **scalars})


def append_jsonl(workdir: str, name: str, record: dict) -> None:
    """Appends ``record`` as one JSON line to ``workdir/name`` (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def _flat_config(cfg: ml_collections.ConfigDict) -> dict:
    flat = traverse_util.flatten_dict(cfg.to_dict(), sep=".")
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
