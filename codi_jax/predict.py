"""Run a distilled model on your own pictures, of any size.

    python -m codi_jax.predict --model=embedded:demo_codi_sr --input=photo.png --output=out/
    python -m codi_jax.predict --model=runs/sr/export --input=lr_folder/ --output=sr_folder/ --steps=4
    python -m codi_jax.predict --model=runs/inpaint/export --input=pics/ --mask=masks/ --output=out/
    python -m codi_jax.predict --model=runs/edit/export --input=pic.png --prompt="make it winter" --output=out/

What ``--input`` is depends on the task the model was trained for (``codi.json``): the
low-resolution picture for super-resolution (the output is ``scale`` times larger), a depth map
(``.png`` 8/16-bit, ``.tif``, ``.npy``) for depth, the picture whose Canny edges condition for
canny, the picture before the edit for edit (``--prompt`` is the instruction), the picture with
``--mask`` (white = to fill; same size) for inpainting, whose known pixels are kept as they were.
Each output is ``<output>/<input stem>.png``; a folder gives the same relative tree.

Pictures larger than ``--tile`` are cut into overlapping tiles, sampled together as in
MultiDiffusion (Bar-Tal et al. 2023): the initial noise is drawn once for the whole latent
picture, and at every sampler step each tile's prediction x̂ (from its piece of the latents and
of the condition) is blended into one x̂ of the whole picture, with weights that fall linearly to
the tile edges over ``--overlap``, before the DDIM step is taken on the whole picture. The
autoencoder then decodes the latents tile by tile, blended the same way in pixels, so memory
depends on the tile and ``--batch`` (and the latent picture, a few numbers per pixel), and no
seam shows. Each tile shape compiles once, for every step count. Files that cannot be read are skipped and listed at the end; inputs are never
overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from codi_jax.config_lib import embedded_path
from codi_jax.export import load_exported
from codi_jax import diffusion
from codi_jax.sampling import make_tile_fns

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEPTH_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)
TASKS = ("sr", "depth", "inpaint", "edit", "canny")


class SkippedFile(Exception):
    """This input cannot be used; the message names the file and the reason."""


# -------------------------------------------------------------------------------------- tiling


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, length)`` with at least ``overlap`` shared
    between neighbours; the last tile ends at ``length``. ``length >= tile``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_ramp(tile: int, overlap: int) -> np.ndarray:
    """1-D blending weights of one tile: linear from 1/(overlap+1) at the edge to 1 inside."""
    if overlap <= 0:
        return np.ones(tile, np.float32)
    i = np.arange(tile, dtype=np.float32)
    return np.minimum(1.0, np.minimum(i + 1, tile - i) / (overlap + 1)).astype(np.float32)


def blend_tiles(tiles: list[np.ndarray], starts: list[tuple[int, int]], shape: tuple[int, int],
                overlap: int) -> np.ndarray:
    """The weighted average of ``tiles`` (each TxTxC, placed at ``starts``) on an ``shape`` canvas."""
    t = tiles[0].shape[0]
    ramp = blend_ramp(t, overlap)
    weight = (ramp[:, None] * ramp[None, :])[..., None]
    out = np.zeros(shape + tiles[0].shape[2:], np.float32)
    total = np.zeros(shape + (1,), np.float32)
    for tile, (y, x) in zip(tiles, starts):
        out[y:y + t, x:x + t] += weight * tile
        total[y:y + t, x:x + t] += weight
    return out / total


def _grid(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    return [(y, x) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]


def _chunks(items: np.ndarray, batch: int) -> list[tuple[np.ndarray, int]]:
    """``items`` (tile indices) in batches of exactly ``batch`` (the last padded with copies), so
    every call has one shape and compiles once; each with its number of real items."""
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        pad = batch - len(chunk)
        out.append((np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk, len(chunk)))
    return out


def _batched(fn: Callable[[np.ndarray], np.ndarray], items: np.ndarray, batch: int) -> list[np.ndarray]:
    """``fn`` over ``items`` in batches of ``batch`` (``_chunks``), the padding cut off."""
    return [x for chunk, n in _chunks(items, batch) for x in np.asarray(fn(chunk))[:n]]


# --------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class Predictor:
    """A distilled model ready to run: its params, the task it conditions on, and its jitted
    tile functions (one compilation per tile shape)."""

    student: Any
    params: Any
    aux: Any
    grid: int
    sampler: str         # "codi" (DDIM steps) | "renoise" (x̂ re-noised with fresh noise)
    task: str
    task_options: dict
    image_size: int
    factor: int          # pixels per latent pixel (1: a pixel-space model)
    multiple: int        # the UNet's latent tile sides must be multiples of this
    _tile_fns: Optional[tuple[Callable, Callable]] = None
    _decode: Optional[Callable] = None

    @property
    def scale(self) -> int:
        return int(self.task_options.get("scale", 4)) if self.task == "sr" else 1

    def tile_fns(self) -> tuple[Callable, Callable]:
        """The jitted ``(condition, denoise)`` of ``sampling.make_tile_fns``."""
        if self._tile_fns is None:
            self._tile_fns = tuple(jax.jit(fn) for fn in make_tile_fns(self.student))
        return self._tile_fns

    def decode_fn(self) -> Callable:
        if self._decode is None:
            self._decode = jax.jit(lambda aux, z: jnp.clip(self.student.decode(aux, z), -1.0, 1.0))
        return self._decode

    def tokens(self, prompt: str, n: int) -> Optional[np.ndarray]:
        """The prompt's token ids for a model that reads text, else None."""
        teacher = self.student.teacher
        if teacher.tokenizer is None:
            return None
        from codi_jax.models import clip

        ids, _ = clip.tokenize(teacher.tokenizer, [prompt or self.student.prompt] * n)
        return np.asarray(ids)


def load_predictor(model: str, guidance: float | None = None) -> Predictor:
    """The export folder or ``embedded:<name>`` model ``model``, with its ``codi.json`` task."""
    path = embedded_path(model.split(":", 1)[1]) if model.startswith("embedded:") else model
    meta_path = os.path.join(path, "codi.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"--model: {path} has no codi.json (not a codi_jax export folder)")
    with open(meta_path) as f:
        meta = json.load(f)
    if "task" not in meta:
        raise ValueError(f"--model: {meta_path} names no task (exported before tasks were recorded); "
                         "export the checkpoint again with --mode=export")
    student, params, aux, grid = load_exported(path)
    if guidance is not None:
        if not student.guidance_input:
            raise ValueError(f"--guidance: {model} is not guidance-aware (it was distilled without "
                             "classifier-free guidance and has no w input)")
        student = dataclasses.replace(student, guidance=float(guidance))
    params, aux = jax.device_put((params, aux))
    unet = student.config["unet"]
    levels = len(unet["block_out_channels"])
    if student.teacher.latent:
        probe = jax.eval_shape(lambda a, x: student.encode_images(a, x, None), aux,
                               jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
        factor = 64 // probe.shape[1]
    else:
        factor = 1
    return Predictor(student, params, aux, grid, meta.get("sampler", "codi"), meta["task"], meta.get("task_options", {}),
                     int(meta.get("image_size", 64)), factor, 2 ** (levels - 1))


# ---------------------------------------------------------------------------------- conditions


def read_rgb01(path: str) -> np.ndarray:
    """A picture file as HxWx3 float32 in [0, 1]; ``SkippedFile`` naming it if unreadable."""
    from codi_jax.data.sources import BadExample, read_image

    try:
        return read_image(path)[0].astype(np.float32) / 255.0
    except BadExample as err:
        raise SkippedFile(str(err)) from None


def sr_condition(lr: np.ndarray, scale: int) -> np.ndarray:
    """The SR condition of a low-resolution picture (HxWx3 in [0, 1]): its bicubic upsampling by
    ``scale``, in [-1, 1], as ``data/tasks.py:sr`` builds it for training."""
    import tensorflow as tf

    from codi_jax.data import ops

    h, w = lr.shape[:2]
    return ops.resize_bicubic(tf.constant(lr), (h * scale, w * scale)).numpy() * 2.0 - 1.0


def condition(p: Predictor, path: str, mask_path: Optional[str]) -> tuple[np.ndarray, dict]:
    """The model's condition for the input ``path`` (HxWxC in [-1, 1], at the output size) as the
    training data built it (``codi_jax/data/tasks.py``), and what the output needs of the input."""
    import tensorflow as tf

    from codi_jax.data import ops

    if p.task == "depth":
        from codi_jax.data.sources import BadExample, read_depth

        try:
            depth = read_depth(path)
        except BadExample as err:
            raise SkippedFile(str(err)) from None
        d = ops.normalize_depth(tf.constant(depth)).numpy()
        return np.repeat(d, int(p.task_options.get("channels", 3)), axis=-1), {}
    image = read_rgb01(path)
    signed = image * 2.0 - 1.0
    if p.task == "sr":
        return sr_condition(image, p.scale), {}
    if p.task == "edit":
        return signed, {}
    if p.task == "canny":
        o = p.task_options
        edges = ops.canny(tf.constant(image), o.get("low_threshold", 100.0), o.get("high_threshold", 200.0),
                          o.get("sigma", 0.0)).numpy()
        return np.repeat(edges * 2.0 - 1.0, int(o.get("channels", 3)), axis=-1), {}
    if p.task == "inpaint":
        if mask_path is None:
            raise SkippedFile(f"{path}: no mask (--mask: a file, or a folder with a mask of the same stem)")
        mask = read_rgb01(mask_path).mean(axis=-1, keepdims=True) > 0.5
        if mask.shape[:2] != image.shape[:2]:
            raise SkippedFile(f"{mask_path}: mask of size {mask.shape[1]}x{mask.shape[0]} for the "
                              f"{image.shape[1]}x{image.shape[0]} picture {path}")
        m = mask.astype(np.float32)
        return np.concatenate([signed * (1.0 - m), m], axis=-1), {"keep": (signed, m)}
    raise ValueError(f"codi.json: task {p.task!r} cannot be predicted; known: {list(TASKS)}")


# ----------------------------------------------------------------------------------- prediction


def initial_noise(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The sampler's initial noise for a whole picture (HxWxC in the model's data space), drawn
    once and cut into tiles, so tiles agree where they overlap."""
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))


def predict(p: Predictor, cond: np.ndarray, steps: int, seed: int, tile: int, overlap: int, batch: int,
            prompt: str = "") -> np.ndarray:
    """The model's output (HxWx3 in [-1, 1]) for the condition ``cond`` (HxWxC at the output
    size), tiled in latent space (see the module docstring). ``tile`` / ``overlap`` in pixels."""
    h, w = cond.shape[:2]
    f, lt, lo = p.factor, tile // p.factor, overlap // p.factor
    # Pad (edge pixels repeated) to whole latent pixels and at least one tile.
    lh, lw = max(math.ceil(h / f), lt), max(math.ceil(w / f), lt)
    padded = np.pad(cond, ((0, lh * f - h), (0, lw * f - w), (0, 0)), mode="edge")
    channels = p.student.config["unet"].get("in_channels", 4) if p.student.teacher.latent else 3
    noise = initial_noise(seed, (lh, lw, channels))
    starts = _grid(lh, lw, lt, lo)
    cond_tiles = np.stack([padded[y * f:(y + lt) * f, x * f:(x + lt) * f] for y, x in starts])
    text = p.tokens(prompt, batch)
    condition, denoise = p.tile_fns()
    index = np.arange(len(starts))
    chunks = _chunks(index, batch)
    encoded = [condition(p.aux, cond_tiles[idx], text) for idx, _ in chunks]   # once per tile
    schedule = p.student.teacher.schedule
    z = noise
    ts = diffusion.timesteps(steps, p.grid)
    for k, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        # Every tile's x̂ from its piece of the current latents, blended into the picture's x̂;
        # then CoDi's (DDIM) step on the whole picture, so overlapping tiles share every z_t.
        x_hats = []
        for (idx, n), (c, context) in zip(chunks, encoded):
            z_tiles = np.stack([z[starts[i][0]:starts[i][0] + lt, starts[i][1]:starts[i][1] + lt] for i in idx])
            x_hats.extend(np.asarray(denoise(p.params, c, context, z_tiles, np.float32(t)))[:n])
        x_hat = blend_tiles(x_hats, starts, (lh, lw), lo)
        if p.sampler == "renoise":   # re-noised with fresh noise, drawn for the whole picture
            eps_hat = initial_noise(seed + 1 + k, z.shape)
        else:
            eps_hat = (z - float(schedule.alpha(t)) * x_hat) / float(schedule.sigma(t))
        z = np.asarray(diffusion.ddim_update(x_hat, eps_hat, float(schedule.alpha(s)), float(schedule.sigma(s))))
    if p.student.teacher.latent:
        decode = p.decode_fn()
        pieces = _batched(lambda idx: decode(p.aux, np.stack([z[y:y + lt, x:x + lt] for y, x in
                                                              (starts[i] for i in idx)])), index, batch)
        image = blend_tiles(pieces, [(y * f, x * f) for y, x in starts], (lh * f, lw * f), lo * f)
    else:
        image = z
    return np.clip(image[:h, :w], -1.0, 1.0)


# ------------------------------------------------------------------------------------------ CLI


def color_fixed(image: np.ndarray, bicubic: np.ndarray, scale: int) -> np.ndarray:
    """``image`` with the low frequencies of ``bicubic`` (the SR condition): the wavelet colour fix."""
    from codi_jax import color_fix

    levels = color_fix.levels_for_scale(scale)
    return np.asarray(color_fix.wavelet_color_fix(jnp.asarray(image)[None], jnp.asarray(bicubic[..., :3])[None],
                                                  levels)[0])


def input_files(path: str, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(file, path relative to the input root) of ``path``: the file itself, or every file under
    the folder with one of ``extensions``, sorted."""
    if os.path.isfile(path):
        return [(path, os.path.basename(path))]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input: {path} is neither a file nor a folder")
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            if name.lower().endswith(extensions):
                full = os.path.join(root, name)
                found.append((full, os.path.relpath(full, path)))
    return sorted(found)


def _mask_for(mask: str, rel: str) -> Optional[str]:
    if not mask:
        return None
    if os.path.isfile(mask):
        return mask
    stem = os.path.splitext(rel)[0]
    for ext in IMAGE_EXTENSIONS:
        if os.path.exists(os.path.join(mask, stem + ext)):
            return os.path.join(mask, stem + ext)
    return None


def run(model: str, input_path: str, output: str, steps: int = 4, seed: int = 0, prompt: str = "",
        tile: int = 0, overlap: int = -1, batch: int = 1, mask: str = "", color_fix: bool = True,
        progress: bool = True, guidance: float | None = None) -> tuple[list[str], list[str]]:
    """Predicts every input; returns (written files, skipped files' reasons). ``color_fix``: SR
    outputs take their low frequencies from the bicubic input (``codi_jax/color_fix.py``).
    ``guidance``: the w a guidance-aware model samples with (``None``: the one it was exported with)."""
    if os.path.abspath(output) == os.path.abspath(input_path):
        raise ValueError("--output: must differ from --input (inputs are never overwritten)")
    p = load_predictor(model, guidance)
    if mask and p.task != "inpaint":
        raise ValueError(f"--mask: the model's task is {p.task!r}, not inpainting")
    if p.task == "inpaint" and not mask:
        raise ValueError("--mask: an inpainting model needs the masks (a file, or a folder of masks named as the inputs)")
    if prompt and p.student.teacher.text_encoder is None:
        logging.warning("--prompt: this model has no text encoder; the prompt is not read")
    tile = tile or p.image_size
    overlap = tile // 4 if overlap < 0 else overlap
    unit = p.factor * p.multiple
    if tile % unit or tile <= 0:
        raise ValueError(f"--tile: {tile} px is not a multiple of {unit} (the autoencoder's {p.factor}x "
                         f"times the UNet's {p.multiple}x downsampling)")
    if overlap % p.factor or not 0 <= overlap < tile:
        raise ValueError(f"--overlap: {overlap} px must be a multiple of {p.factor} in [0, {tile})")
    files = input_files(input_path, DEPTH_EXTENSIONS if p.task == "depth" else IMAGE_EXTENSIONS)
    inputs = {os.path.abspath(f) for f, _ in files}
    written, skipped = [], []
    from tqdm import tqdm

    for path, rel in tqdm(files, desc="pictures", unit="picture", disable=not progress):
        out_path = os.path.join(output, os.path.splitext(rel)[0] + ".png")
        if os.path.abspath(out_path) in inputs:
            raise ValueError(f"--output: {out_path} would overwrite an input; choose another folder")
        try:
            cond, keep = condition(p, path, _mask_for(mask, rel))
        except SkippedFile as err:
            skipped.append(str(err))
            continue
        image = predict(p, cond, steps, seed, tile, overlap, batch, prompt)
        if color_fix and p.task == "sr":
            image = color_fixed(image, cond, p.scale)
        if "keep" in keep:  # inpainting: the known pixels stay as they were
            signed, m = keep["keep"]
            image = m * image + (1.0 - m) * signed
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        pixels = np.round((image + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out_path)
        written.append(out_path)
    return written, skipped


def _define_flags() -> None:
    """The command's flags, defined only when this module is the command (``evaluate`` shares names)."""
    flags.DEFINE_string("model", None, "An export folder, or embedded:<name> (e.g. embedded:demo_codi_sr).")
    flags.DEFINE_string("input", None, "A picture, or a folder of them (searched recursively).")
    flags.DEFINE_string("output", None, "The folder the outputs are written to, as <input stem>.png.")
    flags.DEFINE_integer("steps", 4, "Sampling steps on the model's teacher grid (1, 2, 4, 8 ...).")
    flags.DEFINE_integer("seed", 0, "The initial noise's seed (the same for every picture).")
    flags.DEFINE_string("prompt", "", "Text for models that read it; for editing, the instruction.")
    flags.DEFINE_integer("tile", 0, "Tile side in output pixels; 0 = the model's training size.")
    flags.DEFINE_integer("overlap", -1, "Overlap of neighbouring tiles in output pixels; -1 = tile / 4.")
    flags.DEFINE_integer("batch", 1, "Tiles per model call.")
    flags.DEFINE_bool("color_fix", True, "Super-resolution: low frequencies (colour) from the bicubic input, "
                      "the model's own detail (the wavelet colour fix the evaluation reports as +colorfix).")
    flags.DEFINE_float("guidance", None, "Guidance-aware models: the guidance weight w (diffusers' scale "
                       "1 + w); default: the one the model was exported with.")
    flags.DEFINE_string("mask", "", "Inpainting: a mask file, or a folder of masks named as the inputs (white = fill).")


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    for name in ("model", "input", "output"):
        if not getattr(FLAGS, name):
            sys.exit(f"predict: --{name} is required")
    try:
        written, skipped = run(FLAGS.model, FLAGS.input, FLAGS.output, FLAGS.steps, FLAGS.seed, FLAGS.prompt,
                               FLAGS.tile, FLAGS.overlap, FLAGS.batch, FLAGS.mask, FLAGS.color_fix,
                               guidance=FLAGS.guidance)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"predict: {err}")
    print(f"predict: wrote {len(written)} picture(s) to {FLAGS.output}")
    if skipped:
        print(f"predict: skipped {len(skipped)} file(s):")
        for reason in skipped:
            print(f"  {reason}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
