"""Model-output parametrizations (paper eq. 7) and the DDIM update (eqs. 6 and 8).

All diffusion math in this project goes through ``to_x_eps``: whatever a network predicts
(ε, v or x), it is turned into the pair (x̂, ε̂) once, and every sampler and loss works on that pair.
"""

from __future__ import annotations

import jax.numpy as jnp

Array = jnp.ndarray

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: unknown prediction type {prediction_type!r}; "
                         f"known: {list(PREDICTION_TYPES)}")


def broadcast_to(coef: Array, x: Array) -> Array:
    """Reshapes a per-example coefficient (scalar or (B,)) to broadcast against x (B, ...)."""
    coef = jnp.asarray(coef, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def to_x_eps(pred: Array, z_t: Array, alpha: Array, sigma: Array,
             prediction_type: str) -> tuple[Array, Array]:
    """Converts a raw model prediction at z_t = α x + σ ε into (x̂, ε̂).

    ``v_prediction`` is eq. 7: x̂ = α z − σ v̂, ε̂ = α v̂ + σ z (uses σ² = 1 − α²).
    """
    check_prediction_type(prediction_type)
    a, s = broadcast_to(alpha, z_t), broadcast_to(sigma, z_t)
    if prediction_type == "v_prediction":
        return a * z_t - s * pred, a * pred + s * z_t
    if prediction_type == "epsilon":
        return (z_t - s * pred) / a, pred
    return pred, (z_t - a * pred) / s  # "sample"


def from_x_eps(x: Array, eps: Array, alpha: Array, sigma: Array, prediction_type: str) -> Array:
    """The raw prediction a model of ``prediction_type`` should output for (x, ε): the inverse
    of ``to_x_eps`` and the regression target of the standard diffusion loss (v = α ε − σ x)."""
    check_prediction_type(prediction_type)
    a, s = broadcast_to(alpha, x), broadcast_to(sigma, x)
    if prediction_type == "v_prediction":
        return a * eps - s * x
    if prediction_type == "epsilon":
        return eps
    return x


def diffuse(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """Forward process sample z_t = α_t x + σ_t ε (eq. 1, reparametrized)."""
    return broadcast_to(alpha, x) * x + broadcast_to(sigma, x) * eps


def ddim_update(x_hat: Array, eps_hat: Array, alpha_s: Array, sigma_s: Array) -> Array:
    """DDIM step to time s (eq. 6): ẑ_s = α_s x̂ + σ_s ε̂ with ε̂ = (z_t − α_t x̂)/σ_t.

    With (x̂, ε̂) from eq. 7 this is exactly the v-form update of eq. 8; with the true ε in place of
    ε̂ it is the PREv predictor (eq. 12). Both are this one function, called with other inputs.
    """
    return diffuse(x_hat, eps_hat, alpha_s, sigma_s)
