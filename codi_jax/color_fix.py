"""Wavelet colour correction of super-resolution outputs.

Diffusion SR models, latent ones above all, return pictures whose colours drift from the input's:
the autoencoder shifts colours it saw little of, and a 1-step output leans toward the prior's mean
colour. Diffusion SR pipelines correct this at inference by keeping the output's high frequencies
and taking the low frequencies from the (bicubic-upsampled) input ("wavelet color fix" of
"Exploiting Diffusion Prior for Real-World Image Super-Resolution", StableSR, Wang et al. 2023,
arXiv:2305.07015).

The low-pass filter is an à trous cascade of the separable binomial kernel [1, 2, 1] / 4 with
dilations 1, 2, 4, …; ``levels`` = log2(scale) keeps from the input only the band a
scale-times-smaller picture carries (periods of 2·scale pixels and more).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def low_pass(images: Array, levels: int) -> Array:
    """(B, H, W, C) → the à trous binomial low-pass of ``levels`` levels (edge-replicated borders)."""
    x = images
    for level in range(levels):
        d = 2**level
        for axis in (1, 2):
            n = x.shape[axis]
            pad = [(0, 0)] * x.ndim
            pad[axis] = (d, d)
            p = jnp.pad(x, pad, mode="edge")
            take = lambda start: jax.lax.slice_in_dim(p, start, start + n, axis=axis)
            x = 0.25 * take(0) + 0.5 * take(d) + 0.25 * take(2 * d)
    return x


def levels_for_scale(scale: int) -> int:
    """The cascade depth for an upsampling factor: log2(scale), at least 1."""
    if scale < 2:
        raise ValueError(f"color fix: needs an upsampling factor of at least 2, got {scale}")
    return max(1, round(math.log2(scale)))


def wavelet_color_fix(images: Array, reference: Array, levels: int) -> Array:
    """``images`` with their low frequencies replaced by ``reference``'s (same shape, e.g. the
    bicubic-upsampled low-resolution input), clipped to [−1, 1]."""
    if images.shape != reference.shape:
        raise ValueError(f"color fix: images {images.shape} and reference {reference.shape} differ in shape")
    fixed = images - low_pass(images, levels) + low_pass(reference, levels)
    return jnp.clip(fixed, -1.0, 1.0)
