"""The standard diffusion (denoising) loss and the per-example distances the losses share.

The denoising loss pretrains the embedded teacher and fine-tunes the conditional baselines
(LDM-SR / ControlNet rows of the paper's Table 1); CoDi's own objective lives in
``codi_jax.distill.codi`` and reuses ``distance`` and ``snr_weight`` from here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from codi_jax.diffusion.parametrization import check_prediction_type, diffuse, from_x_eps
from codi_jax.diffusion.schedule import DiscreteSchedule, Schedule

Array = jnp.ndarray
# model(params, z_t, model_time, cond, context) -> raw prediction (ε, v or x) shaped like z_t.
ModelFn = Callable[[Any, Array, Array, Any, Any], Array]

DISTANCES = ("l2", "l1", "pseudo_huber")
SNR_WEIGHTINGS = ("none", "min_snr")


def distance(a: Array, b: Array, kind: str = "l2", huber_c: float = 1e-3) -> Array:
    """Per-example distance, averaged over all non-batch dimensions, computed in float32."""
    if kind not in DISTANCES:
        raise ValueError(f"distance: unknown distance {kind!r}; known: {list(DISTANCES)}")
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    axes = tuple(range(1, diff.ndim))
    if kind == "l2":
        return jnp.mean(diff**2, axis=axes)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff), axis=axes)
    # Pseudo-Huber (Song & Dhariwal 2023; LCM): smooth l1 with quadratic core of width c.
    return jnp.mean(jnp.sqrt(diff**2 + huber_c**2) - huber_c, axis=axes)


def snr_weight(logsnr: Array, space: str, kind: str = "none", gamma: float = 5.0) -> Array:
    """Per-example loss weight. ``min_snr`` is Min-SNR-γ (Hang et al. 2023) expressed for a
    distance measured in ``space`` ("eps", "v" or "x"): a truncated SNR weight on x."""
    if kind not in SNR_WEIGHTINGS:
        raise ValueError(f"snr_weighting: unknown weighting {kind!r}; known: {list(SNR_WEIGHTINGS)}")
    if kind == "none":
        return jnp.ones_like(logsnr)
    snr = jnp.exp(logsnr)
    clipped = jnp.minimum(snr, gamma)
    # ‖ε − ε̂‖² = snr·‖x − x̂‖², ‖v − v̂‖² = (snr + 1)·‖x − x̂‖²: divide so the x-space weight is min(snr, γ).
    return {"eps": clipped / snr, "v": clipped / (snr + 1.0), "x": clipped}[space]


def sample_time(rng: Array, batch_size: int, schedule: Schedule) -> Array:
    """Training times: uniform over the discrete training steps k = 1..T (t = k/T), or uniform
    on (0, 1] for a continuous schedule."""
    if isinstance(schedule, DiscreteSchedule):
        n = schedule.num_train_timesteps
        return jax.random.randint(rng, (batch_size,), 1, n + 1).astype(jnp.float32) / n
    return 1.0 - jax.random.uniform(rng, (batch_size,))


def make_diffusion_loss(model_fn: ModelFn, schedule: Schedule, prediction_type: str, *,
                        snr_weighting: str = "none", snr_gamma: float = 5.0
                        ) -> Callable[[Any, dict, Array], tuple[Array, dict]]:
    """The standard denoising loss: ‖model(z_t) − target‖² with the target of ``prediction_type``.

    Returns ``loss(params, batch, rng) -> (loss, metrics)``; ``batch`` has ``x`` (clean data or
    latents), optional ``cond`` and ``context``.
    """
    check_prediction_type(prediction_type)
    snr_weight(jnp.zeros(()), "x", snr_weighting)  # Validate the name now, not at trace time.
    space = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}[prediction_type]

    def loss(params: Any, batch: dict, rng: Array) -> tuple[Array, dict]:
        x = batch["x"]
        key_t, key_eps = jax.random.split(rng)
        t = sample_time(key_t, x.shape[0], schedule)
        eps = jax.random.normal(key_eps, x.shape, x.dtype)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        z_t = diffuse(x, eps, alpha, sigma)
        pred = model_fn(params, z_t, schedule.model_time(t), batch.get("cond"), batch.get("context"))
        target = from_x_eps(x, eps, alpha, sigma, prediction_type)
        per_example = distance(pred, target, "l2")
        weight = snr_weight(schedule.logsnr(t), space, snr_weighting, snr_gamma)
        value = jnp.mean(weight * per_example)
        return value, {"loss": value, "mse": jnp.mean(per_example)}

    return loss
