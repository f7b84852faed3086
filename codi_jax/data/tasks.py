"""Tasks: how a (target, paired input) crop becomes ``(image, cond)`` for the trainer.

A task function takes a stateless key, the target crop (SxSx3 float32 in [0, 1]) and the paired
input crop (``extra``: depth map SxSx1 for depth, the image before the edit SxSx3 in [0, 1] for
edit, unused otherwise) and returns ``(image, cond)`` in [-1, 1].
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import ml_collections
from codi_jax.data.tensorflow_setup import tf

from codi_jax.data import ops
from codi_jax.data.config import TASKS
from codi_jax.data.degradations import realesrgan_degrade

TaskFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, ml_collections.ConfigDict], tuple[tf.Tensor, tf.Tensor]]


class Task(NamedTuple):
    fn: TaskFn
    extra: str  # what the source must pair with each image: "", "depth" or "source_image"
    extra_channels: int


def _gray_to(cond01: tf.Tensor, channels: int) -> tf.Tensor:
    return tf.tile(cond01, [1, 1, channels]) if channels == 3 else cond01


def sr(key: tf.Tensor, image: tf.Tensor, extra: tf.Tensor, cfg: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """Condition = the degraded LR image (Real-ESRGAN's chain, or a clean antialiased bicubic
    downscale with ``sr.degradation="bicubic"``), resized back (bicubic) to the target size."""
    del extra
    if cfg.sr.degradation == "bicubic":
        side = tf.shape(image)[:2] // cfg.sr.scale
        lr = tf.clip_by_value(tf.image.resize(image, side, "bicubic", antialias=True), 0.0, 1.0)
    elif cfg.sr.degradation == "realesrgan":
        lr = realesrgan_degrade(key, image, cfg.sr)
    else:
        raise ValueError(f"data.sr.degradation: unknown value {cfg.sr.degradation!r}; known: "
                         "['realesrgan', 'bicubic']")
    cond = ops.resize_bicubic(lr, tf.shape(image)[:2])
    return ops.to_signed(image), ops.to_signed(cond)


def depth(key: tf.Tensor, image: tf.Tensor, extra: tf.Tensor, cfg: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """Condition = the depth crop, min-max normalised per example to [-1, 1]."""
    del key
    d = ops.normalize_depth(extra)
    return ops.to_signed(image), _gray_to(d, cfg.depth.channels)


def inpaint(key: tf.Tensor, image: tf.Tensor, extra: tf.Tensor, cfg: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """Condition = [masked image (holes at 0, i.e. mid-gray), mask (1 = hole)], 4 channels."""
    del extra
    o = cfg.inpaint
    size = cfg.image_size
    mask = ops.random_inpaint_mask(
        key, size, size, o.coverage, o.stroke_prob, o.max_strokes, o.max_vertices, o.max_boxes
    )
    signed = ops.to_signed(image)
    return signed, tf.concat([signed * (1.0 - mask), mask], axis=-1)


def edit(key: tf.Tensor, image: tf.Tensor, extra: tf.Tensor, cfg: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """Target = the edited image; condition = the image before the edit."""
    del key
    return ops.to_signed(image), ops.to_signed(extra)


def canny(key: tf.Tensor, image: tf.Tensor, extra: tf.Tensor, cfg: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """Condition = Canny edges of the target, mapped {0, 1} -> {-1, 1}."""
    del key, extra
    o = cfg.canny
    edges = ops.canny(image, o.low_threshold, o.high_threshold, o.sigma)
    return ops.to_signed(image), _gray_to(edges * 2.0 - 1.0, o.channels)


def unconditional(key: tf.Tensor, image: tf.Tensor, extra: tf.Tensor, cfg: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """No condition (teacher and autoencoder pretraining): ``cond`` is the target, never read, so
    the pipeline spends nothing on degradations."""
    del key, extra, cfg
    signed = ops.to_signed(image)
    return signed, signed


TASK_REGISTRY: dict[str, Task] = {
    "sr": Task(sr, "", 1),
    "depth": Task(depth, "depth", 1),
    "inpaint": Task(inpaint, "", 1),
    "edit": Task(edit, "source_image", 3),
    "canny": Task(canny, "", 1),
    "unconditional": Task(unconditional, "", 1),
}
assert tuple(TASK_REGISTRY) == TASKS


def get_task(name: str) -> Task:
    """The task registered as ``name``; the error lists the known ones."""
    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown data task {name!r}; known tasks: {', '.join(TASK_REGISTRY)}")
    return TASK_REGISTRY[name]
