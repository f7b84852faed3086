"""Per-example ops: small pure TensorFlow functions, registered by name, usable in ``tf.data``.

Randomness always comes in as a stateless key (int64 [2]), so an op's output is a function of its
inputs alone. Images are float32 HxWxC.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

from codi_jax.data.tensorflow_setup import tf

F = TypeVar("F", bound=Callable)

OPS: dict[str, Callable] = {}


def register_op(name: str) -> Callable[[F], F]:
    """Decorator adding a function to ``OPS`` under ``name``."""

    def wrap(fn: F) -> F:
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        OPS[name] = fn
        return fn

    return wrap


def get_op(name: str) -> Callable:
    """The op registered as ``name``; the error lists the known ones."""
    if name not in OPS:
        raise KeyError(f"unknown data op {name!r}; known ops: {', '.join(sorted(OPS))}")
    return OPS[name]


def split_key(key: tf.Tensor, n: int) -> list[tf.Tensor]:
    """``n`` independent stateless keys derived from ``key``."""
    keys = tf.random.experimental.stateless_split(key, num=n)
    return [keys[i] for i in range(n)]


def example_key(seed: int | tf.Tensor, index: int | tf.Tensor, stream: int = 0) -> tf.Tensor:
    """The key of example ``index`` of a run seeded ``seed``; ``stream`` separates independent uses."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(stream, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


@register_op("to_signed")
def to_signed(image01: tf.Tensor) -> tf.Tensor:
    """[0, 1] -> [-1, 1]."""
    return tf.clip_by_value(image01, 0.0, 1.0) * 2.0 - 1.0


@register_op("resize_bicubic")
def resize_bicubic(image: tf.Tensor, size: Sequence[int] | tf.Tensor) -> tf.Tensor:
    """Bicubic resize of HxWxC, clipped back to [0, 1] (bicubic overshoots)."""
    return tf.clip_by_value(tf.image.resize(image, size, method="bicubic"), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Inpainting masks.


def _quantile_threshold(field: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    """Mask of the ``fraction`` smallest values of ``field`` (HxW): exact coverage up to ties."""
    flat = tf.sort(tf.reshape(field, [-1]))
    n = tf.size(flat)
    k = tf.cast(tf.round(fraction * tf.cast(n, tf.float32)), tf.int32)
    # k == 0 must give an empty mask; k == n a full one.
    thresh = tf.where(k > 0, flat[tf.maximum(k - 1, 0)], flat[0] - 1.0)
    return tf.cast(field <= thresh, tf.float32)


def _segment_distance(px: tf.Tensor, py: tf.Tensor, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Distance of pixel centres (HxW) to each segment a->b ([S, 2] as x, y): HxWxS."""
    ax, ay = a[:, 0], a[:, 1]
    dx, dy = b[:, 0] - ax, b[:, 1] - ay
    len2 = tf.maximum(dx**2 + dy**2, 1e-6)
    t = ((px[..., None] - ax) * dx + (py[..., None] - ay) * dy) / len2
    t = tf.clip_by_value(t, 0.0, 1.0)
    return tf.sqrt((px[..., None] - ax - t * dx) ** 2 + (py[..., None] - ay - t * dy) ** 2)


@register_op("stroke_field")
def stroke_field(key: tf.Tensor, height: int, width: int, max_strokes: int, max_vertices: int) -> tf.Tensor:
    """Distance to 1..``max_strokes`` random polylines (random walks); thresholded into brush strokes."""
    ks = split_key(key, 4)
    n_strokes = tf.random.stateless_uniform((), ks[0], 1, max_strokes + 1, dtype=tf.int32)
    size = float(max(height, width))
    starts = tf.random.stateless_uniform([max_strokes, 1, 2], ks[1]) * [width, height]
    angles = tf.random.stateless_uniform([max_strokes, max_vertices - 1], ks[2], 0.0, 2 * math.pi)
    lengths = tf.random.stateless_uniform([max_strokes, max_vertices - 1], ks[3], 0.1, 0.4) * size
    steps = tf.stack([tf.cos(angles), tf.sin(angles)], axis=-1) * lengths[..., None]
    verts = tf.concat([starts, starts + tf.cumsum(steps, axis=1)], axis=1)  # [strokes, vertices, 2]
    a = tf.reshape(verts[:, :-1], [-1, 2])
    b = tf.reshape(verts[:, 1:], [-1, 2])
    py, px = tf.meshgrid(tf.range(height, dtype=tf.float32) + 0.5, tf.range(width, dtype=tf.float32) + 0.5, indexing="ij")
    dist = _segment_distance(px, py, a, b)
    # Strokes beyond n_strokes are pushed out of reach.
    active = tf.repeat(tf.range(max_strokes) < n_strokes, max_vertices - 1)
    dist = tf.where(active, dist, 1e9)
    return tf.reduce_min(dist, axis=-1)


@register_op("box_field")
def box_field(key: tf.Tensor, height: int, width: int, max_boxes: int) -> tf.Tensor:
    """Normalised Chebyshev distance to 1..``max_boxes`` random boxes; thresholded into rectangles."""
    ks = split_key(key, 3)
    n = tf.random.stateless_uniform((), ks[0], 1, max_boxes + 1, dtype=tf.int32)
    centres = tf.random.stateless_uniform([max_boxes, 2], ks[1]) * [width, height]
    aspect = tf.exp(tf.random.stateless_uniform([max_boxes], ks[2], -1.0, 1.0))
    py, px = tf.meshgrid(tf.range(height, dtype=tf.float32) + 0.5, tf.range(width, dtype=tf.float32) + 0.5, indexing="ij")
    d = tf.maximum(
        tf.abs(px[..., None] - centres[:, 0]) / aspect,
        tf.abs(py[..., None] - centres[:, 1]) * aspect,
    )
    d = tf.where(tf.range(max_boxes) < n, d, 1e9)
    return tf.reduce_min(d, axis=-1)


@register_op("random_inpaint_mask")
def random_inpaint_mask(
    key: tf.Tensor,
    height: int,
    width: int,
    coverage: Sequence[float],
    stroke_prob: float,
    max_strokes: int,
    max_vertices: int,
    max_boxes: int,
) -> tf.Tensor:
    """HxWx1 float32 mask, 1 = hole, covering a fraction drawn uniformly from ``coverage``.

    The shapes (free-form strokes or boxes) are grown or shrunk to hit the drawn fraction exactly,
    so the coverage range holds per example rather than only on average.
    """
    ks = split_key(key, 4)
    fraction = tf.random.stateless_uniform((), ks[0], coverage[0], coverage[1])
    field = tf.cond(
        tf.random.stateless_uniform((), ks[1]) < stroke_prob,
        lambda: stroke_field(ks[2], height, width, max_strokes, max_vertices),
        lambda: box_field(ks[3], height, width, max_boxes),
    )
    return _quantile_threshold(field, fraction)[..., None]


# --------------------------------------------------------------------------------------------
# Canny edges.


def _gaussian_blur(gray: tf.Tensor, sigma: float) -> tf.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    g = tf.exp(-0.5 * (x / sigma) ** 2)
    g = g / tf.reduce_sum(g)
    padded = tf.pad(gray[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    out = tf.nn.conv2d(padded, tf.reshape(g, [-1, 1, 1, 1]), 1, "VALID")
    out = tf.nn.conv2d(out, tf.reshape(g, [1, -1, 1, 1]), 1, "VALID")
    return out[0]


@register_op("canny")
def canny(image01: tf.Tensor, low_threshold: float, high_threshold: float, sigma: float = 0.0) -> tf.Tensor:
    """Canny edge map (HxWx1 float32, 1 = edge) of an HxWx3 image in [0, 1].

    Sobel gradients of 0..255 luminance, non-maximum suppression along the gradient direction
    (quantised to 4 directions), then hysteresis: weak pixels (≥ low) are kept when connected to
    strong ones (≥ high).
    """
    gray = tf.image.rgb_to_grayscale(image01) * 255.0
    if sigma > 0:
        gray = _gaussian_blur(gray, sigma)
    padded = tf.pad(gray[None], [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    sobel_x = tf.constant([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = tf.nn.conv2d(padded, tf.reshape(sobel_x, [3, 3, 1, 1]), 1, "VALID")[0, ..., 0]
    gy = tf.nn.conv2d(padded, tf.reshape(tf.transpose(sobel_x), [3, 3, 1, 1]), 1, "VALID")[0, ..., 0]
    mag = tf.sqrt(gx**2 + gy**2)
    # Direction bin: 0 = horizontal gradient, 1 = 45°, 2 = vertical, 3 = 135° (image y points down).
    angle = tf.math.floormod(tf.atan2(gy, gx) * 180.0 / math.pi, 180.0)
    bin_ = tf.cast(tf.math.floormod(tf.round(angle / 45.0), 4.0), tf.int32)
    m = tf.pad(mag, [[1, 1], [1, 1]])
    h, w = tf.shape(mag)[0], tf.shape(mag)[1]

    def shifted(dy: int, dx: int) -> tf.Tensor:
        return m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # Neighbour pairs along each direction bin (dy, dx).
    pairs = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    n1 = tf.stack([shifted(*p[0]) for p in pairs])
    n2 = tf.stack([shifted(*p[1]) for p in pairs])
    sel = tf.one_hot(bin_, 4, axis=0)
    a = tf.reduce_sum(n1 * sel, axis=0)
    b = tf.reduce_sum(n2 * sel, axis=0)
    thin = tf.where((mag >= a) & (mag >= b), mag, 0.0)
    weak = thin >= low_threshold
    strong = tf.cast(thin >= high_threshold, tf.float32)

    def grow(edges: tf.Tensor) -> tf.Tensor:
        near = tf.nn.max_pool2d(edges[None, ..., None], 3, 1, "SAME")[0, ..., 0]
        return tf.where(weak, near, 0.0)

    def not_done(prev: tf.Tensor, cur: tf.Tensor) -> tf.Tensor:
        return tf.reduce_any(tf.not_equal(prev, cur))

    _, edges = tf.while_loop(not_done, lambda prev, cur: (cur, tf.maximum(cur, grow(cur))), (tf.zeros_like(strong), strong))
    return edges[..., None]


# --------------------------------------------------------------------------------------------
# Depth.


@register_op("normalize_depth")
def normalize_depth(depth: tf.Tensor) -> tf.Tensor:
    """Per-image min-max of finite values to [-1, 1]; non-finite pixels (invalid) become -1.

    A constant map becomes 0 (no depth contrast rather than a division by zero).
    """
    finite = tf.math.is_finite(depth)
    lo = tf.reduce_min(tf.where(finite, depth, math.inf))
    hi = tf.reduce_max(tf.where(finite, depth, -math.inf))
    span = hi - lo
    out = tf.where(span > 0, (depth - lo) / tf.where(span > 0, span, 1.0) * 2.0 - 1.0, tf.zeros_like(depth))
    return tf.where(finite, out, -1.0)
