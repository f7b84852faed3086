"""The tests' tiny trainer setup: a random two-level pixel UNet on 16x16 crops, four CoDi steps.

Written as (dotted key, value) overrides of ``config_lib.base_config("sr")`` so that one list builds
both the in-process configs (``tiny_config``) and the config file the multi-host test's worker
processes load.
"""

from __future__ import annotations

import json
import pathlib
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


def write_tiny_tokenizer(folder: pathlib.Path) -> dict[str, int]:
    """A word-level-ish CLIP BPE tokenizer folder (single letters, letters ending a word, merges
    for 'cat'; SD's 77-token length); returns its vocabulary."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab: dict[str, int] = {}
    for tok in letters + [t + "</w>" for t in letters] + ["ca", "cat</w>"]:
        vocab[tok] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return vocab
