"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a param-tree
transform, for any module of the adapted model (the UNet, the conditional encoder, the ControlNet).

``add_lora`` puts two factors beside each targeted kernel W (attention projections ``to_q``,
``to_k``, ``to_v``, ``to_out_0``; with ``convs`` also every convolution):

    W' = W + A · B,    A: W.shape[:-1] + (r,),  B: (r, out),  B = 0 at initialisation,

so the model computes exactly its base function until B moves. ``merge`` folds the factors in and
returns a plain params tree (the model call, the export); ``trainable_mask`` trains only the factors
and the adapter's parts that do not copy a pretrained weight (μ, zero convs, hint stems), so the
base weights get no gradient, optimizer state or EMA copy. The scale α / r of the paper is 1
(α = r), which is what diffusers assumes for a PEFT file without alphas; ``peft_state_dict``
writes such a file (keys ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight``) that
diffusers' ``load_lora_weights`` reads.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from codi_jax.models.convert import flax_path_to_torch_key

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
FACTORS = ("lora_A", "lora_B")


def _targets(flat: dict, modules: Iterable[str], convs: bool) -> list[tuple[str, ...]]:
    """Paths of the kernels that get factors: in ``modules`` (top-level names of the tree)."""
    modules = tuple(modules)
    out = []
    for path, value in flat.items():
        if path[-1] != "kernel" or path[0] not in modules:
            continue
        if path[-2] in ATTENTION_TARGETS or (convs and np.ndim(value) == 4):
            out.append(path)
    return out


def add_lora(params: dict, rank: int, rng: jax.Array, modules: Iterable[str] = ("unet", "adapter"),
             convs: bool = False, skip: Any = None) -> dict:
    """``params`` with rank-``rank`` factors beside the targeted kernels of ``modules``. ``A`` is
    drawn N(0, 1/fan_in) (fan_in of W), ``B`` is 0. Kernels where the mask ``skip`` is true (new
    weights that train fully anyway, e.g. a zero conv) get none."""
    if rank < 1:
        raise ValueError(f"model.lora_rank: must be at least 1 to add LoRA factors, got {rank}")
    flat = traverse_util.flatten_dict(params)
    skip_flat = traverse_util.flatten_dict(skip) if skip is not None else {}
    paths = [p for p in _targets(flat, modules, convs) if not skip_flat.get(p, False)]
    if not paths:
        raise ValueError(f"LoRA: no attention projection{' or convolution' * convs} in {list(modules)}")
    keys = jax.random.split(rng, len(paths))
    for key, path in zip(keys, paths):
        kernel = flat[path]
        fan_in = int(np.prod(kernel.shape[:-1]))
        a = jax.random.normal(key, tuple(kernel.shape[:-1]) + (rank,), jnp.float32) / np.sqrt(fan_in)
        flat[path[:-1] + ("lora_A",)] = a.astype(kernel.dtype)
        flat[path[:-1] + ("lora_B",)] = jnp.zeros((rank, kernel.shape[-1]), kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def has_lora(params: Any) -> bool:
    return any(path[-1] in FACTORS for path in traverse_util.flatten_dict(params))


def merge(params: Any) -> Any:
    """The plain params tree: every kernel with factors becomes W + A·B, the factors dropped.
    A tree without factors is returned as it is (no copy, so the model call stays free)."""
    if not isinstance(params, dict) or not has_lora(params):
        return params
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if path[-1] in FACTORS:
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in flat:
            a, b = flat[path[:-1] + ("lora_A",)], flat[path[:-1] + ("lora_B",)]
            value = value + jnp.tensordot(a, b, axes=1).astype(value.dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def trainable_mask(params: dict, new_weights: dict) -> dict:
    """With LoRA: the factors train, and the weights that are new (``new_weights`` true: not a
    copy of a pretrained weight, e.g. μ and the zero convs, ``adapters.new_weights_mask``); every
    pretrained weight is frozen."""
    flat = traverse_util.flatten_dict(params)
    new = traverse_util.flatten_dict(new_weights)
    return traverse_util.unflatten_dict({p: p[-1] in FACTORS or bool(new.get(p, False)) for p in flat})


def peft_state_dict(params: dict, prefix: str = "unet") -> dict[str, np.ndarray]:
    """The factors of ``params`` (one module's tree, e.g. the UNet's) in PEFT's layout, keyed as
    diffusers' LoRA files are: ``<prefix>.<module>.lora_A.weight`` (r, in[, kh, kw]) and
    ``lora_B.weight`` (out, r[, 1, 1])."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, a in flat.items():
        if path[-1] != "lora_A":
            continue
        a, b = np.asarray(a, np.float32), np.asarray(flat[path[:-1] + ("lora_B",)], np.float32)
        module = flax_path_to_torch_key(path[:-1] + ("kernel",))[:-len(".weight")]
        if a.ndim == 4:   # conv: A is a (kh, kw, in, r) conv, B a 1x1 conv
            out[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
            out[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None])
        else:
            out[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            out[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out
