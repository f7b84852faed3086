"""Device mesh and sharding rules.

One mesh with axes ``('data', 'fsdp')``. Batches are split over both axes (every device holds a
distinct slice of the global batch); parameters, EMA target and optimizer state are split over
``fsdp`` by a rule: the largest dimension divisible by the fsdp size is sharded, small tensors are
replicated. XLA inserts the all-gathers (forward) and reduce-scatters (gradients) — ZeRO-3 style.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves ``-1`` (fill with the remaining devices) and checks the product."""
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not divide {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} != {num_devices} devices")
    return sizes[0], sizes[1]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def param_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**14) -> P:
    """The fsdp rule for one array: shard its largest dimension that the fsdp size divides."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs): the fsdp rule of
    ``param_spec``."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, param_spec(np.shape(leaf), fsdp, min_size)), tree)


def host_device() -> jax.Device:
    """The host's CPU device: weights are read and adapted there, in host memory, and then placed
    once, sharded, on the mesh. Without a CPU backend (``JAX_PLATFORMS`` excludes it), the first
    local device, whose copies are freed once placed."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``tree``'s leaves as ``jax.ShapeDtypeStruct``s carrying ``shardings``: what is lowered and
    compiled, and what orbax restores onto."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh), tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
