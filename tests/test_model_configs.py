"""Shipped SD 1.5 / 2.1 component configs build modules with exactly diffusers' parameter counts."""
import importlib

import jax
import numpy as np
import pytest

from codi_jax import models

# What diffusers/transformers report for the real checkpoints (the parameter counts of
# the published checkpoints; SD 2.1's text encoder is OpenCLIP ViT-H/14's text tower with its last layer dropped).
EXPECTED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "controlnet"): 361_279_120,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd21", "unet"): 865_910_724,
    ("sd21", "controlnet"): 364_228_240,
    ("sd21", "vae"): 83_653_863,
    ("sd21", "text_encoder"): 340_387_840,
}
MODULES = {
    "unet": ("codi_jax.models.unet", "UNet2DConditionModel"),
    "controlnet": ("codi_jax.models.controlnet", "ControlNetModel"),
    "vae": ("codi_jax.models.vae", "AutoencoderKL"),
    "text_encoder": ("codi_jax.models.clip", "CLIPTextModel"),
}


@pytest.mark.parametrize("preset,component", sorted(EXPECTED))
def test_parameter_count_matches_diffusers(preset, component):
    module_name, class_name = MODULES[component]
    cls = getattr(pytest.importorskip(module_name), class_name)
    config = models.get_config(component, preset)
    module = cls.from_config(config)
    inputs = cls.dummy_inputs(config)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert count == EXPECTED[preset, component]


def test_configs_carry_the_distinguishing_sd_settings():
    sd15, sd21 = models.get_config("unet", "sd15"), models.get_config("unet", "sd21")
    assert (sd15["attention_head_dim"], sd15["cross_attention_dim"], sd15["use_linear_projection"]) == (8, 768, False)
    assert (sd21["attention_head_dim"], sd21["cross_attention_dim"], sd21["use_linear_projection"]) == (
        [5, 10, 20, 20], 1024, True)
    assert sd21["upcast_attention"] and not sd15["upcast_attention"]
    for preset in models.PRESETS:
        unet, controlnet = models.get_config("unet", preset), models.get_config("controlnet", preset)
        # The ControlNet is a copy of its UNet's encoder: every shared architecture key agrees.
        shared = set(unet) & set(controlnet) - {"_class_name"}
        assert {k: controlnet[k] for k in shared} == {k: unet[k] for k in shared}
        assert models.get_config("vae", preset)["scaling_factor"] == 0.18215
    assert models.get_config("text_encoder", "sd21")["hidden_act"] == "gelu"


def test_get_config_returns_a_fresh_dict_and_rejects_unknown_names():
    config = models.get_config("vae", "sd15")
    config["latent_channels"] = 99
    assert models.get_config("vae", "sd15")["latent_channels"] == 4
    with pytest.raises(models.ConfigError, match="sdxl"):
        models.get_config("unet", "sdxl")
    with pytest.raises(models.ComponentError, match="tokenizer"):
        models.get_config("tokenizer", "sd15")


def test_every_registered_module_imports():
    for module_name, class_name in MODULES.values():
        cls = getattr(importlib.import_module(module_name), class_name)
        assert callable(cls.from_config) and callable(cls.dummy_inputs)
