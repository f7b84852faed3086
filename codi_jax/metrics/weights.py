"""Reading the metric networks' weights: a PyTorch state dict stored as ``.safetensors`` or
``.npz``, converted with ``codi_jax.models.convert.torch_to_flax`` (rename + transpose, checked
against the module's shapes). Errors are the model loader's, so a missing or bad file is a
``ModelIOError`` the evaluation reports as "not computed".

Pickled ``.pth`` files are refused, as everywhere in this project (unpickling can run code);
convert once where torch is available:

    python -c "import torch, safetensors.torch as st; \
sd = torch.load('FILE.pth', map_location='cpu', weights_only=True); \
st.save_file({k: v.float().contiguous() for k, v in sd.items()}, 'FILE.safetensors')"
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

from codi_jax.models import convert
from codi_jax.models.io import NonFiniteWeightsError, PickleRefusedError, WeightFileError, \
    WeightsNotFoundError

_PICKLES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a ``.safetensors`` or ``.npz`` file, keyed by their PyTorch names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"weight file {path!r} does not exist")
    if path.endswith(_PICKLES):
        raise PickleRefusedError(
            f"{path!r} is a pickled PyTorch file; unpickling can execute code, so metric weights are read "
            "from .safetensors or .npz only (see codi_jax/metrics/weights.py for the one-line conversion)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            state = dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightFileError(f"cannot read {path}: not a valid safetensors file ({err})") from None
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as err:
            raise WeightFileError(f"cannot read {path}: not a valid .npz file ({err})") from None
    else:
        raise WeightFileError(f"{path!r}: unknown weight file type; expected .safetensors or .npz")
    bad = [k for k, v in state.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(f"weights in {path!r} contain NaN or Inf: {', '.join(bad[:10])}")
    return state


def to_params(state: Mapping[str, np.ndarray], module: Any, example_inputs: tuple,
              context: str) -> dict:
    """Converts a (normalised) PyTorch state dict into ``module``'s params tree, checking every
    key and shape against ``jax.eval_shape`` of ``module.init``."""
    target = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_inputs))["params"]
    params = convert.torch_to_flax({k: np.asarray(v, np.float32) for k, v in state.items()}, target,
                                   context=context)
    return jax.tree.map(np.asarray, params)
