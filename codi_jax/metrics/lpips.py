"""LPIPS (Zhang et al. 2018, v0.1): a learned perceptual distance on VGG16 or AlexNet features.

    d(a, b) = Σ_l mean_hw  w_l · (f̂_l(a) − f̂_l(b))²,   f̂ = f / ‖f‖ over channels

with f_l the ReLU activations after conv1_2, 2_2, 3_3, 4_3, 5_3 (VGG16) or relu1..5 (AlexNet) of
the input scaled by LPIPS's fixed per-channel shift/scale, and w_l ≥ 0 the learned 1×1 heads.

**Expected weight file(s).** The backbone and the heads, as PyTorch state dicts in ``.safetensors``
or ``.npz`` (one file or several, merged; see ``codi_jax/metrics/weights.py`` for converting a
``.pth``):

* the whole ``lpips.LPIPS(net="vgg"|"alex").state_dict()`` (keys ``net.slice1.0.weight``, …,
  ``lin0.model.1.weight``, …, and the ``scaling_layer`` buffers, which are constants here), or
* torchvision's ``vgg16`` / ``alexnet`` ImageNet state dict (``features.0.weight``, …; the
  ``classifier`` is ignored) together with the LPIPS repository's ``weights/v0.1/vgg.pth`` /
  ``alex.pth`` heads (``lin0.model.1.weight`` of shape (1, C, 1, 1), …).

Inputs are NHWC images in [−1, 1] of the same shape; the result is one distance per image,
differentiable, so it also serves as CoDi's ``perceptual`` CG distance (``perceptual_fn``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.metrics.weights import read_state_dict, to_params

Array = jnp.ndarray

# (torchvision ``features`` index, out channels, kernel, stride, padding, max-pool before it).
VGG16_FEATURES = [(0, 64, 3, 1, 1, False), (2, 64, 3, 1, 1, False),
          (5, 128, 3, 1, 1, True), (7, 128, 3, 1, 1, False),
          (10, 256, 3, 1, 1, True), (12, 256, 3, 1, 1, False), (14, 256, 3, 1, 1, False),
          (17, 512, 3, 1, 1, True), (19, 512, 3, 1, 1, False), (21, 512, 3, 1, 1, False),
          (24, 512, 3, 1, 1, True), (26, 512, 3, 1, 1, False), (28, 512, 3, 1, 1, False)]
_ALEX = [(0, 64, 11, 4, 2, False), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, True),
         (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, False)]
# The indices whose ReLU output LPIPS reads (the ends of lpips' slice1..slice5).
_TAPS = {"vgg": (2, 7, 14, 21, 28), "alex": (0, 3, 6, 8, 10)}
_LAYERS = {"vgg": VGG16_FEATURES, "alex": _ALEX}
# lpips' ScalingLayer: (x − shift) / scale, per RGB channel, for inputs in [−1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class _Head(nn.Module):
    """LPIPS's ``NetLinLayer`` (dropout + 1×1 conv without bias); named so ``linK.model.1.weight``
    converts by name."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Conv(1, (1, 1), use_bias=False, name="model_1")(x)


def _unit_normalize(f: Array) -> Array:
    # lpips' normalize_tensor: f / (‖f‖ + 1e-10). The tiny term inside the sqrt keeps the gradient
    # finite where all channels are 0 (dead ReLUs), which matters when LPIPS is a training loss.
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-20) + 1e-10)


class LPIPSNet(nn.Module):
    """``(a, b) -> (B,)`` LPIPS distances for NHWC images in [−1, 1]."""

    net: str = "alex"

    @nn.compact
    def __call__(self, a: Array, b: Array) -> Array:
        if self.net not in _LAYERS:
            raise ValueError(f"net: unknown value {self.net!r}; known: {sorted(_LAYERS)}")
        convs = {idx: nn.Conv(ch, (k, k), (s, s), padding=((p, p), (p, p)), name=f"features_{idx}")
                 for idx, ch, k, s, p, _ in _LAYERS[self.net]}
        heads = [_Head(name=f"lin{i}") for i in range(5)]
        batch = a.shape[0]
        # Both images through the backbone in one batch.
        x = (jnp.concatenate([a, b]).astype(jnp.float32) - _SHIFT) / _SCALE
        total = jnp.zeros((batch,), jnp.float32)
        layer = 0
        for idx, _, _, _, _, pool_before in _LAYERS[self.net]:
            if pool_before:
                x = (nn.max_pool(x, (3, 3), (2, 2), padding="VALID") if self.net == "alex"
                     else nn.max_pool(x, (2, 2), (2, 2), padding="VALID"))
            x = nn.relu(convs[idx](x))
            if idx in _TAPS[self.net]:
                f = _unit_normalize(x)
                total = total + jnp.mean(heads[layer]((f[:batch] - f[batch:]) ** 2), axis=(1, 2, 3))
                layer += 1
        # XLA's CPU convolutions may round the same image differently in two batch rows (their
        # vectorisation depends on the buffer offset), leaving ~1e-16 for identical inputs; the
        # distance of an image to itself is 0 by definition, and is reported as such.
        identical = jnp.all(a == b, axis=tuple(range(1, a.ndim)))
        return jnp.where(identical, 0.0, total)


_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


def _normalize_lpips_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        match = _SLICE_KEY.match(key)
        if match:                                   # lpips package: net.sliceK.N.* → features.N.*
            out[f"features.{match.group(1)}.{match.group(2)}"] = value
        elif key.startswith(("classifier.", "scaling_layer.")):
            continue                                # torchvision's classifier; lpips' constants
        else:
            out[key] = value
    return out


@dataclasses.dataclass
class PairedMetric:
    """Callable ``(a, b) -> (B,)`` distances of a full-reference network (jitted, differentiable):
    LPIPS from ``load_lpips``, DISTS from ``dists.load_dists`` (or random params, for tests)."""

    module: nn.Module
    params: Any

    def __post_init__(self):
        self._apply = jax.jit(lambda p, a, b: self.module.apply({"params": p}, a, b))

    def __call__(self, a: Array, b: Array) -> Array:
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"images: need two NHWC RGB batches of one shape, got {a.shape} and {b.shape}")
        return self._apply(self.params, a, b)


def load_lpips(paths: str | os.PathLike | Sequence[str | os.PathLike], net: str = "alex") -> PairedMetric:
    """Reads backbone + heads (one file or several, merged; see the module docstring) into LPIPS."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    state: dict[str, np.ndarray] = {}
    for path in paths:
        state.update(read_state_dict(path))
    module = LPIPSNet(net=net)
    example = (jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3)))
    params = to_params(_normalize_lpips_keys(state), module, example,
                       context=f"LPIPS ({net}) from {', '.join(os.fspath(p) for p in paths)}")
    return PairedMetric(module, params)
