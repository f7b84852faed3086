"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture Similarity"):
a full-reference distance on VGG16 features whose max-pools are replaced by L2 pooling.

For the input x (in [0, 1]) and the ReLU outputs after conv1_2, 2_2, 3_3, 4_3 and 5_3 (of the
input normalised by ImageNet's mean and std), with channel means μ, variances σ² and the
covariance σ_ab over the picture,

    DISTS(a, b) = 1 − Σ_{k,j} α_kj · (2 μ_a μ_b + c) / (μ_a² + μ_b² + c)
                        + β_kj · (2 σ_ab + c) / (σ_a² + σ_b² + c),      c = 10⁻⁶,

with the learned α, β ≥ 0 normalised by Σα + Σβ (1475 channels: 3 + 64 + 128 + 256 + 512 + 512).

**Expected weight file(s)** (``.safetensors`` or ``.npz``, one file or several, merged; see
``codi_jax/metrics/weights.py`` for converting a ``.pth``):

* the ``DISTS_pytorch`` package's ``weights.pt`` (``alpha`` and ``beta``, each (1, 1475, 1, 1)),
  together with torchvision's ``vgg16`` ImageNet state dict (``features.0.weight``, …; the
  ``classifier`` is ignored), or
* a whole ``DISTS_pytorch.DISTS().state_dict()`` (``stage1.0.weight``, …, ``alpha``, ``beta``;
  its L2-pooling filters and mean / std buffers are constants here).

Inputs are NHWC images in [−1, 1] of the same shape; the result is one distance per image.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.metrics.lpips import VGG16_FEATURES, PairedMetric
from codi_jax.metrics.weights import read_state_dict, to_params

Array = jnp.ndarray

CHANNELS = (3, 64, 128, 256, 512, 512)   # the input, then relu1_2 … relu5_3
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_C = 1e-6
# DISTS's L2 pooling: a normalised 3x3 Hann window (numpy's hanning(5) without its zero ends),
# stride 2, padding 1, applied per channel to the squared features.
_HANN = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]).astype(np.float32) / 4.0


def l2_pool(x: Array) -> Array:
    """√(Hann ∗ x² + 10⁻¹²), stride 2, per channel (NHWC): the anti-aliased pooling DISTS puts
    where VGG16 max-pools."""
    channels = x.shape[-1]
    kernel = jnp.broadcast_to(jnp.asarray(_HANN)[:, :, None, None], (3, 3, 1, channels))
    out = jax.lax.conv_general_dilated(x * x, kernel, (2, 2), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=channels)
    return jnp.sqrt(out + 1e-12)


class DISTSNet(nn.Module):
    """``(a, b) -> (B,)`` DISTS distances for NHWC images in [−1, 1]."""

    @nn.compact
    def __call__(self, a: Array, b: Array) -> Array:
        total = sum(CHANNELS)
        alpha = self.param("alpha", nn.initializers.constant(0.1), (total,))
        beta = self.param("beta", nn.initializers.constant(0.1), (total,))
        batch = a.shape[0]
        x = (jnp.concatenate([a, b]).astype(jnp.float32) + 1.0) / 2.0
        features = [x]
        h = (x - _MEAN) / _STD
        for idx, ch, k, s, p, pool_before in VGG16_FEATURES:
            if pool_before:
                features.append(h)   # the end of a stage, before its pooling
                h = l2_pool(h)
            h = nn.relu(nn.Conv(ch, (k, k), (s, s), padding=((p, p), (p, p)), name=f"features_{idx}")(h))
        features.append(h)
        weight_sum = jnp.sum(alpha) + jnp.sum(beta)
        similarity = jnp.zeros((batch,), jnp.float32)
        start = 0
        for f, ch in zip(features, CHANNELS):
            fa, fb = f[:batch], f[batch:]
            mean_a, mean_b = jnp.mean(fa, axis=(1, 2)), jnp.mean(fb, axis=(1, 2))
            var_a = jnp.mean((fa - mean_a[:, None, None]) ** 2, axis=(1, 2))
            var_b = jnp.mean((fb - mean_b[:, None, None]) ** 2, axis=(1, 2))
            cov = jnp.mean(fa * fb, axis=(1, 2)) - mean_a * mean_b
            structure = (2 * mean_a * mean_b + _C) / (mean_a ** 2 + mean_b ** 2 + _C)
            texture = (2 * cov + _C) / (var_a + var_b + _C)
            a_k, b_k = alpha[start:start + ch] / weight_sum, beta[start:start + ch] / weight_sum
            similarity = similarity + jnp.sum(a_k * structure + b_k * texture, axis=-1)
            start += ch
        return 1.0 - similarity


_STAGE_KEY = re.compile(r"^stage\d+\.(\d+)\.(weight|bias)$")


def _normalize_dists_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        match = _STAGE_KEY.match(key)
        if match:                                   # DISTS_pytorch: stageK.N.* → features.N.*
            out[f"features.{match.group(1)}.{match.group(2)}"] = value
        elif key in ("alpha", "beta"):
            out[key] = np.reshape(value, (-1,))
        elif key.startswith("classifier.") or key in ("mean", "std") or key.endswith(".filter"):
            continue                                # torchvision's classifier; DISTS's constants
        else:
            out[key] = value
    return out


def load_dists(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> PairedMetric:
    """Reads VGG16 + α, β (one file or several, merged; see the module docstring) into DISTS."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    state: dict[str, np.ndarray] = {}
    for path in paths:
        state.update(read_state_dict(path))
    module = DISTSNet()
    example = (jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3)))
    params = to_params(_normalize_dists_keys(state), module, example,
                       context=f"DISTS from {', '.join(os.fspath(p) for p in paths)}")
    return PairedMetric(module, params)
