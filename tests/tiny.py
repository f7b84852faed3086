"""The tests' tiny trainer setup: a random two-level pixel UNet on 16x16 crops, four CoDi steps.

Written as (dotted key, value) overrides of ``config_lib.base_config("sr")`` so that one list builds
both the in-process configs (``tiny_config``) and the config file the multi-host test's worker
processes load.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from codi_jax import config_lib

TINY_UNET = dict(config_lib.DEMO_UNET, block_out_channels=[8, 16], layers_per_block=1,
                 norm_num_groups=4, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2)

TINY_OVERRIDES: tuple[tuple[str, Any], ...] = (
    ("model.pretrained", ""),  # random teacher: no asset needed
    ("model.unet_config", TINY_UNET), ("model.prediction_type", "v_prediction"),
    ("data.image_size", 16), ("train.batch_size", 8), ("train.num_steps", 4), ("train.warmup_steps", 1),
    ("train.checkpoint_every", 2), ("train.log_every", 1), ("distill.grid", 10),
    ("distill.timestep_sampling", "sample"), ("eval.num_examples", 0), ("export", False),
)


def override(c: ml_collections.ConfigDict, overrides: tuple[tuple[str, Any], ...]) -> ml_collections.ConfigDict:
    """Sets each dotted key of ``overrides`` in ``c`` (later entries win)."""
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def tiny_config(**train_overrides: Any) -> ml_collections.ConfigDict:
    """The tiny config, with ``train.<key>`` overrides."""
    c = override(config_lib.base_config("sr"), TINY_OVERRIDES)
    return override(c, tuple((f"train.{k}", v) for k, v in train_overrides.items()))
