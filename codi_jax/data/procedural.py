"""Procedural pictures: dead leaves (with their exact depth), shapes, gradients and textures.

The embedded natural pictures are a handful; a model trained on them alone learns those pictures,
not super-resolution. Dead-leaves images (occluding shapes whose sizes follow a power law) have the
scale invariance and edge statistics of natural images and are known to train restoration models
that generalise (Achddou et al. 2021, "Synthetic images as a regularity prior for image
restoration neural networks"). Every picture is a pure function of its seed, so a record index
is enough to rebuild it on any machine.

Depth: each leaf lies in front of the leaves drawn before it, so the leaf order is an exact depth
ordering; ``depth`` is that order (near = large, like a disparity map; the depth task normalises
it per crop).
"""
from __future__ import annotations

import numpy as np


def _palette(rng: np.random.Generator, n: int = 8, vivid: float = 0.0) -> np.ndarray:
    """n colours of moderate saturation around random grey levels (uniform RGB would make every
    picture a saturated confetti that natural pictures never are); a ``vivid`` fraction of them
    anywhere in the RGB cube instead, so that training sees saturated colours (the mini_sd README
    measures what that did to its autoencoder: nothing). ``vivid=0`` draws exactly the numbers
    it always did, so every seed's picture, and every number measured on one, stays the same."""
    value = rng.random((n, 1))
    saturation = rng.uniform(0.0, 0.6, (n, 1))
    if vivid > 0:
        saturation = np.where(rng.random((n, 1)) < vivid, 1.0, saturation)
    return value * (1.0 - saturation) + saturation * rng.random((n, 3))


def _colour(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    return np.clip(palette[rng.integers(len(palette))] + rng.normal(0.0, 0.05, 3), 0.0, 1.0)


def _fill(rng: np.random.Generator, palette: np.ndarray, h: int, w: int) -> np.ndarray:
    """An HxWx3 float texture for one leaf: flat colour, linear gradient, grating or smooth noise."""
    base = _colour(rng, palette)
    kind = rng.choice(4, p=(0.45, 0.25, 0.15, 0.15))
    if kind == 0:
        return np.broadcast_to(base, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == 1:
        other = _colour(rng, palette)
        angle = rng.uniform(0, 2 * np.pi)
        u = (np.cos(angle) * xx + np.sin(angle) * yy)
        u = (u - u.min()) / max(np.ptp(u), 1e-6)
        return base + u[..., None] * (other - base)
    if kind == 2:
        other = _colour(rng, palette)
        angle, period = rng.uniform(0, np.pi), rng.uniform(2.5, 16.0)
        u = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        return base + u[..., None] * (other - base)
    amplitude = rng.uniform(0.05, 0.3)
    coarse = rng.standard_normal((max(h // 4, 1) + 1, max(w // 4, 1) + 1))
    noise = np.kron(coarse, np.ones((4, 4)))[:h, :w]
    return base + amplitude * noise[..., None] * np.sign(base - 0.5 + 1e-3)


def dead_leaves(seed: int, size: int = 128, r_min: float = 3.0, r_max: float = 48.0,
                max_leaves: int = 250, vivid: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A dead-leaves picture (size x size x 3 uint8) and its depth (size x size x 1 float32).

    Radii follow p(r) ∝ r⁻³ on [r_min, r_max] (scale invariance); shapes are discs, ellipses and
    rotated rectangles; about a third of the pictures get a global defocus blur, so smooth regions
    and soft edges are represented too. ``vivid``: the fraction of palette colours drawn from
    the whole RGB cube (``_palette``).
    """
    rng = np.random.default_rng([0x5EED, seed])
    palette = _palette(rng, vivid=vivid)
    img = np.zeros((size, size, 3))
    order = np.zeros((size, size))
    # Inverse-CDF sampling of r ∝ r^-3: r = (r_min^-2 - u (r_min^-2 - r_max^-2))^-1/2.
    u = rng.random(max_leaves)
    radii = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
    radii[0] = size  # a background that covers the picture
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for n, r in enumerate(radii, start=1):
        cy, cx = rng.uniform(-r / 2, size + r / 2, 2)
        y0, y1 = int(max(cy - 1.5 * r, 0)), int(min(cy + 1.5 * r + 1, size))
        x0, x1 = int(max(cx - 1.5 * r, 0)), int(min(cx + 1.5 * r + 1, size))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.4, 1.0)
        u_, v_ = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
        shape = rng.choice(3, p=(0.5, 0.25, 0.25))
        if shape == 0:
            inside = u_**2 + v_**2 <= r**2
        elif shape == 1:
            inside = (u_ / r) ** 2 + (v_ / (aspect * r)) ** 2 <= 1.0
        else:
            inside = (np.abs(u_) <= r) & (np.abs(v_) <= aspect * r)
        if n == 1:
            inside = np.ones_like(inside)
        if not inside.any():
            continue
        tex = _fill(rng, palette, y1 - y0, x1 - x0)
        region = img[y0:y1, x0:x1]
        region[inside] = tex[inside]
        order[y0:y1, x0:x1][inside] = n
    if rng.random() < 0.35:
        img = _box_blur(img, int(rng.integers(1, 3)))
    img = img + rng.uniform(0.0, 0.02) * rng.standard_normal(img.shape)
    picture = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return picture, order.astype(np.float32)[..., None]


def smooth_field(seed: int, size: int = 128) -> np.ndarray:
    """A smooth colour field (size x size x 3 uint8): a bicubic blend of a coarse 2x2 to 4x4 grid
    of colours drawn anywhere in the RGB cube, with a little sensor noise.

    Sky-like: large regions of one saturated colour with no edge in them, which the dead leaves
    (small textured leaves, moderate palette) almost never give a 32 px crop. Measured: training
    the miniature autoencoder with them did not fix its saturated colours (the mini_sd README).
    """
    rng = np.random.default_rng([0x5300, seed])
    n = int(rng.integers(2, 5))
    grid = rng.random((n, n, 3))
    # Separable cubic (Catmull-Rom) interpolation of the grid over the picture, clipped to [0, 1].
    t = np.linspace(0.0, n - 1.0, size)
    i = np.clip(np.floor(t).astype(int), 0, n - 2)
    f = t - i
    weights = np.stack([(-f**3 + 2 * f**2 - f) / 2, (3 * f**3 - 5 * f**2 + 2) / 2,
                        (-3 * f**3 + 4 * f**2 + f) / 2, (f**3 - f**2) / 2], axis=1)   # (size, 4)
    taps = np.clip(i[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)                  # (size, 4)
    rows = np.einsum("yk,ykxc->yxc", weights, grid[taps])                              # (size, n, 3)
    img = np.einsum("xk,yxkc->yxc", weights, rows[:, taps])                            # (size, size, 3)
    img = img + rng.uniform(0.0, 0.02) * rng.standard_normal(img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of HxWxC (edge-padded), a cheap stand-in for defocus."""
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(radius, radius) if a == axis else (0, 0) for a in range(img.ndim)]
        p = np.pad(img, pad, mode="edge")
        c = np.cumsum(p, axis=axis)
        zero = np.zeros_like(np.take(c, [0], axis=axis))
        c = np.concatenate([zero, c], axis=axis)
        img = (np.take(c, np.arange(k, c.shape[axis]), axis=axis)
               - np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)) / k
    return img
