"""A distribution distance between two image sets that needs no pretrained network: the sliced
Wasserstein distance (SWD) over multi-scale patches (Karras et al. 2018, ProGAN §5).

Each image is split into a Laplacian pyramid (band-pass levels from full resolution down to
``min_resolution``, plus the low-pass residual); at every level, all 7×7 patches on a regular
stride are descriptors; the SWD of a level is the mean over fixed random unit directions of the
1-D Wasserstein-1 distance between the two sets' projected descriptors. The result is reported
per level and averaged.

**Why SWD, not KID on a random-feature embedding.** The claims to check (Table 1 / Fig. 5) are
about few-step samples being blurry or off-distribution at particular scales; a Laplacian
pyramid measures exactly that, level by level, in pixel units, with no network whose random
weights decide what counts as "different". It is a true metric between the patch distributions
(0 for identical sets, symmetric, exact — no unbiased-estimator noise that can go negative, as
KID's does on small sets), deterministic given ``seed``, and cheap on a CPU.

Two deliberate departures from ProGAN's script: descriptors are *not* normalised per set (ProGAN
standardises each set by its own mean/std, which hides a global colour or brightness shift), and
the two sets may have different sizes (1-D distances compare quantile functions on a common grid).
Values are in pixel units of images in [−1, 1]; multiply by 1e3 for ProGAN-like magnitudes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

_BLUR = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur(x: Array) -> Array:
    """Separable 5-tap binomial blur with edge replication, per channel (NHWC)."""
    k = jnp.asarray(_BLUR)
    x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    h = sum(k[i] * x[:, i:i + x.shape[1] - 4] for i in range(5))
    return sum(k[i] * h[:, :, i:i + h.shape[2] - 4] for i in range(5))


def laplacian_pyramid(images: Array, min_resolution: int = 16) -> list[Array]:
    """[band-pass at H, H/2, …, low-pass residual at ≥ ``min_resolution``] for NHWC images."""
    x = jnp.asarray(images, jnp.float32)
    levels = []
    while min(x.shape[1:3]) // 2 >= min_resolution:
        down = _blur(x)[:, ::2, ::2]
        up = jax.image.resize(down, x.shape, "bilinear")
        levels.append(x - up)
        x = down
    levels.append(x)
    return levels


def patch_descriptors(level: Array, patch_size: int = 7, stride: int | None = None) -> Array:
    """All ``patch_size``² patches on a regular ``stride`` (default patch_size // 2 + 1), flattened:
    (N · patches, patch_size² · C)."""
    stride = stride or patch_size // 2 + 1
    n, h, w, c = level.shape
    if min(h, w) < patch_size:
        raise ValueError(f"patch_size: {patch_size} exceeds the {h}x{w} level; lower min_resolution "
                         "or the patch size")
    patches = jax.lax.conv_general_dilated_patches(
        level, (patch_size, patch_size), (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return patches.reshape(-1, patches.shape[-1])


def _quantiles(sorted_values: Array, num: int) -> Array:
    """The empirical quantile function at q_j = (j + ½)/num, columnwise; for num = len this is the
    sorted values themselves, so equal-size sets compare sorted samples one to one."""
    n = sorted_values.shape[0]
    pos = jnp.clip((jnp.arange(num, dtype=jnp.float32) + 0.5) * (n / num) - 0.5, 0.0, n - 1.0)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    frac = (pos - lo)[:, None]
    return (1.0 - frac) * sorted_values[lo] + frac * sorted_values[hi]


def sliced_wasserstein(a: Array, b: Array, num_projections: int = 128, seed: int = 0) -> float:
    """Mean over ``num_projections`` random unit directions of W1 between the projected (N, D)
    descriptor sets ``a`` and ``b`` (sizes may differ)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptors: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    dirs = jax.random.normal(jax.random.PRNGKey(seed), (a.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = jnp.sort(a @ dirs, axis=0), jnp.sort(b @ dirs, axis=0)
    num = max(a.shape[0], b.shape[0])
    qa = pa if pa.shape[0] == num else _quantiles(pa, num)
    qb = pb if pb.shape[0] == num else _quantiles(pb, num)
    return float(jnp.mean(jnp.abs(qa - qb)))


def _subsample(desc: Array, max_descriptors: int | None, seed: int) -> Array:
    if max_descriptors is None or desc.shape[0] <= max_descriptors:
        return desc
    idx = jax.random.choice(jax.random.PRNGKey(seed), desc.shape[0], (max_descriptors,), replace=False)
    return desc[idx]


def multiscale_swd(images_a: np.ndarray, images_b: np.ndarray, *, patch_size: int = 7,
                   min_resolution: int = 16, num_projections: int = 128,
                   max_descriptors: int | None = 65536, seed: int = 0) -> dict:
    """SWD between two NHWC image sets in [−1, 1] (same H, W, C; any sizes).

    Returns ``{"swd": mean over levels, "levels": {"<resolution>": swd, …, "lowpass<resolution>":
    swd}}``. Descriptors beyond ``max_descriptors`` per level and set are subsampled with a fixed
    key; projections are fixed by ``seed``, so a reference set is compared with every method
    along the same directions.
    """
    a, b = jnp.asarray(images_a, jnp.float32), jnp.asarray(images_b, jnp.float32)
    if a.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"images: need two NHWC sets of one image shape, got {a.shape} and {b.shape}")
    pyr_a, pyr_b = laplacian_pyramid(a, min_resolution), laplacian_pyramid(b, min_resolution)
    levels = {}
    for i, (la, lb) in enumerate(zip(pyr_a, pyr_b)):
        name = f"{'lowpass' if i == len(pyr_a) - 1 else ''}{la.shape[1]}"
        da = _subsample(patch_descriptors(la, patch_size), max_descriptors, seed + 1 + i)
        db = _subsample(patch_descriptors(lb, patch_size), max_descriptors, seed + 1 + i)
        levels[name] = sliced_wasserstein(da, db, num_projections, seed + i)
    return {"swd": float(np.mean(list(levels.values()))), "levels": levels}
