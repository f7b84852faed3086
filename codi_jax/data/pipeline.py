"""Training and evaluation pipelines: index-based tf.data streams over a record source.

Training stream, per process p with B = global_batch / process_count local examples per step:
local example l = step * B + j is record ``index_shuffle(l mod n; seed, p, epoch = l div n)`` of the
process's n records; its global index g = step * global_batch + p * B + j keys every random choice
(crop, flip, degradation, mask). So the batch at step k is a function of (seed, k, process) alone and
``start_step=k`` reproduces an uninterrupted run exactly, with nothing skipped or replayed.

A bad record (unreadable, too small, missing its depth map...) is replaced by the next good record
of the shard (deterministic too) and counted; counts are logged once per epoch. With
``data.strict=True`` it is an error instead.
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter
from typing import Any, Iterator

import ml_collections
import numpy as np
from codi_jax.data.tensorflow_setup import tf
from absl import logging
from PIL import Image

from codi_jax.data import demo, embedded, ops, sources
from codi_jax.data.config import cond_channels
from codi_jax.data.tasks import Task, get_task

# Reasons a record is skipped, in the order of the per-example counts vector.
REASONS = ("unreadable", "too_small", "mode", "missing_condition", "converted")
# Independent random streams derived from the seed.
_STREAM_PERMUTATION, _STREAM_TASK = 1, 2


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller leaves the topology to JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def open_source(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int) -> Any:
    """The record source named by ``cfg.source`` for ``split`` (a folder path for folder sources)."""
    task = get_task(cfg.task)
    extra = task.extra
    if cfg.source == "embedded":
        base = embedded.EmbeddedSource(split, cfg.embedded, cfg.image_size, depth=extra == "depth",
                                       process_index=process_index, process_count=process_count)
        return sources.DemoEditSource(base) if extra == "source_image" else base
    if cfg.source == "demo":
        d = cfg.demo
        builder = demo.build_demo(
            demo.demo_config(cfg.image_size, d.train_crops_per_image, d.eval_crops_per_image, d.eval_fraction, d.depth_crop_multiplier),
            cfg.data_dir,
        )
        if extra == "depth" and not split.endswith("_depth"):
            split += "_depth"  # the demo's depth pairs live in their own splits
        base = sources.TfdsSource(
            builder, split, image_key="image", extra_key="depth" if extra == "depth" else "",
            text_key="text", convert_modes=cfg.convert_modes, process_index=process_index, process_count=process_count,
        )
        return sources.DemoEditSource(base) if extra == "source_image" else base
    if cfg.source.startswith("tfds:"):
        builder = sources.tfds_builder(cfg.source[len("tfds:"):], cfg.data_dir)
        extra_key = cfg.tfds.cond_key or {"depth": "depth", "source_image": "input_image"}.get(extra, "")
        return sources.TfdsSource(
            builder, split, image_key=cfg.tfds.image_key, extra_key=extra_key if extra else "",
            text_key=cfg.tfds.text_key, convert_modes=cfg.convert_modes,
            process_index=process_index, process_count=process_count,
        )
    if cfg.source.startswith("folder:"):
        # The train split is the folder itself; another split names another folder.
        root = cfg.source[len("folder:"):] if split in ("", cfg.train_split) else split
        if not os.path.isdir(root):
            raise ValueError(f"folder source: split {split!r} must be a folder path (data.eval_split for the held-out folder)")
        return sources.FolderSource(
            root, extra=extra, options=cfg.folder, convert_modes=cfg.convert_modes, strict=cfg.strict,
            process_index=process_index, process_count=process_count,
        )
    raise ValueError(f"unknown data source {cfg.source!r}; known sources: {', '.join(sources.SOURCE_KINDS)}")


def _load_tokenizer(cfg: ml_collections.ConfigDict) -> Any:
    if not cfg.tokenizer:
        return None
    from codi_jax.models.clip import load_tokenizer

    return load_tokenizer(cfg.tokenizer)


def _resize(arr: np.ndarray, size: tuple[int, int], is_depth: bool) -> np.ndarray:
    """Resizes HxWxC to ``size`` (h, w): antialiased bicubic for images, bilinear for depth."""
    h, w = size
    if is_depth:
        return np.asarray(Image.fromarray(arr[..., 0], "F").resize((w, h), Image.BILINEAR))[..., None]
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BICUBIC, reducing_gap=3.0))


def _color_jitter(image: np.ndarray, rng: np.random.Generator, j: float) -> np.ndarray:
    """Brightness, contrast and saturation of an HxWx3 uint8 crop, each scaled by U[1 - j, 1 + j]."""
    x = image.astype(np.float32)
    brightness, contrast, saturation = rng.uniform(1.0 - j, 1.0 + j, 3)
    x = x * brightness
    x = (x - x.mean()) * contrast + x.mean()
    gray = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = (x - gray) * saturation + gray
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


class ExampleLoader:
    """Python side of the pipeline (run through ``tf.numpy_function``): record -> fixed-size crop.

    Returns (image SxSx3 uint8, extra SxSxC float32, tokens int32[L], reason counts int32[R], valid).
    """

    def __init__(self, source: Any, task: Task, cfg: ml_collections.ConfigDict, *, training: bool, seed: int):
        self.source, self.task, self.cfg, self.training, self.seed = source, task, cfg, training, seed
        self.size = cfg.image_size
        self.tokenizer = _load_tokenizer(cfg)
        # transformers tokenizers are not safe to call from several tf.data threads at once.
        self._tok_lock = threading.Lock()
        self._bad: dict[int, str] = {}  # record -> reason, for records known bad: not decoded again
        extra_c = task.extra_channels if task.extra else 1
        extra_s = self.size if task.extra else 1
        self.extra_shape = (extra_s, extra_s, extra_c)
        self.text_len = cfg.max_text_length if self.tokenizer is not None else 1

    def _prepare(self, r: int, global_index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        ex = self.source.load(r)
        image, extra = ex.image, ex.extra
        h, w = image.shape[:2]
        if extra is not None and extra.shape[:2] != (h, w):
            extra = _resize(extra, (h, w), self.task.extra == "depth")
        short = self.cfg.resize_short_side
        if short and min(h, w) > short:
            h, w = max(short, round(h * short / min(h, w))), max(short, round(w * short / min(h, w)))
            image = _resize(image, (h, w), False)
            extra = None if extra is None else _resize(extra, (h, w), self.task.extra == "depth")
        s = self.size
        if min(h, w) < s:
            raise sources.BadExample("too_small", f"{self.source.where(r)}: {h}x{w} < crop {s}")
        aug = self.cfg.augment
        rng = np.random.default_rng([self.seed, global_index]) if self.training else None
        # Scale jitter: shrinking the picture by f and cropping s pixels equals cropping a window
        # of s / f pixels and shrinking that to s, which costs a crop's resize, not a picture's.
        # f is drawn first and always, so the other draws do not depend on it.
        f = rng.uniform(*aug.scale_range) if self.training and tuple(aug.scale_range) != (1.0, 1.0) else 1.0
        window = min(round(s / f), h, w)
        if self.training:
            y, x = int(rng.integers(0, h - window + 1)), int(rng.integers(0, w - window + 1))
            flip = self.cfg.random_flip and rng.random() < 0.5
        else:
            y, x, flip = (h - s) // 2, (w - s) // 2, False
        image = image[y : y + window, x : x + window]
        if extra is not None:
            extra = extra[y : y + window, x : x + window]
        if window != s:
            image = _resize(image, (s, s), False)
            extra = None if extra is None else _resize(extra, (s, s), self.task.extra == "depth")
        if flip:
            image = image[:, ::-1]
            extra = None if extra is None else extra[:, ::-1]
        if self.training and aug.rot90:
            k = int(rng.integers(0, 4))
            image = np.rot90(image, k)
            extra = None if extra is None else np.rot90(extra, k)
        if self.training and aug.color_jitter and self.task.extra != "source_image":
            image = _color_jitter(image, rng, aug.color_jitter)
        if self.training and aug.channel_permute and self.task.extra != "source_image":
            image = image[..., rng.permutation(3)]
        if extra is None:
            extra = np.zeros(self.extra_shape, np.float32)
        elif self.task.extra == "source_image":
            extra = extra.astype(np.float32) / 255.0
        return np.ascontiguousarray(image), np.ascontiguousarray(extra, dtype=np.float32), ex.text, ex.converted

    def _tokens(self, text: str) -> np.ndarray:
        if self.tokenizer is None:
            return np.zeros([1], np.int32)
        from codi_jax.models.clip import tokenize

        with self._tok_lock:
            return tokenize(self.tokenizer, text, self.cfg.max_text_length)[0][0]

    def __call__(self, record: np.int64, global_index: np.int64) -> tuple[np.ndarray, ...]:
        counts = np.zeros([len(REASONS)], np.int32)
        n = len(self.source)
        r = int(record)
        last_error = ""
        for _ in range(min(n, self.cfg.max_bad_in_a_row)):
            if r < 0:
                break  # eval padding
            if r in self._bad:
                counts[REASONS.index(self._bad[r])] += 1
            else:
                try:
                    image, extra, text, converted = self._prepare(r, int(global_index))
                except sources.BadExample as e:
                    if self.cfg.strict:
                        raise ValueError(f"{e} (data.strict=True)") from e
                    self._bad[r] = e.reason
                    counts[REASONS.index(e.reason)] += 1
                    last_error = str(e)
                else:
                    if converted:
                        counts[REASONS.index("converted")] += 1
                    return image, extra, self._tokens(text), counts, np.bool_(True)
            if not self.training:
                break  # eval: the slot stays, marked invalid (mask False)
            r = (r + 1) % n
        else:
            raise RuntimeError(
                f"data: {self.cfg.max_bad_in_a_row} bad records in a row in {self.source.name}; last: {last_error}"
            )
        s = self.size
        return (np.zeros([s, s, 3], np.uint8), np.zeros(self.extra_shape, np.float32),
                self._tokens(""), counts, np.bool_(False))


def _element_fn(loader: ExampleLoader, task: Task, cfg: ml_collections.ConfigDict, task_seed: int):
    s = cfg.image_size
    c = cond_channels(cfg)

    def fn(record: tf.Tensor, global_index: tf.Tensor) -> dict[str, tf.Tensor]:
        image, extra, tokens, counts, valid = tf.numpy_function(
            loader, [record, global_index], [tf.uint8, tf.float32, tf.int32, tf.int32, tf.bool], stateful=False
        )
        image = tf.ensure_shape(image, [s, s, 3])
        extra = tf.ensure_shape(extra, loader.extra_shape)
        key = ops.example_key(task_seed, global_index, _STREAM_TASK)
        target, cond = task.fn(key, tf.cast(image, tf.float32) / 255.0, extra, cfg)
        out = {
            "image": tf.ensure_shape(target, [s, s, 3]),
            "cond": tf.ensure_shape(cond, [s, s, c]),
            "_counts": tf.ensure_shape(counts, [len(REASONS)]),
            "_valid": tf.ensure_shape(valid, []),
        }
        if loader.tokenizer is not None:
            out["text"] = tf.ensure_shape(tokens, [cfg.max_text_length])
        return out

    return fn


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True  # order must not depend on thread timing: resumability needs it
    return opts


def _parallel(cfg: ml_collections.ConfigDict) -> int:
    return tf.data.AUTOTUNE if cfg.num_parallel_calls < 0 else cfg.num_parallel_calls


def check_batch(batch: dict[str, np.ndarray], batch_size: int, cfg: ml_collections.ConfigDict) -> None:
    """Asserts dtype, shape and range of a batch: a wrong tensor must fail loudly, not train."""
    s, c = cfg.image_size, cond_channels(cfg)
    for name, channels in (("image", 3), ("cond", c)):
        x = batch[name]
        if x.dtype != np.float32 or x.shape != (batch_size, s, s, channels):
            raise RuntimeError(f"data: {name} is {x.dtype}{x.shape}, expected float32{(batch_size, s, s, channels)}")
        if not np.isfinite(x).all() or x.min() < -1.0 or x.max() > 1.0:
            raise RuntimeError(f"data: {name} outside [-1, 1] or not finite: [{x.min()}, {x.max()}]")
    if "text" in batch and (batch["text"].dtype != np.int32 or batch["text"].shape != (batch_size, cfg.max_text_length)):
        raise RuntimeError(f"data: text is {batch['text'].dtype}{batch['text'].shape}")


class TrainIterator:
    """Infinite iterator of this process's training batches (dicts of numpy arrays).

    ``skipped`` counts bad records seen so far (by reason); ``step`` is the next step's index.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, source: Any, dataset: tf.data.Dataset, local_batch: int, start_step: int):
        self.cfg, self.source, self.local_batch, self.step = cfg, source, local_batch, start_step
        self.skipped: Counter = Counter()
        self._epoch_counts: Counter = Counter()
        self._epoch = start_step * local_batch // len(source)
        self._it = dataset.as_numpy_iterator()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._it)
        except tf.errors.OpError as e:  # raised in the loader (strict mode, a source gone bad...)
            first_line = re.sub(r"\{\{.*?\}\}\s*", "", e.message).split("\n")[0]
            raise RuntimeError(f"data pipeline of {self.source.name} failed: {first_line}") from e
        counts = batch.pop("_counts").sum(axis=0)
        batch.pop("_valid")
        step_counts = Counter({r: int(v) for r, v in zip(REASONS, counts) if v})
        self.skipped.update(step_counts)
        self._epoch_counts.update(step_counts)
        check_batch(batch, self.local_batch, self.cfg)
        self.step += 1
        epoch = self.step * self.local_batch // len(self.source)
        if epoch != self._epoch:
            logging.info(
                "data: %s epoch %d done: bad records this epoch %s, skipped at scan %s",
                self.source.name, self._epoch, dict(self._epoch_counts), dict(self.source.scan_counts),
            )
            self._epoch, self._epoch_counts = epoch, Counter()
        return batch


def make_train_iterator(
    cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """This process's training batches from step ``start_step`` on (see the module docstring).

    Each batch: ``image`` (B, S, S, 3) and ``cond`` (B, S, S, C) float32 in [-1, 1] with
    B = global_batch_size / process_count, and ``text`` (B, L) int32 when ``cfg.tokenizer`` is set.
    """
    p, n_proc = _process(process_index, process_count)
    if global_batch_size % n_proc:
        raise ValueError(f"global batch size {global_batch_size} does not divide over {n_proc} processes")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be non-negative")
    task = get_task(cfg.task)
    source = open_source(cfg, cfg.train_split, p, n_proc)
    n = len(source)
    if n == 0:
        raise ValueError(f"{source.name} has no records for process {p}")
    local = global_batch_size // n_proc
    loader = ExampleLoader(source, task, cfg, training=True, seed=seed)
    perm_key = ops.example_key(seed, p, _STREAM_PERMUTATION)

    def locate(l: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        step, j = l // local, l % local
        g = step * global_batch_size + p * local + j
        epoch_key = tf.random.experimental.stateless_fold_in(perm_key, l // n)
        r = tf.random.experimental.index_shuffle(l % n, epoch_key, tf.constant(n - 1, tf.int64))
        return r, g

    ds = tf.data.Dataset.range(start_step * local, np.iinfo(np.int64).max)
    ds = ds.map(locate)
    ds = ds.map(_element_fn(loader, task, cfg, seed), num_parallel_calls=_parallel(cfg))
    ds = ds.batch(local, drop_remainder=True).prefetch(cfg.prefetch_batches)
    return TrainIterator(cfg, source, ds.with_options(_options()), local, start_step)


class EvalDataset:
    """The held-out split for this process: a finite, re-iterable sequence of batches.

    Global batch ``b`` is the split's records ``[b·G, (b+1)·G)`` (``G`` = ``batch_size`` × the
    process count), process ``p`` holding its ``p``-th slice of ``batch_size`` of them: the
    examples of each global batch, and so a truncated evaluation (``eval.num_examples``), are
    the same whatever the process count. Every process yields the same number of batches (needed
    for collective eval steps). The last batch is padded to full size; the boolean ``mask`` key is
    False on padding and on unreadable records, so metrics must weight examples by it.
    Degradations/masks are keyed by (``cfg.eval_seed``, record index): identical across runs.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, batch_size: int, process_index: int, process_count: int):
        self.cfg, self.batch_size = cfg, batch_size
        task = get_task(cfg.task)
        # The whole split: a process reads its slice of every global batch, not a contiguous shard.
        self.source = open_source(cfg, cfg.eval_split, 0, 1)
        n, global_batch = len(self.source), batch_size * process_count
        self.num_batches = math.ceil(n / global_batch)
        loader = ExampleLoader(self.source, task, cfg, training=False, seed=cfg.eval_seed)

        def locate(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            g = (i // batch_size) * global_batch + process_index * batch_size + i % batch_size
            return tf.where(g < n, g, -1), g

        ds = tf.data.Dataset.range(self.num_batches * batch_size).map(locate)
        ds = ds.map(_element_fn(loader, task, cfg, cfg.eval_seed), num_parallel_calls=_parallel(cfg))
        self._ds = ds.batch(batch_size).prefetch(cfg.prefetch_batches).with_options(_options())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._ds.as_numpy_iterator():
            batch.pop("_counts")
            batch["mask"] = batch.pop("_valid")
            check_batch(batch, self.batch_size, self.cfg)
            yield batch


def make_eval_dataset(
    cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalDataset:
    """This process's batches of the held-out split ``cfg.eval_split`` (see ``EvalDataset``): its
    ``global_batch_size / process_count`` examples of each global batch, as for training."""
    p, n_proc = _process(process_index, process_count)
    if global_batch_size % n_proc:
        raise ValueError(f"eval.batch_size: the global batch of {global_batch_size} does not split "
                         f"over {n_proc} processes")
    return EvalDataset(cfg, global_batch_size // n_proc, p, n_proc)
