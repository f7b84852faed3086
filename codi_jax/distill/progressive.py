"""Guided / progressive distillation (GD): Meng et al. 2023, "On Distillation of Guided Diffusion
Models" (arXiv:2210.03142) §3, on top of Salimans & Ho 2022 (progressive distillation, their Alg. 2).

Stage one (``make_guided_stage_one_loss``, Meng eq. 3) distils a classifier-free-guided teacher,
x̂^w = (1 + w) x̂_c − w x̂_∅, into one model that takes the guidance weight w as an input, for
w ~ U[w_min, w_max]. It only applies where a condition can be dropped (text, class labels); the
SR teacher of Table 1 is unguided and starts at stage two directly. No trainer objective selects
stage one yet (it is tested on its own, in tests/test_baselines.py); the trainer's guidance-aware
CoDi and Flash modes take w the same way.

Stage two (``make_progressive_loss``) halves the number of sampling steps per round: a student
of N steps (t = i/N) regresses, in one DDIM step t → t − 1/N, onto the point reached by two
DDIM steps of the frozen teacher at 2N steps (t → t − 1/(2N) → t − 1/N):

    z_t   = α_t x + σ_t ε
    z_t'  = DDIM(teacher at z_t,  t  → t' = t − 1/(2N))
    z_t'' = DDIM(teacher at z_t', t' → t'' = t − 1/N)
    x̃     = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)   the x̂ whose single DDIM step
                                                                   t → t'' lands on z_t''
    L     = w(λ_t) ‖x̃ − x̂_θ(z_t)‖²                               w = max(SNR_t, 1), "truncated SNR"

``progressive_distillation`` runs the rounds N → N/2 → … → target steps, each student starting from
the previous one (which is also its teacher), through a caller-supplied ``train_round``. The
trainer (objective ``gd``) runs the same rounds from ``round_schedule`` inside its checkpointed
loop instead, keeping each round's teacher in the train state so a preempted run resumes.

**How w reaches our models**: ``diffusion/guidance.py``'s ``w_conditioned`` (the student receives
``cond = {"cond": c, "w": w}``; CoDi's and Flash's guidance-aware modes use the same embedding).
Every loss and sampler here just passes ``cond`` along, so stage two distils the w-conditioned
model unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from codi_jax.diffusion.loss import ModelFn, distance, sample_time
from codi_jax.diffusion.parametrization import broadcast_to, check_prediction_type, diffuse, \
    ddim_update, to_x_eps
from codi_jax.diffusion.guidance import guided_prediction, sample_w
from codi_jax.diffusion.schedule import Schedule
from codi_jax.distill.switches import Switches
from codi_jax.distill.codi import sample_grid_index

Array = jnp.ndarray
# teacher(z_t, model_time, cond, context) -> raw prediction of the frozen teacher (same type as the student).
ConditionalTeacherFn = Callable[[Array, Array, Any, Any], Array]
# train_round(loss_fn, init_params, steps) -> params; loss_fn(params, batch, rng) -> (loss, metrics).
TrainRound = Callable[[Callable[[Any, Mapping[str, Any], Array], tuple[Array, dict]], Any, int], Any]

_CHOICES = {
    "timestep_sampling": ("batch", "sample"),
    "weighting": ("truncated_snr", "snr_plus_one", "none"),
}


def round_schedule(teacher_steps: int, target_steps: int) -> list[int]:
    """The students' step counts, one per round: ``teacher_steps``/2, /4, … down to ``target_steps``."""
    if target_steps < 1 or teacher_steps < target_steps:
        raise ValueError(f"teacher_steps/target_steps: need teacher_steps >= target_steps >= 1, "
                         f"got {teacher_steps} and {target_steps}")
    steps, n = [], teacher_steps
    while n > target_steps:
        if n % 2:
            raise ValueError(f"teacher_steps: {teacher_steps} is not {target_steps}·2^k; rounds halve "
                             f"the steps and {n} is odd")
        n //= 2
        steps.append(n)
    if n != target_steps:
        raise ValueError(f"teacher_steps: {teacher_steps} is not {target_steps}·2^k")
    return steps


@dataclasses.dataclass(frozen=True)
class ProgressiveLossConfig(Switches):
    """Switches of the GD objectives; defaults are Salimans & Ho's / Meng et al.'s choices."""

    CHOICES = _CHOICES

    # The rounds of stage two: students of teacher_steps/2, /4, … down to target_steps steps.
    teacher_steps: int = 32
    target_steps: int = 4
    timestep_sampling: str = "sample"     # i ~ U{1..N} per example (Salimans & Ho, Alg. 2).
    weighting: str = "truncated_snr"      # max(SNR, 1) on ‖x̃ − x̂‖²; "snr_plus_one" is their other.
    # Stage one: w ~ U[w_min, w_max] (Meng et al. use [0, 4] for pixel ImageNet, [2, 14] for SD).
    w_min: float = 0.0
    w_max: float = 4.0

    def check(self) -> None:
        if not self.w_min <= self.w_max:
            raise ValueError(f"w_min: must not exceed w_max, got [{self.w_min}, {self.w_max}]")
        self.rounds()

    def rounds(self) -> list[int]:
        """The student step count of each round (``round_schedule``)."""
        return round_schedule(self.teacher_steps, self.target_steps)


def x_space_weight(logsnr: Array, kind: str) -> Array:
    """Weight on an x-space squared error: max(SNR, 1) ("truncated SNR", = max(‖x − x̂‖², ‖ε − ε̂‖²)),
    SNR + 1 (= the v-prediction loss) or 1."""
    if kind == "none":
        return jnp.ones_like(logsnr)
    snr = jnp.exp(logsnr)
    return jnp.maximum(snr, 1.0) if kind == "truncated_snr" else snr + 1.0


def two_step_target(x_hat_fn: Callable[[Array, Array], Array], z_t: Array, t: Array, t_mid: Array,
                    t_end: Array, schedule: Schedule) -> Array:
    """x̃: the signal prediction whose single DDIM step t → t_end lands where two DDIM steps of
    ``x_hat_fn(z, t) -> x̂`` (t → t_mid → t_end) land. Salimans & Ho, Alg. 2."""

    def ddim(z, a, sig, x_hat, a_next, sig_next):
        eps_hat = (z - broadcast_to(a, z) * x_hat) / broadcast_to(sig, z)
        return ddim_update(x_hat, eps_hat, a_next, sig_next)

    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_m, s_m = schedule.alpha(t_mid), schedule.sigma(t_mid)
    a_e, s_e = schedule.alpha(t_end), schedule.sigma(t_end)
    z_mid = ddim(z_t, a_t, s_t, x_hat_fn(z_t, t), a_m, s_m)
    z_end = ddim(z_mid, a_m, s_m, x_hat_fn(z_mid, t_mid), a_e, s_e)
    ratio = broadcast_to(s_e / s_t, z_t)
    return (z_end - ratio * z_t) / (broadcast_to(a_e, z_t) - ratio * broadcast_to(a_t, z_t))


def make_progressive_loss(model_fn: ModelFn, teacher_fn: ConditionalTeacherFn, schedule: Schedule,
                          prediction_type: str, student_steps: int,
                          cfg: ProgressiveLossConfig = ProgressiveLossConfig()
                          ) -> Callable[[Any, Mapping[str, Any], Array], tuple[Array, dict]]:
    """One round of progressive distillation: ``loss(params, batch, rng) -> (loss, metrics)``.

    The student (``model_fn(params, z_t, model_time, cond, context)``) samples in
    ``student_steps`` DDIM steps on t = i/N; the frozen ``teacher_fn(z_t, model_time, cond,
    context)`` in 2N. Both return raw predictions of ``prediction_type``. ``batch`` holds ``x`` and
    optionally ``cond`` (for a w-conditioned model, ``{"cond": c, "w": w}``) and ``context``.
    Same signature as ``diffusion.make_diffusion_loss``: there is no EMA target in GD.
    """
    check_prediction_type(prediction_type)
    if student_steps < 1:
        raise ValueError(f"student_steps: must be at least 1, got {student_steps}")

    def teacher_x_hat(cond, context):
        def x_hat_fn(z, t):
            pred = teacher_fn(z, schedule.model_time(t), cond, context).astype(jnp.float32)
            return to_x_eps(pred, z, schedule.alpha(t), schedule.sigma(t), prediction_type)[0]
        return x_hat_fn

    def loss(params, batch, rng):
        x = batch["x"].astype(jnp.float32)
        cond, context = batch.get("cond"), batch.get("context")
        key_t, key_eps = jax.random.split(rng)
        i = sample_grid_index(key_t, x.shape[0], student_steps, cfg.timestep_sampling)
        n = float(student_steps)
        t = i.astype(jnp.float32) / n
        t_mid = (i.astype(jnp.float32) - 0.5) / n
        t_end = (i - 1).astype(jnp.float32) / n
        eps = jax.random.normal(key_eps, x.shape, jnp.float32)
        z_t = diffuse(x, eps, schedule.alpha(t), schedule.sigma(t))

        x_tilde = jax.lax.stop_gradient(
            two_step_target(teacher_x_hat(cond, context), z_t, t, t_mid, t_end, schedule))
        pred = model_fn(params, z_t, schedule.model_time(t), cond, context).astype(jnp.float32)
        x_hat, _ = to_x_eps(pred, z_t, schedule.alpha(t), schedule.sigma(t), prediction_type)
        per_example = distance(x_hat, x_tilde, "l2")
        value = jnp.mean(x_space_weight(schedule.logsnr(t), cfg.weighting) * per_example)
        return value, {"loss": value, "x_mse": jnp.mean(per_example), "t": jnp.mean(t)}

    return loss


# ------------------------------------------------------------------------ stage one: guidance


def make_guided_stage_one_loss(student_fn: ModelFn, teacher_fn: ConditionalTeacherFn,
                               uncond_fn: Callable[[Any, Any], tuple[Any, Any]], schedule: Schedule,
                               prediction_type: str,
                               cfg: ProgressiveLossConfig = ProgressiveLossConfig()
                               ) -> Callable[[Any, Mapping[str, Any], Array], tuple[Array, dict]]:
    """Meng et al. eq. 3: ``loss(params, batch, rng) -> (loss, metrics)``.

    ``teacher_fn(z_t, model_time, cond, context)`` is the frozen conditional teacher trained with
    condition dropout; ``uncond_fn(cond, context) -> (cond_∅, context_∅)`` gives its unconditional
    inputs (e.g. the empty prompt's embedding, a zero image). ``student_fn`` is
    ``w_conditioned(model_fn)``: it receives ``{"cond": cond, "w": w}``. Per example
    w ~ U[w_min, w_max] and t ~ the training-time distribution; the student regresses in x space
    onto x̂^w = (1 + w) x̂_c − w x̂_∅ with the truncated-SNR weight. Costs 1 student + 2 teacher
    evaluations.
    """
    check_prediction_type(prediction_type)

    def loss(params, batch, rng):
        x = batch["x"].astype(jnp.float32)
        cond, context = batch.get("cond"), batch.get("context")
        key_t, key_w, key_eps = jax.random.split(rng, 3)
        t = sample_time(key_t, x.shape[0], schedule)
        w = sample_w(key_w, x.shape[0], cfg.w_min, cfg.w_max)
        eps = jax.random.normal(key_eps, x.shape, jnp.float32)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        z_t = diffuse(x, eps, alpha, sigma)
        model_time = schedule.model_time(t)

        def teacher_x(c, ctx):
            pred = teacher_fn(z_t, model_time, c, ctx).astype(jnp.float32)
            return to_x_eps(pred, z_t, alpha, sigma, prediction_type)[0]

        cond_u, context_u = uncond_fn(cond, context)
        x_c, x_u = teacher_x(cond, context), teacher_x(cond_u, context_u)
        x_guided = jax.lax.stop_gradient(guided_prediction(x_c, x_u, w))
        pred = student_fn(params, z_t, model_time, {"cond": cond, "w": w}, context).astype(jnp.float32)
        x_hat, _ = to_x_eps(pred, z_t, alpha, sigma, prediction_type)
        per_example = distance(x_hat, x_guided, "l2")
        value = jnp.mean(x_space_weight(schedule.logsnr(t), cfg.weighting) * per_example)
        return value, {"loss": value, "x_mse": jnp.mean(per_example), "w": jnp.mean(w)}

    return loss


def with_guidance_weight(batch: Mapping[str, Any], rng: Array,
                         cfg: ProgressiveLossConfig = ProgressiveLossConfig()) -> dict:
    """Stage-two batches of a w-conditioned model: ``cond`` → ``{"cond": cond, "w": w}`` with
    w ~ U[w_min, w_max] per example, so each round distils the whole guidance range."""
    n = batch["x"].shape[0]
    w = sample_w(rng, n, cfg.w_min, cfg.w_max)
    return {**batch, "cond": {"cond": batch.get("cond"), "w": w}}


# ------------------------------------------------------------------------------- the rounds


@dataclasses.dataclass(frozen=True)
class Round:
    """One finished round: the student now samples in ``student_steps`` DDIM steps."""

    student_steps: int
    teacher_steps: int
    params: Any


def progressive_distillation(model_fn: ModelFn, teacher_params: Any, schedule: Schedule,
                             prediction_type: str, train_round: TrainRound, *, teacher_steps: int,
                             target_steps: int, steps_per_round: int | Sequence[int],
                             cfg: ProgressiveLossConfig = ProgressiveLossConfig()) -> list[Round]:
    """Runs the rounds N → N/2 → … → ``target_steps``; returns one ``Round`` per halving.

    Round r builds ``make_progressive_loss`` with the previous params frozen as the teacher
    (``model_fn(prev, …)``; round 0's teacher is ``teacher_params`` sampled at ``teacher_steps``)
    and calls ``train_round(loss_fn, init_params=prev, steps)``; the student starts from its
    teacher, as in Salimans & Ho. ``steps_per_round`` is one budget or one per round (Meng et al.
    train the last, fewest-step rounds longer). The teacher's params are closed over by
    ``loss_fn``: a trainer that jits it for a large model should pass them as an argument instead
    (``make_progressive_loss`` with a ``teacher_fn`` reading them from there).
    """
    student_steps = round_schedule(teacher_steps, target_steps)
    budgets = ([steps_per_round] * len(student_steps) if isinstance(steps_per_round, int)
               else list(steps_per_round))
    if len(budgets) != len(student_steps):
        raise ValueError(f"steps_per_round: {len(student_steps)} rounds ({teacher_steps} → "
                         f"{target_steps} steps) but {len(budgets)} budgets")

    rounds: list[Round] = []
    params, n = teacher_params, teacher_steps
    for budget in budgets:
        frozen = jax.lax.stop_gradient(params)

        def teacher_fn(z, model_time, cond, context, frozen=frozen):
            return model_fn(frozen, z, model_time, cond, context)

        loss_fn = make_progressive_loss(model_fn, teacher_fn, schedule, prediction_type, n // 2, cfg)
        params = train_round(loss_fn, params, budget)
        rounds.append(Round(student_steps=n // 2, teacher_steps=n, params=params))
        n //= 2
    return rounds
