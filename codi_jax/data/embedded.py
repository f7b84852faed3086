"""``embedded``: whole pictures that ship with scikit-image / scikit-learn, split *by picture*,
plus procedural pictures (``procedural.dead_leaves``), so the embedded setup needs no download and
its held-out pictures are never seen by any model that trains on the train split.

Splits (records are read by index, like every source):

* ``train`` — the ``TRAIN_IMAGES`` natural pictures, each repeated ``natural_repeats`` times (the
  loader takes a fresh random crop and augmentation per record), then ``procedural_train``
  procedural pictures, seeds ``0 … procedural_train − 1``, then ``procedural_smooth`` smooth colour
  fields (``procedural.smooth_field``, no depth: left out of the depth task).
* ``eval`` — ``eval_crops_per_image`` fixed crops of each ``HELD_OUT_IMAGES`` picture (natural
  pictures of different kinds: an animal, an indoor and an outdoor photograph, a texture),
  interleaved by picture so that every prefix of the split covers all of them.
* ``eval_procedural`` — one crop of each of ``procedural_eval`` procedural pictures whose seeds
  start at ``EVAL_SEED_OFFSET`` (disjoint from training). Reported separately from ``eval``.

The depth task pairs every record with its depth map: procedural pictures have an exact one, and
the stereo motorcycle pair (scikit-image) has a disparity map; natural pictures without depth are
left out of that task's splits. The motorcycle is the one real depth picture: its left 75 % is in
``train``, crops of its right 25 % form ``eval`` (there is no second real depth picture to hold
out whole; ``eval_procedural`` is the whole-picture depth evaluation).
"""
from __future__ import annotations

import zlib
from collections import Counter
from typing import Callable

import ml_collections
import numpy as np

from codi_jax.data import procedural
from codi_jax.data.sources import Example, _process_range

EVAL_SEED_OFFSET = 1_000_000


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


TRAIN_IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "camera": _skimage("camera"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "retina": _skimage("retina"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "coins": _skimage("coins"),
    "moon": _skimage("moon"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "motorcycle": _motorcycle,
}
HELD_OUT_IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": _skimage("chelsea"),      # an animal, colour
    "coffee": _skimage("coffee"),        # indoor still life, colour
    "rocket": _skimage("rocket"),        # outdoor scene with sky, colour
    "brick": _skimage("brick"),          # a texture, grey
}
SPLITS = ("train", "eval", "eval_procedural")
_MOTORCYCLE_TRAIN_FRACTION = 0.75


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _motorcycle_depth() -> tuple[np.ndarray, np.ndarray]:
    """The left motorcycle view and its disparity (invalid pixels filled with the median)."""
    import skimage.data

    left, _, disparity = skimage.data.stereo_motorcycle()
    d = disparity.astype(np.float32)
    d[~np.isfinite(d)] = np.median(d[np.isfinite(d)])
    return _rgb(left), d[..., None]


class EmbeddedSource:
    """One split of the embedded pictures for one process (see the module docstring)."""

    def __init__(self, split: str, options: ml_collections.ConfigDict, crop_size: int, *, depth: bool,
                 process_index: int, process_count: int):
        if split not in SPLITS:
            raise ValueError(f"embedded source: unknown split {split!r}; known: {list(SPLITS)}")
        self.name = f"embedded:{split}"
        self.scan_counts: Counter = Counter()
        self._options, self._size, self._depth, self._split = options, crop_size, depth, split
        self._cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._procedural: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._records = self._index(split)
        self.total = len(self._records)
        self.offset, end = _process_range(self.total, process_index, process_count)
        self._records = self._records[self.offset:end]

    def _index(self, split: str) -> list[tuple]:
        o, s = self._options, self._size
        if split == "train":
            names = ["motorcycle"] if self._depth else list(TRAIN_IMAGES)
            natural = [("natural", n) for n in names for _ in range(o.natural_repeats)]
            smooth = [] if self._depth else [("smooth", k) for k in range(o.procedural_smooth)]
            return natural + [("procedural", k) for k in range(o.procedural_train)] + smooth
        if split == "eval_procedural":
            return [("procedural", EVAL_SEED_OFFSET + k) for k in range(o.procedural_eval)]
        per_picture = []
        for name in (["motorcycle"] if self._depth else HELD_OUT_IMAGES):
            image, _ = self._picture(name, held_out=True)
            h, w = image.shape[:2]
            # Seeded by name and size: the same crops on every machine.
            rng = np.random.default_rng([zlib.crc32(name.encode()), s])
            ys = rng.integers(0, h - s + 1, o.eval_crops_per_image)
            xs = rng.integers(0, w - s + 1, o.eval_crops_per_image)
            per_picture.append([("crop", name, int(y), int(x)) for y, x in zip(ys, xs)])
        # Interleaved, picture after picture: an evaluation of the first eval.num_examples records
        # (and the sample grid's first rows) covers every held-out picture, not just the first ones.
        return [rec for crops in zip(*per_picture) for rec in crops]

    def _picture(self, name: str, held_out: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A natural picture (and its depth for the depth task), loaded once per source."""
        if name not in self._cache:
            if name == "motorcycle" and self._depth:
                image, depth = _motorcycle_depth()
                cut = int(image.shape[1] * _MOTORCYCLE_TRAIN_FRACTION)
                part = slice(cut, None) if held_out else slice(0, cut)
                self._cache[name] = (image[:, part], depth[:, part])
            else:
                load = HELD_OUT_IMAGES.get(name) or TRAIN_IMAGES[name]
                self._cache[name] = (_rgb(load()), None)
        return self._cache[name]

    def __len__(self) -> int:
        return len(self._records)

    def where(self, i: int) -> str:
        return f"{self.name}[{self.offset + i}] {self._records[i][:2]}"

    def load(self, i: int) -> Example:
        rec = self._records[i]
        o, s = self._options, self._size
        if rec[0] == "natural":
            image, depth = self._picture(rec[1], held_out=False)
            return Example(image, depth, rec[1])
        if rec[0] == "crop":
            image, depth = self._picture(rec[1], held_out=True)
            y, x = rec[2], rec[3]
            crop = lambda a: None if a is None else a[y:y + s, x:x + s]
            return Example(crop(image), crop(depth), rec[1])
        if rec[0] == "smooth":
            return Example(procedural.smooth_field(rec[1], max(o.procedural_size, s)), None, "smooth")
        if rec[1] not in self._procedural:  # ~70 ms each: generated once per source
            # Only training pictures get vivid colours: the eval_procedural split stays the one
            # every documented number was measured on.
            vivid = o.procedural_vivid if rec[1] < EVAL_SEED_OFFSET else 0.0
            picture, depth = procedural.dead_leaves(rec[1], max(o.procedural_size, s), vivid=vivid)
            self._procedural[rec[1]] = (picture, depth if self._depth else None)
        picture, depth = self._procedural[rec[1]]
        return Example(picture, depth, "procedural")
