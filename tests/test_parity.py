"""Flax modules loaded through models.load vs PyTorch diffusers/transformers, on tiny random models.

The fixtures (tests/fixtures/parity/, written by tools/make_parity_fixtures.py) hold the PyTorch
weights, inputs and outputs, so the plain tests need no torch. Tests marked ``parity`` recompute
the references live and check that what models.save writes loads in diffusers/transformers.
"""
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import models

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
COMPONENT = {
    "unet_sd1": "unet",
    "unet_sd2": "unet",
    "controlnet": "controlnet",
    "vae": "vae",
    "clip": "text_encoder",
    "clip_sd2": "text_encoder",
}
TOLERANCE = 1e-4  # max abs difference, fp32


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x).transpose(0, 2, 3, 1)


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _reference(name: str) -> tuple[dict, dict]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
        outputs = {k[4:]: data[k] for k in data.files if k.startswith("out_")}
    return inputs, outputs


def flax_outputs(name: str, module, params, inputs: dict) -> dict[str, np.ndarray]:
    """The fixture's outputs computed by the Flax module, in PyTorch layout (NCHW)."""
    variables = {"params": params}
    component = COMPONENT[name]
    if component == "unet":
        args = (_nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["encoder_hidden_states"]))
        out = {"out": _nchw(module.apply(variables, *args))}
        if "mid_residual" in inputs:
            down = [_nhwc(inputs[f"residual_{i}"]) for i in range(sum(k.startswith("residual_") for k in inputs))]
            out["out_with_residuals"] = _nchw(module.apply(
                variables, *args, down_block_additional_residuals=down,
                mid_block_additional_residual=_nhwc(inputs["mid_residual"])))
        return out
    if component == "controlnet":
        down, mid = module.apply(
            variables, _nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]),
            jnp.asarray(inputs["encoder_hidden_states"]), _nhwc(inputs["controlnet_cond"]))
        return {**{f"down_{i}": _nchw(d) for i, d in enumerate(down)}, "mid": _nchw(mid)}
    if component == "vae":
        posterior = module.apply(variables, _nhwc(inputs["image"]), method=module.encode)
        decoded = module.apply(variables, _nhwc(inputs["latents"]), method=module.decode)
        return {"mean": _nchw(posterior.mean), "logvar": _nchw(posterior.logvar), "decoded": _nchw(decoded)}
    out = module.apply(variables, jnp.asarray(inputs["input_ids"]))
    return {
        "last_hidden_state": np.asarray(out.last_hidden_state),
        "penultimate_hidden_state": np.asarray(out.hidden_states[-2]),
        "pooler_output": np.asarray(out.pooler_output),
    }


def _max_abs_diffs(actual: dict, expected: dict) -> dict[str, float]:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].shape == expected[k].shape, k
    return {k: float(np.max(np.abs(actual[k] - expected[k]))) for k in expected}


def _max_scaled_diff(actual: dict, expected: dict) -> float:
    """Max abs difference relative to the output's magnitude: PyTorch's CPU kernels sum in an order
    that depends on the thread count, so reruns differ by float32 rounding of the largest values."""
    diffs = _max_abs_diffs(actual, expected)
    return max(diffs[k] / max(1.0, float(np.max(np.abs(expected[k])))) for k in expected)


@pytest.mark.parametrize("name", sorted(COMPONENT))
def test_loaded_module_matches_pytorch_reference(name):
    module, params = models.load(os.path.join(FIXTURES, name), COMPONENT[name])
    inputs, expected = _reference(name)
    diffs = _max_abs_diffs(flax_outputs(name, module, params, inputs), expected)
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("name", sorted(COMPONENT))
def test_save_then_load_is_bit_exact(name, tmp_path):
    module, params = models.load(os.path.join(FIXTURES, name), COMPONENT[name])
    out = models.save(module, params, tmp_path / "saved", COMPONENT[name])
    module2, params2 = models.load(out, COMPONENT[name])
    assert module2 == module
    flat, flat2 = models.convert.flatten(params), models.convert.flatten(params2)
    assert flat.keys() == flat2.keys()
    for path in flat:
        assert flat2[path].dtype == flat[path].dtype
        np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(flat[path]), err_msg="/".join(path))


def _fixture_tool():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_parity_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_parity_fixtures", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _torch_from_pretrained(name: str, folder):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    cls = {
        "unet": diffusers.UNet2DConditionModel,
        "controlnet": diffusers.ControlNetModel,
        "vae": diffusers.AutoencoderKL,
        "text_encoder": transformers.CLIPTextModel,
    }[COMPONENT[name]]
    return cls.from_pretrained(folder).eval()


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(COMPONENT))
def test_live_pytorch_reference(name):
    """Recompute the references with the installed torch stack: catches drift in the stored files."""
    torch_model = _torch_from_pretrained(name, os.path.join(FIXTURES, name))
    inputs, stored = _reference(name)
    live = _fixture_tool().reference(name, torch_model, inputs)
    assert _max_scaled_diff(live, stored) <= 1e-5
    module, params = models.load(os.path.join(FIXTURES, name), COMPONENT[name])
    diffs = _max_abs_diffs(flax_outputs(name, module, params, inputs), live)
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(COMPONENT))
def test_saved_folder_loads_in_pytorch(name, tmp_path):
    module, params = models.load(os.path.join(FIXTURES, name), COMPONENT[name])
    out = models.save(module, params, tmp_path / name, COMPONENT[name])
    torch_model = _torch_from_pretrained(name, out)
    inputs, stored = _reference(name)
    outputs = _fixture_tool().reference(name, torch_model, inputs)
    # Same weights through the same PyTorch code: only summation-order noise is allowed.
    assert _max_scaled_diff(outputs, stored) <= 1e-5
