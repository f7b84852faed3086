"""models.load / models.save: folder layouts, every user error, pickle refusal, hub handling, atomic save."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from codi_jax import models
from codi_jax.models import io as model_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
UNET = os.path.join(FIXTURES, "unet_sd1")
VAE = os.path.join(FIXTURES, "vae")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference.npz"))
    return str(dst)


def _assert_raised_here(info: pytest.ExceptionInfo) -> None:
    """A user error is raised by our loader with a self-contained message, not deep in a library."""
    assert isinstance(info.value, models.ModelIOError)
    assert info.value.__cause__ is None and info.value.__suppress_context__ in (True, False)
    assert os.path.basename(str(info.traceback[-1].path)) in ("io.py", "convert.py")


def _same_params(a, b) -> None:
    fa, fb = models.convert.flatten(a), models.convert.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))


@pytest.fixture(scope="module")
def unet_params():
    return models.load(UNET, "unet")[1]


# ------------------------------------------------------------------------------ folder layouts


def test_pipeline_root_loads_the_component_subfolder(tmp_path, unet_params):
    _copy(UNET, tmp_path / "unet")
    _copy(VAE, tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}))
    module, params = models.load(tmp_path, "unet")
    _same_params(params, unet_params)
    vae, _ = models.load(str(tmp_path), "vae")
    assert type(vae).__name__ == "AutoencoderKL"
    with pytest.raises(models.ComponentError, match="controlnet.*lists: unet, vae") as info:
        models.load(tmp_path, "controlnet")
    _assert_raised_here(info)


def test_sharded_safetensors_with_index(tmp_path, unet_params):
    folder = _copy(UNET, tmp_path / "unet")
    state = load_file(os.path.join(folder, UNET_WEIGHTS))
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, os.path.join(folder, name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    with open(os.path.join(folder, UNET_WEIGHTS + ".index.json"), "w") as f:
        json.dump(index, f)
    _same_params(models.load(folder, "unet")[1], unet_params)
    # A shard named in the index but absent: a clear error, not a partial load.
    os.remove(os.path.join(folder, "diffusion_pytorch_model-00002-of-00002.safetensors"))
    with pytest.raises(models.WeightsNotFoundError, match="00002-of-00002"):
        models.load(folder, "unet")


def test_non_standard_single_weight_file_is_used_but_several_are_ambiguous(tmp_path, unet_params):
    folder = _copy(UNET, tmp_path / "unet")
    os.rename(os.path.join(folder, UNET_WEIGHTS), os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))
    _same_params(models.load(folder, "unet")[1], unet_params)
    shutil.copy(os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"),
                os.path.join(folder, "diffusion_pytorch_model.non_ema.safetensors"))
    with pytest.raises(models.WeightsNotFoundError, match="several weight files.*fp16.*non_ema"):
        models.load(folder, "unet")


def test_fp16_checkpoint_becomes_fp32_params(tmp_path, unet_params):
    folder = _copy(UNET, tmp_path / "unet")
    path = os.path.join(folder, UNET_WEIGHTS)
    save_file({k: v.astype(np.float16) for k, v in load_file(path).items()}, path)
    params = models.load(folder, "unet")[1]
    kernel = params["conv_in"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(unet_params["conv_in"]["kernel"]), atol=1e-3)


def test_legacy_vae_attention_names_load(tmp_path):
    folder = _copy(VAE, tmp_path / "vae")
    path = os.path.join(folder, UNET_WEIGHTS)
    state = load_file(path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                # The oldest conversions stored these Dense layers as 1x1 convolutions.
                value = value[:, :, None, None] if value.ndim == 2 else value
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, path)
    _same_params(models.load(folder, "vae")[1], models.load(VAE, "vae")[1])


def test_text_encoder_loads_with_and_without_text_model_prefix(tmp_path):
    # transformers >= 5 writes keys without `text_model.`; SD's hub checkpoints have it.
    folder = _copy(os.path.join(FIXTURES, "clip"), tmp_path / "clip")
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    assert not any(k.startswith("text_model.") for k in state)
    save_file({f"text_model.{k}": v for k, v in state.items()}, path, metadata={"format": "pt"})
    _same_params(models.load(folder, "text_encoder")[1], models.load(os.path.join(FIXTURES, "clip"), "text_encoder")[1])


# ------------------------------------------------------------------------------ user errors


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder") as info:
        models.load(tmp_path / "nowhere" / "unet", "unet")
    _assert_raised_here(info)


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        models.load(path, "unet")


def test_folder_without_config(tmp_path):
    folder = _copy(UNET, tmp_path / "unet")
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(models.WeightsNotFoundError, match="no config.json") as info:
        models.load(folder, "unet")
    _assert_raised_here(info)


def test_folder_without_weights(tmp_path):
    folder = _copy(UNET, tmp_path / "unet")
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    with pytest.raises(FileNotFoundError, match="no weight file"):
        models.load(folder, "unet")


@pytest.mark.parametrize("text,match", [('{"_class_name": "UNet2DConditionModel",', "not valid JSON"),
                                        ("[1, 2]", "JSON object, found list")])
def test_malformed_config(tmp_path, text, match):
    folder = _copy(UNET, tmp_path / "unet")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(text)
    with pytest.raises(models.ConfigError, match=match) as info:
        models.load(folder, "unet")
    assert isinstance(info.value, ValueError)
    _assert_raised_here(info)


def test_config_the_module_cannot_build(tmp_path):
    folder = _copy(UNET, tmp_path / "unet")
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["down_block_types"] = ["CrossAttnDownBlock2D"]  # one entry for two blocks
    json.dump(config, open(path, "w"))
    with pytest.raises(models.ConfigError, match="cannot build a UNet2DConditionModel from .*config.json: .*down_block_types") as info:
        models.load(folder, "unet")
    _assert_raised_here(info)


def test_unknown_module_option_is_named():
    with pytest.raises(models.ConfigError, match="options {'no_such_option': 1}"):
        models.load(UNET, "unet", no_such_option=1)


def test_unknown_component():
    with pytest.raises(models.ComponentError, match="'tokenizer'.*unet, controlnet, vae, text_encoder") as info:
        models.load(UNET, "tokenizer")
    assert isinstance(info.value, ValueError)


def test_other_architecture_by_config(tmp_path):
    with pytest.raises(models.ArchitectureMismatchError, match="AutoencoderKL.*'unet'.*load it as 'vae'") as info:
        models.load(VAE, "unet")
    _assert_raised_here(info)
    with pytest.raises(models.ArchitectureMismatchError, match="CLIPTextModel.*load it as 'text_encoder'"):
        models.load(os.path.join(FIXTURES, "clip"), "vae")


def test_other_architecture_by_weights_reports_every_key(tmp_path):
    # A config without a class name (hand-written) over another UNet's weights: only the weights tell.
    folder = _copy(UNET, tmp_path / "unet")
    shutil.copy(os.path.join(FIXTURES, "unet_sd2", UNET_WEIGHTS), os.path.join(folder, UNET_WEIGHTS))
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    del config["_class_name"]
    json.dump(config, open(path, "w"))
    with pytest.raises(models.WeightMismatchError) as info:
        models.load(folder, "unet")
    err = info.value
    assert err.missing and err.unexpected and err.mismatched
    # SD1 projects with 1x1 convs, SD2 with Dense layers: the shapes say so, in PyTorch layout.
    proj = dict((k, (c, m)) for k, c, m in err.mismatched)["down_blocks.0.attentions.0.proj_in.weight"]
    assert proj == ((16, 16), (16, 16, 1, 1))
    assert "down_blocks.0.attentions.1.proj_in.weight" in err.missing
    assert "down_blocks.1.attentions.0.proj_in.weight" in err.unexpected
    message = str(err)
    assert "down_blocks.0.attentions.0.proj_in.weight: checkpoint (16, 16) vs model (16, 16, 1, 1)" in message
    _assert_raised_here(info)


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
    folder = _copy(UNET, tmp_path / "unet")
    path = os.path.join(folder, UNET_WEIGHTS)
    state = load_file(path)
    del state["time_embedding.linear_1.bias"]
    state["time_embedding.linear_3.bias"] = np.zeros(3, np.float32)
    state["conv_in.weight"] = np.zeros((16, 4, 1, 1), np.float32)
    save_file(state, path)
    with pytest.raises(models.WeightMismatchError) as info:
        models.load(folder, "unet")
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 wrongly shaped" in message
    for needle in ("missing:    time_embedding.linear_1.bias", "unexpected: time_embedding.linear_3.bias",
                   "conv_in.weight: checkpoint (16, 4, 1, 1) vs model (16, 4, 3, 3)", folder):
        assert needle in message


def test_nan_and_inf_weights(tmp_path):
    folder = _copy(UNET, tmp_path / "unet")
    path = os.path.join(folder, UNET_WEIGHTS)
    state = load_file(path)
    state["conv_in.bias"][3] = np.nan
    state["conv_out.weight"][0, 0, 0, :2] = np.inf
    save_file(state, path)
    with pytest.raises(models.NonFiniteWeightsError, match=r"conv_in.bias \(1 of 16.*conv_out.weight \(2 of") as info:
        models.load(folder, "unet")
    assert isinstance(info.value, ValueError)
    _assert_raised_here(info)


def test_corrupt_safetensors(tmp_path):
    folder = _copy(UNET, tmp_path / "unet")
    path = os.path.join(folder, UNET_WEIGHTS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(models.WeightFileError, match="not a valid safetensors file") as info:
        models.load(folder, "unet")
    _assert_raised_here(info)


# ------------------------------------------------------------------------------ pickles


def _pickle_folder(tmp_path) -> str:
    folder = _copy(UNET, tmp_path / "unet")
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    return folder


def test_pickled_weights_are_refused_by_default(tmp_path):
    folder = _pickle_folder(tmp_path)
    # Never opened: the refusal comes before any read, so the content does not matter.
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"not even a pickle")
    with pytest.raises(models.PickleRefusedError, match="execute arbitrary code.*allow_pickle=True") as info:
        models.load(folder, "unet")
    assert isinstance(info.value, ValueError)
    _assert_raised_here(info)


def test_pickled_weights_without_torch_installed(tmp_path, monkeypatch):
    folder = _pickle_folder(tmp_path)
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(models.PickleRefusedError, match="needs torch, which is not installed"):
        models.load(folder, "unet", allow_pickle=True)


def test_safetensors_preferred_over_pickles(tmp_path, unet_params):
    folder = _copy(UNET, tmp_path / "unet")
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"never read")
    _same_params(models.load(folder, "unet")[1], unet_params)


@pytest.mark.parity
def test_pickled_weights_load_with_opt_in(tmp_path, unet_params):
    torch = pytest.importorskip("torch")
    folder = _pickle_folder(tmp_path)
    state = load_file(os.path.join(UNET, UNET_WEIGHTS))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(folder, "diffusion_pytorch_model.bin"))
    _same_params(models.load(folder, "unet", allow_pickle=True)[1], unet_params)
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(models.WeightFileError, match="cannot read .*diffusion_pytorch_model.bin"):
        models.load(folder, "unet", allow_pickle=True)


# ------------------------------------------------------------------------------ hub ids


def _fake_snapshot(monkeypatch, behaviour):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, list(allow_patterns or [])))
        return behaviour(repo_id, allow_patterns)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_offline_says_to_pass_a_local_folder(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, patterns):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not in the local cache")

    calls = _fake_snapshot(monkeypatch, offline)
    with pytest.raises(models.HubUnavailableError, match="cannot be reached.*pass its local folder") as info:
        models.load("some-org/some-model", "unet")
    assert isinstance(info.value, FileNotFoundError)
    assert calls and calls[0][0] == "some-org/some-model"
    _assert_raised_here(info)


def test_hub_unknown_repository(monkeypatch):
    import types

    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, patterns):
        # Only the attributes the error reads: the hub's HTTP client is not part of this test.
        response = types.SimpleNamespace(headers={}, request=None, status_code=404)
        raise RepositoryNotFoundError("404 Client Error", response=response)

    _fake_snapshot(monkeypatch, missing)
    with pytest.raises(models.WeightsNotFoundError, match="neither a local folder nor"):
        models.load("some-org/no-such-model", "unet")


def test_hub_pipeline_downloads_only_the_component(tmp_path, monkeypatch, unet_params):
    root = tmp_path / "snapshot"
    _copy(UNET, root / "unet")
    (root / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    calls = _fake_snapshot(monkeypatch, lambda repo_id, patterns: str(root))
    _same_params(models.load("org/pipeline", "unet")[1], unet_params)
    final_patterns = calls[-1][1]
    # A pipeline repo also holds multi-GB single-file checkpoints at its root: never match those.
    assert "unet/config.json" in final_patterns and "unet/*.safetensors" in final_patterns
    assert not any(p.startswith("*") for p in final_patterns)
    assert not any(p.endswith(".bin") for p in final_patterns)


def test_path_that_is_not_a_hub_id_never_touches_the_network(monkeypatch, tmp_path):
    calls = _fake_snapshot(monkeypatch, lambda repo_id, patterns: pytest.fail("network"))
    with pytest.raises(FileNotFoundError):
        models.load(str(tmp_path / "a" / "b"), "unet")
    assert calls == []


# ------------------------------------------------------------------------------ save


def test_save_writes_a_diffusers_folder(tmp_path):
    module, params = models.load(UNET, "unet")
    out = models.save(module, params, tmp_path / "out" / "unet", "unet")
    assert sorted(os.listdir(out)) == ["config.json", UNET_WEIGHTS]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in config
    assert config["attention_head_dim"] == json.load(open(os.path.join(UNET, "config.json")))["attention_head_dim"]
    saved, original = load_file(os.path.join(out, UNET_WEIGHTS)), load_file(os.path.join(UNET, UNET_WEIGHTS))
    assert saved.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(saved[k], original[k], err_msg=k)


def test_save_text_encoder_uses_transformers_names(tmp_path):
    module, params = models.load(os.path.join(FIXTURES, "clip"), "text_encoder")
    out = models.save(module, params, tmp_path / "text_encoder", "text_encoder")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["CLIPTextModel"] and config["hidden_act"] == "quick_gelu"
    assert all(k.startswith("text_model.") for k in load_file(os.path.join(out, "model.safetensors")))


def test_save_config_from_module_fields(tmp_path):
    # A VAE built directly (not via load): its fields carry the config names, so save derives it.
    from codi_jax.models.vae import AutoencoderKL

    config = json.load(open(os.path.join(VAE, "config.json")))
    config["latent_channels"] = 3
    module = AutoencoderKL.from_config(config)
    params = models.load(VAE, "vae")[1]
    out = models.save(module, params, tmp_path / "vae", "vae")
    assert json.load(open(os.path.join(out, "config.json")))["latent_channels"] == 3


def test_save_needs_config_when_it_cannot_be_derived(tmp_path, unet_params):
    from codi_jax.models.unet import UNet2DConditionModel

    config = json.load(open(os.path.join(UNET, "config.json")))
    config["norm_eps"] = 1e-6  # a module no load() returned
    module = UNet2DConditionModel.from_config(config)
    with pytest.raises(models.ConfigError, match="pass config="):
        models.save(module, unet_params, tmp_path / "unet", "unet")
    assert not os.path.exists(tmp_path / "unet")
    out = models.save(module, unet_params, tmp_path / "unet", "unet", config=config)
    assert json.load(open(os.path.join(out, "config.json")))["norm_eps"] == 1e-6
    loaded, _ = models.load(out, "unet")
    assert loaded == module


def test_save_rejects_config_of_another_architecture(tmp_path, unet_params):
    module, _ = models.load(UNET, "unet")
    with pytest.raises(models.ArchitectureMismatchError):
        models.save(module, unet_params, tmp_path / "unet", "unet", config={"_class_name": "AutoencoderKL"})


def test_save_is_atomic(tmp_path, monkeypatch, unet_params):
    import safetensors.numpy

    module, _ = models.load(UNET, "unet")
    out = models.save(module, unet_params, tmp_path / "unet", "unet")
    before = open(os.path.join(out, UNET_WEIGHTS), "rb").read()

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        models.save(module, unet_params, tmp_path / "unet", "unet")
    with pytest.raises(OSError, match="disk full"):
        models.save(module, unet_params, tmp_path / "fresh", "unet")
    # The earlier save is untouched, the failed fresh one left nothing, and no temp folder remains.
    assert open(os.path.join(out, UNET_WEIGHTS), "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["unet"]


def test_save_replaces_a_previous_model_but_not_other_files(tmp_path, unet_params):
    module, _ = models.load(UNET, "unet")
    out = models.save(module, unet_params, tmp_path / "unet", "unet")
    models.save(module, unet_params, out, "unet")
    assert sorted(os.listdir(tmp_path)) == ["unet"]
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        models.save(module, unet_params, out, "unet")
    assert os.path.exists(os.path.join(out, "notes.txt"))


def test_loader_does_not_import_torch():
    # safetensors.numpy and our own modules only; torch stays optional at run time.
    import subprocess

    code = (
        "import sys; from codi_jax import models; "
        f"models.load({UNET!r}, 'unet'); models.load({VAE!r}, 'vae'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_registry_is_lazy():
    assert set(models.COMPONENTS) == {"unet", "vae", "text_encoder", "controlnet"}
    assert model_io._component("vae").module == "codi_jax.models.vae"
