"""Classifier-free guidance (Ho & Salimans 2022) and the guidance weight as a model input (Meng et
al. 2023, "On Distillation of Guided Diffusion Models", §3.1).

The combination, with this codebase's weight convention (diffusers' ``guidance_scale`` is 1 + w)::

    x̂^w = (1 + w) x̂(c) − w x̂(∅)        w = 0: the conditional model

It is affine in the raw prediction, so the same w combines ε̂, v̂ or x̂ alike (for one z_t).

A guidance-aware student takes w as an input and needs one evaluation per step instead of two.
``model_fn(params, z, model_time, cond, context)`` has no slot for w, so such a model receives
``cond = {"cond": c, "w": w}`` and ``w_conditioned`` turns it into ``c + E(w)``: sinusoidal features
of w through a learned linear map (``params["w_embed"]``), broadcast over the spatial axes and
*added to the condition* (image or one-hot), or to every text token with ``into="context"``.
The map starts at zero, so a w-conditioned model starts exactly as the model it wraps, and w flows
through the encoder that already reads c (eq. 10's, or a ControlNet's); the UNet needs no new input.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from codi_jax.diffusion.parametrization import broadcast_to

Array = jnp.ndarray
# model_fn(params, z_t, model_time, cond, context) -> raw prediction
ModelFn = Callable[[Any, Array, Array, Any, Any], Array]
W_EMBED = "w_embed"


def guided_prediction(x_cond: Array, x_uncond: Array, w: Array) -> Array:
    """x̂^w = (1 + w) x̂_c − w x̂_∅ with per-example weight w (B,) (Meng et al. eq. 2)."""
    return broadcast_to(1.0 + w, x_cond) * x_cond - broadcast_to(w, x_uncond) * x_uncond


def guidance_features(w: Array, num_frequencies: int = 8) -> Array:
    """(B,) → (B, 2F + 1): w itself and sin/cos of w at geometric frequencies 1/16 … 4, which
    resolve w over the usual guidance range [0, 14] (the timestep embedding's recipe, scaled)."""
    w = jnp.asarray(w, jnp.float32)
    freqs = jnp.exp(jnp.linspace(jnp.log(1.0 / 16.0), jnp.log(4.0), num_frequencies))
    angles = w[:, None] * freqs[None]
    return jnp.concatenate([w[:, None], jnp.sin(angles), jnp.cos(angles)], axis=-1)


def init_w_conditioned(model_params: Mapping[str, Any], channels: int, num_frequencies: int = 8) -> dict:
    """Parameters of ``w_conditioned(model_fn)``: the model's own (a dict) plus ``w_embed``, the
    zero-initialised map from the guidance features to ``channels`` (the last axis of the
    condition, or of the text context with ``into="context"``): at initialisation w is ignored."""
    if W_EMBED in model_params:
        raise ValueError(f"model params already hold a {W_EMBED!r} entry")
    return {**model_params, W_EMBED: {"kernel": jnp.zeros((2 * num_frequencies + 1, channels), jnp.float32)}}


def w_conditioned(model_fn: ModelFn, into: str = "cond") -> ModelFn:
    """Wraps a conditional ``model_fn`` into one that takes ``cond = {"cond": c, "w": w}`` and
    adds the learned embedding of w to c (``into="cond"``) or to every context token
    (``into="context"``). Params are ``init_w_conditioned``'s: ``model_fn`` gets them without
    ``w_embed``."""
    if into not in ("cond", "context"):
        raise ValueError(f"into: unknown value {into!r}; known: ['cond', 'context']")

    def fn(params, z_t, model_time, cond, context):
        if not isinstance(cond, Mapping) or "w" not in cond:
            raise ValueError("cond: a w-conditioned model needs cond = {'cond': c, 'w': w}")
        kernel = params[W_EMBED]["kernel"]
        model_params = {k: v for k, v in params.items() if k != W_EMBED}
        emb = guidance_features(cond["w"], (kernel.shape[0] - 1) // 2) @ kernel   # (B, C)
        c = cond.get("cond")
        target = c if into == "cond" else context
        if target is None:
            raise ValueError(f"into: {into!r} but the batch has no {into} to add the w embedding to")
        shifted = target + emb.reshape(emb.shape[:1] + (1,) * (target.ndim - 2) + emb.shape[1:]
                                       ).astype(target.dtype)
        if into == "cond":
            return model_fn(model_params, z_t, model_time, shifted, context)
        return model_fn(model_params, z_t, model_time, c, shifted)

    return fn


def with_w(cond: Any, w: Array) -> dict:
    """The condition a w-conditioned model reads: ``{"cond": cond, "w": w}``."""
    return {"cond": cond, "w": jnp.asarray(w, jnp.float32)}


def sample_w(rng: Array, batch_size: int, w_min: float, w_max: float) -> Array:
    """w ~ U[w_min, w_max] per example."""
    return jax.random.uniform(rng, (batch_size,), jnp.float32, w_min, w_max)
