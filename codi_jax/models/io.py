"""Read and write diffusers/transformers checkpoint folders as Flax (module, params) pairs.

A folder is ``config.json`` plus ``*.safetensors`` weights, in PyTorch naming and layout (the format
of ``save_pretrained``); :mod:`codi_jax.models.convert` does the rename + transpose. Weights are read
with ``safetensors.numpy``: no torch at runtime. Everything a user can get wrong (a missing folder, a
malformed config, the wrong component, a corrupt or pickled weight file, a checkpoint that does not
fit the module) raises one of the errors below with the whole story in its message; a load either
returns every parameter or raises.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from importlib import resources
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.models import convert
from codi_jax.models.convert import ModelIOError, WeightMismatchError

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


class ComponentError(ModelIOError, ValueError):
    """Unknown component name, or a pipeline folder without that component."""


class ConfigError(ModelIOError, ValueError):
    """``config.json`` is not valid JSON or does not describe a buildable module."""


class ArchitectureMismatchError(ModelIOError, ValueError):
    """The folder holds another architecture (e.g. a VAE loaded as ``unet``)."""


class WeightFileError(ModelIOError, ValueError):
    """A weight file or shard index cannot be read (corrupt, truncated, inconsistent shards)."""


class NonFiniteWeightsError(ModelIOError, ValueError):
    """A weight file contains NaN or Inf."""


class PickleRefusedError(ModelIOError, ValueError):
    """Only pickled weights were found and ``allow_pickle`` is off, or torch is needed to read them."""


class WeightsNotFoundError(ModelIOError, FileNotFoundError):
    """The folder, its ``config.json`` or its weight files do not exist."""


class HubUnavailableError(ModelIOError, FileNotFoundError):
    """A hub id was given but the Hugging Face Hub cannot be reached (offline or network down)."""


@dataclasses.dataclass(frozen=True)
class _Component:
    module: str  # codi_jax.models submodule, imported on first use
    class_name: str  # diffusers `_class_name` / transformers `architectures[0]`
    library: str  # "diffusers" or "transformers": decides the weight file name and config keys


_REGISTRY: dict[str, _Component] = {
    "unet": _Component("codi_jax.models.unet", "UNet2DConditionModel", "diffusers"),
    "controlnet": _Component("codi_jax.models.controlnet", "ControlNetModel", "diffusers"),
    "vae": _Component("codi_jax.models.vae", "AutoencoderKL", "diffusers"),
    "text_encoder": _Component("codi_jax.models.clip", "CLIPTextModel", "transformers"),
}
COMPONENTS: tuple[str, ...] = tuple(_REGISTRY)
PRESETS: tuple[str, ...] = ("sd15", "sd21")

_WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# The config format version written into saved diffusers configs; the shipped configs use it too.
_DIFFUSERS_CONFIG_VERSION = "0.30.0"
# Module fields that are run-time choices, not architecture: never written into config.json.
_NON_CONFIG_FIELDS = frozenset({"parent", "name", "dtype", "param_dtype", "precision"})
# Attention parameter names of diffusers checkpoints written before its attention refactor (the SD
# 1.x/2.x VAE on the hub still uses them); diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# config.json of every module load() built, so save() writes back exactly what was read. Modules are
# frozen dataclasses compared by their fields, so an equal module rebuilt elsewhere finds it too.
_LOADED_CONFIGS: dict[Any, dict[str, Any]] = {}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _component(component: str) -> _Component:
    if component not in _REGISTRY:
        raise ComponentError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    return _REGISTRY[component]


def _module_class(component: str) -> type:
    spec = _component(component)
    # Imported lazily so that one module under construction does not break loading the others.
    return getattr(importlib.import_module(spec.module), spec.class_name)


def get_config(component: str, preset: str) -> dict[str, Any]:
    """The shipped config.json dict of a Stable Diffusion component: preset ``"sd15"`` or ``"sd21"``.

    SD 2.1's ControlNet is the SD 2.1 UNet encoder (list head dims, linear projections).
    """
    _component(component)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    text = resources.files("codi_jax").joinpath("assets", "model_configs", preset, f"{component}.json").read_text()
    return json.loads(text)


# ----------------------------------------------------------------------------------------- load


def _resolve_root(path_or_hub_id: str | os.PathLike, component: str, allow_pickle: bool) -> str:
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise WeightsNotFoundError(f"{path!r} is a file; pass the folder that holds config.json (or model_index.json)")
    if not _HUB_ID.match(path):
        raise WeightsNotFoundError(f"no such folder: {path!r}")
    return _download(path, component, allow_pickle)


def _download(repo_id: str, component: str, allow_pickle: bool) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    weights = ["*.safetensors", "*.safetensors.index.json"] + (
        ["*.bin", "*.bin.index.json"] if allow_pickle else []
    )

    def fetch(patterns: list[str]) -> str:
        try:
            return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
        except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as err:
            raise WeightsNotFoundError(
                f"{repo_id!r} is neither a local folder nor an accessible Hugging Face Hub repository "
                f"({type(err).__name__})"
            ) from None
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.HfHubHTTPError, OSError) as err:
            raise HubUnavailableError(
                f"{repo_id!r} is not a local folder and the Hugging Face Hub cannot be reached "
                f"({type(err).__name__}: {err}). Download the model where there is network access "
                "(e.g. `hf download <repo>`) and pass its local folder instead."
            ) from None

    # Configs first: a pipeline repo also holds multi-GB single-file checkpoints at its root, so only
    # the requested component's subfolder may be fetched.
    root = fetch(["model_index.json", "config.json"])
    if os.path.exists(os.path.join(root, "model_index.json")):
        return fetch(["model_index.json"] + [f"{component}/{p}" for p in ["config.json"] + weights])
    return fetch(["config.json"] + weights)


def _component_dir(root: str, component: str) -> str:
    index = os.path.join(root, "model_index.json")
    if not os.path.exists(index):
        return root
    folder = os.path.join(root, component)
    if not os.path.isdir(folder):
        try:
            with open(index) as f:
                listed = sorted(k for k, v in json.load(f).items() if not k.startswith("_") and isinstance(v, list))
        except (OSError, ValueError):
            listed = []
        raise ComponentError(
            f"pipeline folder {root!r} has no {component!r} subfolder"
            + (f"; its model_index.json lists: {', '.join(listed)}" if listed else "")
        )
    return folder


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"{folder!r} has no config.json: not a diffusers/transformers model folder")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def _check_architecture(config: dict[str, Any], component: str, folder: str) -> None:
    expected = _component(component).class_name
    found = config.get("_class_name")
    if found is None and isinstance(config.get("architectures"), list) and config["architectures"]:
        found = config["architectures"][0]
    if found is None:
        return  # A hand-written config: the weight keys and shapes are checked against the module anyway.
    if str(found).removeprefix("Flax") != expected:
        wanted = [name for name, spec in _REGISTRY.items() if spec.class_name == str(found).removeprefix("Flax")]
        hint = f"; load it as {wanted[0]!r}" if wanted else ""
        raise ArchitectureMismatchError(
            f"{folder!r} holds a {found}, but component {component!r} is a {expected}{hint}"
        )


def _weight_files(folder: str, library: str) -> tuple[list[str], bool]:
    """(files to read, whether they are pickles). Safetensors win over pickles; standard names win."""
    names = set(os.listdir(folder))
    for ext, pickled in ((".safetensors", False), (".bin", True)):
        standard = [_WEIGHT_NAMES[library]] + [n for n in _WEIGHT_NAMES.values() if n != _WEIGHT_NAMES[library]]
        for name in standard:
            for candidate in (f"{name}{ext}.index.json", f"{name}{ext}"):
                if candidate in names:
                    return _expand_index(folder, candidate), pickled
        indexes = sorted(n for n in names if n.endswith(ext + ".index.json"))
        singles = sorted(n for n in names if n.endswith(ext))
        candidates = indexes or singles
        if len(candidates) > 1:
            raise WeightsNotFoundError(
                f"{folder!r} holds several weight files and none has the standard name "
                f"{_WEIGHT_NAMES[library]}{ext}: {', '.join(candidates)}; keep one"
            )
        if candidates:
            return _expand_index(folder, candidates[0]), pickled
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if len(pickles) > 1:
        raise WeightsNotFoundError(f"{folder!r} holds several pickled weight files: {', '.join(pickles)}; keep one")
    if pickles:
        return [os.path.join(folder, pickles[0])], True
    raise WeightsNotFoundError(f"{folder!r} has no weight file (*.safetensors)")


def _expand_index(folder: str, name: str) -> list[str]:
    if not name.endswith(".index.json"):
        return [os.path.join(folder, name)]
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightFileError(f"{path} is not a valid shard index (needs a 'weight_map' object): {err}") from None
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise WeightsNotFoundError(f"{path} lists shard files that do not exist: {', '.join(missing)}")
    return [os.path.join(folder, s) for s in shards]


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for file in files:
        try:
            shard = load_file(file)
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightFileError(f"cannot read {file}: not a valid safetensors file ({err})") from None
        duplicated = sorted(state.keys() & shard.keys())
        if duplicated:
            raise WeightFileError(f"{file} repeats keys already read from another shard: {', '.join(duplicated[:10])}")
        state.update(shard)
    return state


def _read_pickles(files: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise PickleRefusedError(
            f"{files[0]} is a pickled PyTorch file and reading it needs torch, which is not installed; "
            "install torch, or convert the checkpoint to safetensors where torch is available"
        ) from None
    state: dict[str, np.ndarray] = {}
    for file in files:
        # weights_only still refuses arbitrary objects: the user opted into pickles, not into code.
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError)
            raise WeightFileError(f"cannot read {file} as a PyTorch state dict: {type(err).__name__}: {err}") from None
        if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
            loaded = loaded["state_dict"]
        for key, tensor in loaded.items():
            if isinstance(tensor, torch.Tensor):
                tensor = tensor.detach()
                state[key] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return state


def _check_finite(state: Mapping[str, np.ndarray], folder: str) -> None:
    bad = []
    for key, value in state.items():
        if value.dtype.kind in "biu":
            continue
        finite = np.isfinite(value)
        if not finite.all():
            bad.append(f"{key} ({value.size - int(finite.sum())} of {value.size} values)")
    if bad:
        raise NonFiniteWeightsError(f"weights in {folder!r} contain NaN or Inf: " + "; ".join(bad))


def _normalize_keys(state: dict[str, np.ndarray], target: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames that diffusers/transformers apply on load, so that any checkpoint they read, we read."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            parts[-2] = _LEGACY_ATTENTION[parts[-2]]
        out[".".join(parts)] = value
    # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix that hub checkpoints
    # (and our module) have; add the module's single top-level name when the checkpoint lacks it.
    tops = set(target)
    if len(tops) == 1:
        (prefix,) = tops
        if not any(k.startswith(prefix + ".") for k in out):
            out = {f"{prefix}.{k}": v for k, v in out.items()}
    return out


def _target_shapes(module: Any, cls: type, config: dict[str, Any]) -> Mapping[str, Any]:
    inputs = cls.dummy_inputs(config, batch=1)
    args, kwargs = (tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((), dict(inputs))
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return variables["params"]


def load(
    path_or_hub_id: str | os.PathLike,
    component: str,
    *,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Loads a diffusers/transformers component folder as ``(flax_module, params)``.

    Args:
      path_or_hub_id: a pipeline folder (with ``model_index.json``; the component is read from its
        subfolder), a single component folder, or a Hugging Face Hub id (needs network, or the
        local hub cache).
      component: ``"unet"``, ``"vae"``, ``"text_encoder"`` or ``"controlnet"``.
      dtype: compute dtype of the module; parameters keep the module's parameter dtype (fp32).
      allow_pickle: read ``.bin``/``.ckpt`` files when no safetensors exist. Pickles can execute
        code on load, so this is off by default; reading them needs torch.
      **options: passed to the module's ``from_config``.

    Returns the module and its params tree (use as ``module.apply({"params": params}, ...)``).
    """
    spec = _component(component)
    root = _resolve_root(path_or_hub_id, component, allow_pickle)
    folder = _component_dir(root, component)
    config = _read_config(folder)
    _check_architecture(config, component, folder)
    files, pickled = _weight_files(folder, spec.library)
    if pickled and not allow_pickle:
        raise PickleRefusedError(
            f"{folder!r} holds only pickled weights ({os.path.basename(files[0])}). Unpickling can execute "
            "arbitrary code, so it is off by default: convert the checkpoint to safetensors, or pass "
            "allow_pickle=True if you trust its source."
        )
    cls = _module_class(component)
    try:
        module = cls.from_config(config, dtype=dtype, **options)
        target = _target_shapes(module, cls, config)
    except (ValueError, TypeError, KeyError) as err:
        given = f" with options {options}" if options else ""
        raise ConfigError(
            f"cannot build a {spec.class_name} from {os.path.join(folder, 'config.json')}{given}: "
            f"{type(err).__name__}: {err}"
        ) from None
    state = _read_pickles(files) if pickled else _read_safetensors(files)
    _check_finite(state, folder)
    state = _normalize_keys(state, target)
    params = convert.torch_to_flax(state, target, context=f"{component} from {folder}")
    del state
    _LOADED_CONFIGS[module] = dict(config)
    return module, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------- save


# Marks a module field whose value has no JSON form (a dtype, a callable): not a config entry.
_SKIP = object()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_jsonable(v) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else items
    if isinstance(value, Mapping):
        items = {str(k): _jsonable(v) for k, v in value.items()}
        return _SKIP if any(i is _SKIP for i in items.values()) else items
    return _SKIP


def _same_architecture(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    for field in dataclasses.fields(a):
        if field.name in ("parent", "name"):
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        # A list in the config may come back as a tuple field; both spell the same architecture.
        if x != y and (_jsonable(x) is _SKIP or _jsonable(x) != _jsonable(y)):
            return False
    return True


def module_config(module: Any, component: str) -> dict[str, Any]:
    """The config.json dict that rebuilds ``module`` through its ``from_config``.

    For a module returned by :func:`load` this is the config it was built from. Otherwise it is
    derived from the module's dataclass fields (the modules whose fields carry the config's names)
    and verified by rebuilding the module from it; :class:`ConfigError` if that does not reproduce
    the module (then pass ``config=`` to :func:`save`).
    """
    spec = _component(component)
    loaded = _LOADED_CONFIGS.get(module)
    if loaded is not None:
        config = dict(loaded)
    else:
        config = {}
        for field in dataclasses.fields(module):
            if field.name in _NON_CONFIG_FIELDS or not field.init:
                continue
            value = _jsonable(getattr(module, field.name))
            if value is not _SKIP:
                config[field.name] = value
        try:
            rebuilt = type(module).from_config(config, dtype=module.dtype)
        except (ValueError, TypeError, KeyError):
            rebuilt = None
        if rebuilt is None or not _same_architecture(module, rebuilt):
            raise ConfigError(
                f"cannot derive a config.json for this {type(module).__name__}: it was not returned by "
                "models.load and its fields do not rebuild it; pass config= to save()"
            )
    if spec.library == "diffusers":
        config.setdefault("_class_name", spec.class_name)
        config.setdefault("_diffusers_version", _DIFFUSERS_CONFIG_VERSION)
    else:
        config.setdefault("architectures", [spec.class_name])
        config.setdefault("model_type", "clip_text_model")
    return config


def save(
    module: Any,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    component: str,
    *,
    config: Mapping[str, Any] | None = None,
) -> str:
    """Writes ``module`` + ``params`` as a diffusers/transformers folder that ``from_pretrained`` loads.

    ``out_dir`` receives ``config.json`` and ``diffusion_pytorch_model.safetensors`` (``model.safetensors``
    for the text encoder). The folder is written under a temporary name next to ``out_dir`` and renamed
    into place, so an interrupted save never leaves a half-written model. An existing ``out_dir`` is
    replaced only if it holds nothing but a model's files. ``config`` overrides the config derived from
    the module's fields. Returns ``out_dir``.
    """
    from safetensors.numpy import save_file

    spec = _component(component)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir!r} exists and is not a folder")
        foreign = [n for n in os.listdir(out_dir) if not _is_model_file(n)]
        if foreign:
            raise FileExistsError(
                f"{out_dir!r} exists and holds files that are not a saved model ({', '.join(sorted(foreign)[:5])}); "
                "refusing to replace it"
            )
    if config is None:
        config = module_config(module, component)
    else:
        config = dict(config)
        if spec.library == "diffusers":
            config.setdefault("_class_name", spec.class_name)
            config.setdefault("_diffusers_version", _DIFFUSERS_CONFIG_VERSION)
        _check_architecture(config, component, "config=")
    state = convert.flax_to_torch(jax.device_get(params))

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        # transformers and diffusers only read safetensors files whose metadata says format "pt".
        save_file(state, os.path.join(tmp, f"{_WEIGHT_NAMES[spec.library]}.safetensors"), metadata={"format": "pt"})

    return write_folder_atomically(out_dir, write)


def write_folder_atomically(out_dir: str, write: Callable[[str], None]) -> str:
    """Writes a folder with ``write(tmp)`` beside ``out_dir`` and swaps it into place: a reader
    never sees a half-written folder, an interrupted write leaves ``out_dir`` as it was, and a
    folder already there is replaced only once the new one is complete."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model is meant to be shared
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "model"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_model_file(name: str) -> bool:
    return name == "config.json" or name.endswith((".safetensors", ".index.json") + _PICKLE_SUFFIXES)
