"""Consistency distillation (CM; Song et al. 2023, Alg. 2) of a fine-tuned conditional teacher.

The CM row of the paper's Table 1: the teacher is the *conditional* model (fine-tuned on the task
with the standard diffusion loss), the student starts from it, and one training example reads

    z_t   = α_t x + σ_t ε                                  t = i/N on the teacher grid, s = t − 1/N
    ẑ_s   = α_s x̂_T(z_t) + σ_s ε̂_T(z_t)                    one DDIM step of the frozen teacher
    f(z, t) = c_skip(t) z + c_out(t) x̂_θ(z, t)             CM boundary parametrization, f(z, 0) = z
    L     = λ(t) d(f_θ(z_t, t), sg f_θ⁻(ẑ_s, s))            θ⁻: EMA target

Same grid, time convention, DDIM update and distances as CoDi (``codi_jax.distill.codi``); the
differences that define the baseline are that ẑ_s comes from the teacher's ODE (not the PREv
predictor), that consistency is measured on x (the consistency function's output), and that the
boundary condition is built into the model. A step costs two student evaluations (online at t,
target at s) and one teacher evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from codi_jax.diffusion.loss import DISTANCES, ModelFn, distance
from codi_jax.diffusion.parametrization import broadcast_to, check_prediction_type, diffuse, \
    ddim_update, to_x_eps
from codi_jax.diffusion.schedule import Schedule
from codi_jax.distill.switches import Switches
from codi_jax.distill.codi import boundary_scalings, sample_grid_index

Array = jnp.ndarray
# teacher(z_t, model_time, cond, context) -> raw prediction of the frozen fine-tuned conditional teacher.
ConditionalTeacherFn = Callable[[Array, Array, Any, Any], Array]

_CHOICES = {
    "timestep_sampling": ("batch", "sample"),
    "distance": DISTANCES,
    "weighting": ("uniform", "inverse_step"),
}


@dataclasses.dataclass(frozen=True)
class CMLossConfig(Switches):
    """Switches of the consistency-distillation objective. Defaults follow Song et al. 2023 (CD with
    a per-example time, uniform λ) and LCM's boundary scalings for VP latent models."""

    CHOICES = _CHOICES

    grid: int = 20                        # teacher grid N, the same as CoDi's for a fair comparison.
    timestep_sampling: str = "sample"     # CM draws n ~ U{1..N} per example.
    distance: str = "l2"                  # l2 (CD-l2) or pseudo_huber (iCT / LCM).
    huber_c: float = 1e-3
    # λ(t): uniform (CM paper) or 1/(σ_t − σ_s) per grid step (improved CT's choice, rescaled so a
    # step of the mean length has weight 1).
    weighting: str = "uniform"
    # c_skip/c_out of ``codi.boundary_scalings`` (LCM): τ = scaling·1000·t, σ_data.
    boundary_sigma_data: float = 0.5
    boundary_timestep_scaling: float = 10.0


def consistency_function(pred: Array, z: Array, t: Array, schedule: Schedule, prediction_type: str,
                         cfg: CMLossConfig) -> Array:
    """f(z, t) = c_skip(t) z + c_out(t) x̂(z, t): the model's x̂ with the CM boundary condition
    f(z, 0) = z built in. Samplers use the same function so that training and sampling agree."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x_hat, _ = to_x_eps(pred.astype(jnp.float32), z, alpha, sigma, prediction_type)
    c_skip, c_out = boundary_scalings(t, cfg)
    f = broadcast_to(c_skip, z) * z + broadcast_to(c_out, z) * x_hat
    # c_out(0) = 0 already gives f(z, 0) = z, but 0·x̂ is NaN when a network's x̂ is not finite at
    # σ = 0 (e.g. an x-space head derived through 1/σ): select z exactly there.
    return jnp.where(broadcast_to(t, z) > 0, f, z)


def make_cm_denoiser(model_fn: Callable[[Array, Array], Array], schedule: Schedule,
                     prediction_type: str, cfg: CMLossConfig = CMLossConfig()
                     ) -> Callable[[Array, Array], tuple[Array, Array]]:
    """``denoise(z, t) -> (f(z, t), ε̂)`` for ``diffusion.consistency_sample`` / ``ddim_sample``:
    like ``diffusion.make_denoiser`` but with the boundary-parametrized x̂ the CM student was
    trained to output. ``model_fn(z, model_time)`` closes over params, condition and context."""
    check_prediction_type(prediction_type)

    def denoise(z: Array, t: Array) -> tuple[Array, Array]:
        t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        x_hat = consistency_function(model_fn(z, schedule.model_time(t_batch)), z, t_batch,
                                     schedule, prediction_type, cfg)
        alpha, sigma = schedule.alpha(t_batch), schedule.sigma(t_batch)
        # ε̂ consistent with x̂; at t = 0 (σ = 0) it is unused by every sampler, keep it finite.
        safe_sigma = jnp.where(sigma > 0, sigma, 1.0)
        eps_hat = (z - broadcast_to(alpha, z) * x_hat) / broadcast_to(safe_sigma, z)
        return x_hat, eps_hat

    return denoise


def make_cm_loss(model_fn: ModelFn, teacher_fn: ConditionalTeacherFn, schedule: Schedule,
                 prediction_type: str, cfg: CMLossConfig = CMLossConfig()
                 ) -> Callable[[Any, Any, Mapping[str, Array], Array], tuple[Array, dict]]:
    """Returns ``loss(online_params, target_params, batch, rng) -> (loss, metrics)``.

    ``model_fn(params, z_t, model_time, cond, context)`` is the student (initialised from the
    teacher) and returns a raw prediction of ``prediction_type``; ``teacher_fn(z_t, model_time,
    cond, context)`` is the frozen fine-tuned conditional teacher of the same type. ``batch`` holds
    ``x`` (B, ...), optionally ``cond`` and ``context``. ``target_params`` are the EMA θ⁻ (update them
    with ``codi.ema_update`` after each step); gradients flow into ``online_params`` only.
    """
    check_prediction_type(prediction_type)

    def f(params, z, t, cond, context):
        pred = model_fn(params, z, schedule.model_time(t), cond, context)
        return consistency_function(pred, z, t, schedule, prediction_type, cfg)

    def loss(online_params, target_params, batch, rng):
        x = batch["x"].astype(jnp.float32)
        cond, context = batch.get("cond"), batch.get("context")
        if cond is not None and cond.shape[0] != x.shape[0]:
            raise ValueError(f"batch: cond has batch size {cond.shape[0]} but x has {x.shape[0]}")
        key_t, key_eps = jax.random.split(rng)
        i = sample_grid_index(key_t, x.shape[0], cfg.grid, cfg.timestep_sampling)
        t = i.astype(jnp.float32) / cfg.grid
        s = (i - 1).astype(jnp.float32) / cfg.grid
        eps = jax.random.normal(key_eps, x.shape, jnp.float32)
        z_t = diffuse(x, eps, schedule.alpha(t), schedule.sigma(t))

        # ẑ_s: one DDIM step of the frozen teacher's probability-flow ODE (the CD estimator).
        teacher_pred = teacher_fn(z_t, schedule.model_time(t), cond, context).astype(jnp.float32)
        x_teacher, eps_teacher = to_x_eps(teacher_pred, z_t, schedule.alpha(t), schedule.sigma(t),
                                          prediction_type)
        z_s = jax.lax.stop_gradient(
            ddim_update(x_teacher, eps_teacher, schedule.alpha(s), schedule.sigma(s)))

        f_t = f(online_params, z_t, t, cond, context)                           # online, with grad
        # EMA target. At s = 0 the boundary condition makes f(ẑ_0, 0) = ẑ_0 (c_skip(0) = 1,
        # c_out(0) = 0), so unlike CoDi's ε-space term the s = 0 examples anchor the student to the
        # teacher's last DDIM step; they are kept.
        f_s = jax.lax.stop_gradient(f(jax.lax.stop_gradient(target_params), z_s, s, cond, context))

        per_example = distance(f_t, f_s, cfg.distance, cfg.huber_c)
        if cfg.weighting == "uniform":
            weight = jnp.ones_like(t)
        else:
            # Normalised by the mean step over the grid, (σ_1 − σ_0)/N, a constant.
            mean_step = (schedule.sigma(jnp.ones(())) - schedule.sigma(jnp.zeros(()))) / cfg.grid
            weight = mean_step / jnp.maximum(schedule.sigma(t) - schedule.sigma(s), 1e-6)
        value = jnp.mean(weight * per_example)
        metrics = {"loss": value, "consistency": jnp.mean(per_example), "t": jnp.mean(t)}
        return value, metrics

    return loss
