"""Record sources: the examples of one split, for one process, readable by index.

A source has ``len()`` (records of this process), ``total`` (records of the split over all
processes), ``offset`` (global index of this process's first record) and ``load(i)``, which returns an
``Example`` or raises ``BadExample``, and ``where(i)`` (record i's name in messages). Random access by index is what makes the training stream
resumable by construction.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections import Counter
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEPTH_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)
SOURCE_KINDS = ("embedded", "demo", "tfds:<name>", "folder:<path>")


class BadExample(Exception):
    """A record that cannot be used; ``reason`` is a short counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Example:
    image: np.ndarray  # HxWx3 uint8
    extra: np.ndarray | None = None  # depth HxWx1 float32, or the image before the edit HxWx3 uint8
    text: str = ""
    converted: str = ""  # non-empty when the image needed a mode conversion (counted)


def _pil_to_rgb(im: Image.Image, where: str, convert_modes: bool) -> tuple[np.ndarray, str]:
    """8-bit RGB array of a loaded PIL image, and the name of the conversion done ("" if none)."""
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8), ""
    if not convert_modes:
        raise BadExample("mode", f"{where}: image mode {im.mode} is not 8-bit RGB (data.convert_modes=False)")
    if im.mode == "F":
        raise BadExample("mode", f"{where}: floating-point image; its value range is unknown")
    if im.mode.startswith("I"):
        arr = np.asarray(im).astype(np.float64)
        # 16-bit data (stored as I;16 or I): map 0..65535 to 0..255.
        if arr.max() > 255:
            arr = arr / 257.0
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.stack([gray] * 3, axis=-1), "16bit"
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels' colour is arbitrary: show them over white rather than trusting it.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8), "alpha"
    kind = "gray" if im.mode in ("L", "1") else im.mode.lower()
    return np.asarray(im.convert("RGB"), dtype=np.uint8), kind


def read_image(path: str, convert_modes: bool = True) -> tuple[np.ndarray, str]:
    """Decodes an image file to HxWx3 uint8 (see ``_pil_to_rgb``); ``BadExample`` if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()  # a truncated file fails here, not at open
            return _pil_to_rgb(im, path, convert_modes)
    except BadExample:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadExample("unreadable", f"{path}: {e}") from e


def array_to_rgb(image: np.ndarray, where: str, convert_modes: bool = True) -> tuple[np.ndarray, str]:
    """An HxW, HxWx1, HxWx3 or HxWx4 array (uint8, uint16 or bool) to HxWx3 uint8."""
    if image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        return image, ""
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    modes = {(2, np.uint8): "L", (3, np.uint8): "RGBA", (2, np.uint16): "I;16"}
    mode = modes.get((image.ndim, image.dtype.type))
    if mode is None or (mode == "RGBA" and image.shape[-1] != 4):
        raise BadExample("mode", f"{where}: unsupported image array {image.shape} {image.dtype}")
    return _pil_to_rgb(Image.fromarray(image), where, convert_modes)


def read_depth(path: str) -> np.ndarray:
    """A depth map as HxWx1 float32 (raw values; normalised later per crop)."""
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadExample("unreadable", f"{path}: {e}") from e
    arr = arr.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)  # depth saved as a gray RGB(A) image
    if arr.ndim != 2:
        raise BadExample("unreadable", f"{path}: depth map of shape {arr.shape}")
    return arr[..., None]


def _process_range(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    return total * process_index // process_count, total * (process_index + 1) // process_count


# --------------------------------------------------------------------------------------------
# TFDS.


class TfdsSource:
    """A TFDS split read by index (``as_data_source``: needs the array_record file format)."""

    def __init__(
        self,
        builder: Any,
        split: str,
        *,
        image_key: str,
        extra_key: str,
        text_key: str,
        convert_modes: bool,
        process_index: int,
        process_count: int,
    ):
        import tensorflow_datasets as tfds

        self.name = f"{builder.info.full_name}:{split}"
        splits = builder.info.splits
        if split not in splits:
            raise ValueError(f"split {split!r} not in {builder.info.full_name}; its splits: {', '.join(splits)}")
        features = builder.info.features
        for role, key in (("image", image_key), ("condition", extra_key), ("text", text_key)):
            if key and key not in features:
                hint = " (no depth estimator is bundled: use a dataset with depth maps)" if key == "depth" else ""
                raise ValueError(
                    f"{builder.info.full_name} has no {role} feature {key!r}{hint}; its features: {', '.join(features)}"
                )
        self._keys = (image_key, extra_key, text_key)
        self._convert_modes = convert_modes
        shards = [
            tfds.split_for_jax_process(split, process_index=i, process_count=process_count)
            for i in range(process_count)
        ]
        sizes = [splits[s].num_examples for s in shards]
        self.total = splits[split].num_examples
        self.offset = sum(sizes[:process_index])
        try:
            self._records = builder.as_data_source(split=shards[process_index])
        except NotImplementedError as e:
            raise ValueError(
                f"{builder.info.full_name} is stored as {builder.info.file_format.value}; the pipeline reads "
                "examples by index (that is what makes resumed runs exact) and needs array_record. Convert "
                f"it once with: tfds convert_format --dataset_version_dir={builder.data_dir} "
                "--out_file_format=array_record"
            ) from e
        self._len = len(self._records)
        self.scan_counts: Counter = Counter()

    def __len__(self) -> int:
        return self._len

    def where(self, i: int) -> str:
        """Names record ``i`` in messages."""
        return f"{self.name}[{self.offset + i}]"

    def load(self, i: int) -> Example:
        image_key, extra_key, text_key = self._keys
        where = self.where(i)
        try:
            rec = self._records[i]
        except Exception as e:  # noqa: BLE001 -- corrupt record bytes can fail in any decoder
            raise BadExample("unreadable", f"{where}: {type(e).__name__}: {e}") from e
        image, converted = array_to_rgb(np.asarray(rec[image_key]), where, self._convert_modes)
        extra = None
        if extra_key:
            extra = np.asarray(rec[extra_key])
            if extra.size == 0:
                raise BadExample("missing_condition", f"{where}: empty {extra_key!r}")
            if extra_key != "depth":
                extra, _ = array_to_rgb(extra, where, self._convert_modes)
            else:
                extra = extra.astype(np.float32).reshape(extra.shape[:2] + (1,))
        text = rec[text_key] if text_key else ""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return Example(image, extra, str(text), converted)


def tfds_builder(name: str, data_dir: str | None) -> Any:
    """``tfds.builder`` with an error that suggests close names when the dataset is unknown."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=5)
        raise ValueError(
            f"unknown TFDS dataset {name!r}" + (f"; did you mean: {', '.join(close)}?" if close else "")
        ) from e


# --------------------------------------------------------------------------------------------
# Folders.


def _stem_index(folder: str, extensions: Sequence[str]) -> dict[str, str]:
    """relative path without extension -> path, for the files of ``folder`` (recursive)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(tuple(extensions)):
                path = os.path.join(dirpath, f)
                out[os.path.splitext(os.path.relpath(path, folder))[0]] = path
    return out


def _read_captions(path: str) -> dict[str, str]:
    """``captions.jsonl``: one {"file": <relative path or stem>, "text": ...} object per line."""
    captions = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                captions[os.path.splitext(obj["file"])[0]] = str(obj["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"file\": ..., \"text\": ...}}: {e}") from e
    return captions


class FolderSource:
    """Image files in a folder, optionally paired with condition files and captions.

    Layouts:

    * ``<root>/images/**`` (or the root's own image files) are the targets; ``<root>/depth/<stem>.*``
      are their depth maps (depth task); ``<root>/conditions/<stem>.*`` the images before the edit
      (edit task); ``<root>/captions.jsonl`` the captions or instructions.
    * Edit task, InstructPix2Pix layout: ``<root>/<id>/prompt.json`` (its ``"edit"`` is the
      instruction) with ``<seed>_0.jpg`` (before) and ``<seed>_1.jpg`` (after) pairs.

    A folder source has no held-out part of its own: point ``eval_split`` at another folder
    (``folder:<path>``), or use the same folder.
    """

    def __init__(
        self,
        root: str,
        *,
        extra: str,
        options: ml_collections.ConfigDict,
        convert_modes: bool,
        strict: bool,
        process_index: int,
        process_count: int,
    ):
        if not os.path.isdir(root):
            raise ValueError(f"folder source {root!r} does not exist")
        self.name = root
        self._convert_modes = convert_modes
        self.scan_counts = Counter()
        self._first_rejected: dict[str, str] = {}
        entries = self._scan_instructpix2pix(root) if extra == "source_image" else []
        if not entries:
            entries = self._scan_plain(root, extra, options, strict)
        if not entries:
            raise ValueError(f"no usable images in {root!r} (skipped at scan: {dict(self.scan_counts)})")
        self.total = len(entries)
        self.offset, end = _process_range(self.total, process_index, process_count)
        self._entries = entries[self.offset : end]
        self._extra = extra
        if self.scan_counts:
            logging.warning(
                "data: %s: skipped at scan: %s; first of each: %s", root, dict(self.scan_counts), self._first_rejected
            )

    def _scan_plain(
        self, root: str, extra: str, options: ml_collections.ConfigDict, strict: bool
    ) -> list[tuple[str, str | None, str]]:
        image_dir = os.path.join(root, options.image_dir)
        if not os.path.isdir(image_dir):
            image_dir = root
        paired_dir = {"depth": options.depth_dir, "source_image": options.cond_dir}.get(extra)
        skip_dirs = {os.path.join(root, d) for d in (options.depth_dir, options.cond_dir)}
        images = {}
        for dirpath, dirnames, files in os.walk(image_dir):
            # The paired folders sit inside root when images are at the top level.
            dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in skip_dirs)
            for f in files:
                path = os.path.join(dirpath, f)
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    images[os.path.splitext(os.path.relpath(path, image_dir))[0]] = path
                elif f != os.path.basename(options.captions):
                    self._reject(strict, "not_an_image", f"{path}: not an image file")
        paired = {}
        if paired_dir:
            folder = os.path.join(root, paired_dir)
            paired = _stem_index(folder, DEPTH_EXTENSIONS) if os.path.isdir(folder) else {}
        captions_path = os.path.join(root, options.captions)
        captions = _read_captions(captions_path) if os.path.isfile(captions_path) else {}
        entries = []
        for stem in sorted(images):
            if paired_dir and stem not in paired:
                hint = " (no depth estimator is bundled: precompute depth maps, e.g. with MiDaS/DPT)" if extra == "depth" else ""
                self._reject(strict, f"missing_{extra}", f"{images[stem]}: no {paired_dir}/{stem}.*{hint}")
                continue
            entries.append((images[stem], paired.get(stem), captions.get(stem, "")))
        return entries

    def _scan_instructpix2pix(self, root: str) -> list[tuple[str, str | None, str]]:
        entries = []
        for d in sorted(os.listdir(root)):
            prompt = os.path.join(root, d, "prompt.json")
            if not os.path.isfile(prompt):
                continue
            with open(prompt, encoding="utf-8") as f:
                instruction = json.load(f)["edit"]
            files = _stem_index(os.path.join(root, d), IMAGE_EXTENSIONS)
            for stem in sorted(files):
                if stem.endswith("_0") and stem[:-2] + "_1" in files:
                    # (target, paired input, text): the target is the edited image.
                    entries.append((files[stem[:-2] + "_1"], files[stem], instruction))
        return entries

    def _reject(self, strict: bool, reason: str, message: str) -> None:
        if strict:
            raise ValueError(f"{message} (data.strict=True)")
        self.scan_counts[reason] += 1
        self._first_rejected.setdefault(reason, message)

    def __len__(self) -> int:
        return len(self._entries)

    def where(self, i: int) -> str:
        """Names record ``i`` in messages."""
        return self._entries[i][0]

    def load(self, i: int) -> Example:
        path, paired, text = self._entries[i]
        image, converted = read_image(path, self._convert_modes)
        extra = None
        if self._extra == "depth":
            extra = read_depth(paired)
        elif self._extra == "source_image":
            extra, _ = read_image(paired, self._convert_modes)
        return Example(image, extra, text, converted)


# --------------------------------------------------------------------------------------------
# Demo.

# Edits a demo crop can undergo, with their instruction: the demo has no real editing triples, so
# the edit task learns these exact, checkable transformations.
DEMO_EDITS: tuple[tuple[str, Any], ...] = (
    ("flip it horizontally", lambda x: x[:, ::-1]),
    ("turn it upside down", lambda x: x[::-1]),
    ("make it black and white", lambda x: np.repeat(np.round(x @ np.array([0.299, 0.587, 0.114]))[..., None], 3, -1)),
    ("invert the colors", lambda x: 255 - x),
    ("make it warmer", lambda x: x * np.array([1.15, 1.0, 0.8])),
    ("increase the contrast", lambda x: (x - 128.0) * 1.5 + 128.0),
)


class DemoEditSource:
    """Edit triples made from the demo: record i gets edit i mod len(DEMO_EDITS)."""

    def __init__(self, base: TfdsSource):
        self._base = base
        self.name, self.total, self.offset, self.scan_counts = base.name, base.total, base.offset, base.scan_counts

    def __len__(self) -> int:
        return len(self._base)

    def where(self, i: int) -> str:
        return self._base.where(i)

    def load(self, i: int) -> Example:
        ex = self._base.load(i)
        instruction, fn = DEMO_EDITS[(self.offset + i) % len(DEMO_EDITS)]
        edited = np.clip(np.round(fn(ex.image.astype(np.float64))), 0, 255).astype(np.uint8)
        return Example(np.ascontiguousarray(edited), ex.image, instruction, ex.converted)
