"""Flax ports of the Stable Diffusion components and their diffusers-format checkpoint I/O.

``load(path_or_hub_id, component)`` -> ``(module, params)``; ``save(module, params, out_dir, component)``
writes a folder that diffusers/transformers ``from_pretrained`` reads. Components: ``unet``, ``vae``,
``text_encoder``, ``controlnet``; their module classes are imported on first use.
"""
from codi_jax.models.io import (
    COMPONENTS,
    PRESETS,
    ArchitectureMismatchError,
    ComponentError,
    ConfigError,
    HubUnavailableError,
    ModelIOError,
    NonFiniteWeightsError,
    PickleRefusedError,
    WeightFileError,
    WeightMismatchError,
    WeightsNotFoundError,
    get_config,
    load,
    module_config,
    save,
)

__all__ = [
    "COMPONENTS",
    "PRESETS",
    "ArchitectureMismatchError",
    "ComponentError",
    "ConfigError",
    "HubUnavailableError",
    "ModelIOError",
    "NonFiniteWeightsError",
    "PickleRefusedError",
    "WeightFileError",
    "WeightMismatchError",
    "WeightsNotFoundError",
    "get_config",
    "load",
    "module_config",
    "save",
]
