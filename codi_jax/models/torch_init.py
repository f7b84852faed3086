"""PyTorch's default initialisation of ``nn.Conv2d`` / ``nn.Linear`` for a flax param tree.

Flax initialises kernels LeCun-normal and biases to zero; PyTorch draws both uniformly from
±1/√fan_in (``kaiming_uniform_(a=√5)`` for the kernel). Diffusers' models were trained from the
latter, and the difference matters for a GroupNorm network trained from scratch: with zero biases,
``conv_in`` of a flat picture is a homogeneous linear function of its colour, and the GroupNorm
after it keeps only the colour's direction, not its magnitude. Random biases give every group a
colour-independent offset, so a flat region's level survives the normalisation from the start.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import traverse_util


def torch_default_init(params: Any, rng: jax.Array) -> Any:
    """``params`` with every ``kernel`` (HWIO conv or IO dense) and the ``bias`` beside it redrawn
    from U(−1/√fan_in, 1/√fan_in), fan_in = the kernel's size without its output axis.

    Norm layers (``scale``/``bias`` without a ``kernel``) keep their values (1 and 0, as in
    PyTorch). Meant for modules trained from scratch: zero-initialised layers (ControlNet's zero
    convolutions) would lose their zeros.
    """
    flat = traverse_util.flatten_dict(params)
    out = dict(flat)
    kernels = sorted(path for path in flat if path[-1] == "kernel")
    for i, path in enumerate(kernels):
        kernel = flat[path]
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
        k_rng, b_rng = jax.random.split(jax.random.fold_in(rng, i))
        out[path] = jax.random.uniform(k_rng, kernel.shape, kernel.dtype, -bound, bound)
        bias_path = path[:-1] + ("bias",)
        if bias_path in flat:
            bias = flat[bias_path]
            out[bias_path] = jax.random.uniform(b_rng, bias.shape, bias.dtype, -bound, bound)
    return traverse_util.unflatten_dict(out)
