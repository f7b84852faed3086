"""FID: Fréchet distance between Gaussians fitted to Inception-v3 pool features (Heusel et al. 2017).

**Expected weight file.** The FID Inception network of pytorch-fid (``pt_inception-2015-12-05-
6726825d.pth``, the TF 2015-12-05 graph ported to PyTorch; the standard for published FIDs),
converted to ``.safetensors`` or ``.npz`` with its PyTorch key names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, …, ``fc.weight`` of shape (1008, 2048)); see
``codi_jax/metrics/weights.py`` for the conversion one-liner. torchvision's ``inception_v3``
ImageNet state dict (``fc.weight`` (1000, 2048)) is accepted as well and selects the torchvision
block variants, but its FIDs are not comparable with published numbers. ``fc`` and ``AuxLogits``
are not used (FID reads the 2048-d pool features) and ``num_batches_tracked`` is ignored.

Preprocessing follows pytorch-fid: images (NHWC, [-1, 1]) are resized to 299×299 bilinearly
without antialiasing, and the network reads [-1, 1]. The Fréchet distance is computed in float64
NumPy: Tr((Σ₁Σ₂)^½) as Σ √eig(Σ₁^½ Σ₂ Σ₁^½), which is symmetric PSD, so no complex square roots.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.metrics.weights import read_state_dict, to_params
from codi_jax.models.io import WeightFileError

Array = jnp.ndarray
VARIANTS = ("pytorch_fid", "torchvision")
FEATURE_DIM = 2048
INPUT_SIZE = 299


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm whose statistics are parameters named like PyTorch's buffers, so a
    state dict converts by name (``bn.weight`` → ``scale``, ``bn.running_mean`` → ``running_mean``)."""

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """conv (no bias) → BN(eps 1e-3) → ReLU; torchvision's ``BasicConv2d``."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        (ph, pw) = self.padding
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool(x: Array, count_include_pad: bool) -> Array:
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=count_include_pad)


def _max_pool(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int
    count_include_pad: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(
            _avg_pool(x, self.count_include_pad))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    count_include_pad: bool

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool(x, self.count_include_pad))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    # "avg" with/without padded zeros counted, or "max": pytorch-fid's last block (FIDInceptionE_2)
    # max-pools, a quirk of the TF graph that FID numbers depend on.
    pool: str
    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool(x, self.count_include_pad)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """Inception-v3 up to the 2048-d average-pooled features (``pool3``), NHWC, input in [-1, 1]
    at 299×299 (any size ≥ 75 runs). Submodule names are PyTorch's."""

    variant: str = "pytorch_fid"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: unknown value {self.variant!r}; known: {list(VARIANTS)}")
        fid = self.variant == "pytorch_fid"
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        # pytorch-fid's blocks average-pool without counting the padding (the TF graph's behaviour).
        include_pad = not fid
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, include_pad, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, include_pad, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", include_pad, name="Mixed_7b")(x)
        x = InceptionE("max" if fid else "avg", include_pad, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def preprocess(images: Array, size: int | None = INPUT_SIZE) -> Array:
    """NHWC images in [-1, 1] → the network's input: bilinear resize to ``size`` without
    antialiasing (pytorch-fid's ``F.interpolate(..., 'bilinear', align_corners=False)``)."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected NHWC RGB, got shape {images.shape}")
    if size is None or images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=False)


@dataclasses.dataclass
class InceptionFeatures:
    """Callable ``(N, H, W, 3) images in [-1, 1] → (N, 2048) float64 features``, in batches."""

    module: InceptionV3
    params: Any
    input_size: int | None = INPUT_SIZE
    batch_size: int = 50

    def __post_init__(self):
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, preprocess(x, self.input_size)))

    def __call__(self, images: Iterable[np.ndarray] | np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        out = [np.asarray(self._apply(self.params, images[i:i + self.batch_size]), np.float64)
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def _normalize_inception_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Only the pool-feature trunk is used; the classifier, the auxiliary head and BN counters are not.
    return {k: v for k, v in state.items()
            if not (k.startswith(("fc.", "AuxLogits.")) or k.endswith("num_batches_tracked"))}


def detect_variant(state: dict[str, np.ndarray]) -> str:
    """pytorch-fid's FID Inception has a 1008-way ``fc``; torchvision's ImageNet one 1000."""
    fc = state.get("fc.weight")
    if fc is None:
        return "pytorch_fid"
    if fc.shape[0] == 1008:
        return "pytorch_fid"
    if fc.shape[0] == 1000:
        return "torchvision"
    raise WeightFileError(f"fc.weight has shape {fc.shape}; neither the FID Inception (1008 classes) "
                          "nor torchvision's inception_v3 (1000)")


def load_inception(path: str | os.PathLike, variant: str | None = None,
                   input_size: int | None = INPUT_SIZE) -> InceptionFeatures:
    """Reads the Inception-v3 weights (see the module docstring for the file) into a feature
    extractor. ``variant`` defaults to the one the file's ``fc`` identifies."""
    state = read_state_dict(path)
    variant = variant or detect_variant(state)
    module = InceptionV3(variant=variant)
    example = (jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)),)
    params = to_params(_normalize_inception_keys(state), module, example,
                       context=f"Inception-v3 ({variant}) from {os.fspath(path)}")
    return InceptionFeatures(module, params, input_size)


# ----------------------------------------------------------------------- Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: need (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½).

    (Σ₁Σ₂)^½ has the eigenvalues of (Σ₁^½ Σ₂ Σ₁^½)^½, a symmetric PSD matrix, so the trace is a
    sum of real square roots of clipped eigenvalues: no complex parts to discard, and singular
    covariances (fewer samples than dimensions) need no ε-regularisation.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics have different shapes: {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}")
    if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
        return 0.0   # exactly, rather than the ~1e-12 the eigendecompositions round to
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    # Rounding can leave −1e-10 for identical statistics; a distance is not negative.
    return max(value, 0.0)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of (N, D) features."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fid(images_a: np.ndarray, images_b: np.ndarray, extractor: InceptionFeatures) -> float:
    """FID between two image sets (NHWC, [-1, 1]); ``extractor`` from ``load_inception``."""
    return fid_from_features(extractor(images_a), extractor(images_b))
