"""PyTorch state dict <-> Flax parameter tree: a rename plus a transpose, nothing else.

Naming rule (MaxDiffusion's convention): the Flax path mirrors the PyTorch key, with list indices
joined to the preceding name by ``_`` (``down_blocks.0`` -> ``down_blocks_0``, ``to_out.0`` ->
``to_out_0``) and the leaf renamed by kind (``weight`` -> ``kernel`` for Dense/Conv, ``scale`` for
LayerNorm/GroupNorm, ``embedding`` for ``nn.Embed``).

PyTorch -> Flax is unambiguous: a purely numeric key segment is always a list index, and which of
``kernel``/``scale``/``embedding`` a ``weight`` becomes is read off the target tree (from
``jax.eval_shape`` of the module). Flax -> PyTorch has one ambiguity: a segment such as
``linear_1`` may be a real attribute name (diffusers' ``TimestepEmbedding.linear_1``) or the list
element ``linear.1``. Real attribute names that end in ``_<digits>`` are listed explicitly in
:data:`NAMES_ENDING_IN_DIGITS`; every other ``name_<digits>`` segment is a list index.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Attribute names in diffusers/transformers modules that end in ``_<digits>`` but are not list
# elements. Checked against the full key sets of UNet2DConditionModel, ControlNetModel,
# AutoencoderKL and CLIPTextModel (tests/test_convert.py).
NAMES_ENDING_IN_DIGITS: frozenset[str] = frozenset({"linear_1", "linear_2"})

# Buffers that PyTorch checkpoints may carry but that are not parameters of the Flax modules
# (transformers' CLIP stores ``embeddings.position_ids``, an arange).
NON_PARAMETER_BUFFERS: frozenset[str] = frozenset({"position_ids"})

# Flax leaf names that correspond to PyTorch's ``weight``.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")

_INDEXED = re.compile(r"^(.+)_(\d+)$")

__all__ = [
    "ModelIOError",
    "NAMES_ENDING_IN_DIGITS",
    "NON_PARAMETER_BUFFERS",
    "WeightMismatchError",
    "flatten",
    "flax_path_to_torch_key",
    "flax_to_torch",
    "kernel_to_flax",
    "kernel_to_torch",
    "torch_key_to_flax_path",
    "torch_to_flax",
    "unflatten",
]


class ModelIOError(Exception):
    """Base of every error that reading or writing a checkpoint raises for a user mistake or a bad file
    (see :mod:`codi_jax.models.io`); defined here so that :class:`WeightMismatchError` is one too."""


class WeightMismatchError(ModelIOError, ValueError):
    """A checkpoint does not fit the module: lists every missing, unexpected and misshaped key."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        context: str = "",
    ):
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [
            f"checkpoint does not match the model{(' (' + context + ')') if context else ''}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrongly shaped "
            "(shapes in PyTorch layout)"
        ]
        lines += [f"  missing:    {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape:      {k}: checkpoint {c} vs model {m}" for k, c, m in mismatched]
        super().__init__("\n".join(lines))


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mapping -> {path tuple: leaf}."""
    out: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        path = prefix + (str(name),)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """{path tuple: leaf} -> nested plain dicts."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1.weight`` -> ``('down_blocks_0', 'resnets_1', 'conv1', 'weight')``.

    The leaf keeps its PyTorch name: whether ``weight`` is a kernel, a norm scale or an embedding
    depends on the module, which :func:`torch_to_flax` reads off the target tree.
    """
    path: list[str] = []
    for segment in key.split("."):
        if segment.isdigit():
            if not path:
                raise ValueError(f"key {key!r} starts with a list index")
            path[-1] = f"{path[-1]}_{segment}"
        else:
            path.append(segment)
    return tuple(path)


def flax_path_to_torch_key(path: Iterable[str]) -> str:
    """``('time_embedding', 'linear_1', 'kernel')`` -> ``time_embedding.linear_1.weight``."""
    path = tuple(path)
    segments = []
    for segment in path[:-1]:
        match = _INDEXED.match(segment)
        if match and segment not in NAMES_ENDING_IN_DIGITS:
            segments += [match.group(1), match.group(2)]
        else:
            segments.append(segment)
    leaf = path[-1]
    segments.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
    return ".".join(segments)


def kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """PyTorch (out, in, *spatial) -> Flax (*spatial, in, out); for Dense this is a plain transpose."""
    n = weight.ndim
    return np.transpose(weight, tuple(range(2, n)) + (1, 0))


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax (*spatial, in, out) -> PyTorch (out, in, *spatial)."""
    n = kernel.ndim
    return np.transpose(kernel, (n - 1, n - 2) + tuple(range(n - 2)))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the PyTorch tensor that a Flax leaf of ``shape`` corresponds to."""
    if path[-1] == "kernel" and len(shape) >= 2:
        n = len(shape)
        return tuple(shape[i] for i in (n - 1, n - 2) + tuple(range(n - 2)))
    return tuple(shape)


def _to_flax_leaf(path: tuple[str, ...], value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if path[-1] != "kernel" or value.ndim < 2:
        return value
    # Old checkpoints (e.g. the SD VAE's mid-block attention as first converted from LDM) store
    # Dense layers as 1x1 convolutions; diffusers squeezes them on load, and so do we.
    if len(target_shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    return kernel_to_flax(value)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray], target_shapes: Mapping[str, Any], context: str = ""
) -> dict[str, Any]:
    """Rename and transpose a PyTorch state dict into a Flax params tree shaped like ``target_shapes``.

    ``target_shapes`` is the params tree (without the ``"params"`` wrapper) whose leaves have
    ``.shape`` and optionally ``.dtype`` -- typically ``jax.eval_shape(module.init, ...)["params"]``.
    Values are cast to the target dtype. All problems (missing keys, unexpected keys, wrong shapes)
    are collected and raised together as one :class:`WeightMismatchError`; nothing is returned
    partially. ``context`` is prepended to that error (e.g. the file and component).
    """
    targets = flatten(target_shapes)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    seen: set[tuple[str, ...]] = set()
    for key, value in state_dict.items():
        torch_path = torch_key_to_flax_path(key)
        if torch_path[-1] in NON_PARAMETER_BUFFERS:
            continue
        leaves = _WEIGHT_LEAVES if torch_path[-1] == "weight" else (torch_path[-1],)
        path = next((torch_path[:-1] + (leaf,) for leaf in leaves if torch_path[:-1] + (leaf,) in targets), None)
        if path is None:
            unexpected.append(key)
            continue
        if path in seen:
            raise ValueError(f"two checkpoint keys map to the same parameter {'/'.join(path)} (second: {key!r})")
        seen.add(path)
        target = targets[path]
        value = np.asarray(value)
        converted = _to_flax_leaf(path, value, tuple(target.shape))
        if tuple(converted.shape) != tuple(target.shape):
            mismatched.append((key, tuple(value.shape), _torch_shape(path, tuple(target.shape))))
            continue
        dtype = getattr(target, "dtype", None)
        out[path] = np.ascontiguousarray(converted if dtype is None else converted.astype(dtype, copy=False))
    missing = [flax_path_to_torch_key(p) for p in targets if p not in seen]
    if missing or unexpected or mismatched:
        raise WeightMismatchError(sorted(missing), sorted(unexpected), sorted(mismatched), context)
    return unflatten(out)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params tree (without the ``"params"`` wrapper) -> PyTorch-named, PyTorch-layout numpy arrays.

    Arrays are contiguous (as safetensors requires) and keep their dtype.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in flatten(params).items():
        key = flax_path_to_torch_key(path)
        if key in out:
            raise ValueError(f"two parameters map to the same PyTorch key {key!r}: {'/'.join(path)}")
        value = np.asarray(value)
        if path[-1] == "kernel" and value.ndim >= 2:
            value = kernel_to_torch(value)
        out[key] = np.ascontiguousarray(value)
    return out
