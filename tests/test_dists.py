"""DISTS: its formula against the DISTS_pytorch package (live, on random VGG16 weights), its
properties, and the weight layouts it reads."""

import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_metrics import _random_params, _to_torch_state

from codi_jax.metrics import NotComputed, dists, load_or_not_computed
from codi_jax.models.convert import flatten


def _random_dists(seed=0):
    module = dists.DISTSNet()
    params = _random_params(module, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)), seed=seed)
    # Trained α, β are positive (they are normalised by their sum).
    rng = np.random.default_rng(seed + 1)
    for name in ("alpha", "beta"):
        params[name] = rng.uniform(0.01, 0.2, params[name].shape).astype(np.float32)
    return dists.PairedMetric(module, params)


def _images(n=2, size=32):
    a = jax.random.uniform(jax.random.PRNGKey(1), (n, size, size, 3), minval=-1, maxval=1)
    b = jnp.clip(a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), -1, 1)
    return a, b


def test_dists_is_about_zero_on_identical_images_positive_and_symmetric():
    metric = _random_dists()
    a, b = _images(3)
    np.testing.assert_allclose(metric(a, a), np.zeros(3), atol=1e-5)
    d = metric(a, b)
    assert d.shape == (3,) and bool(jnp.all(d > 1e-3))
    np.testing.assert_allclose(metric(b, a), d, rtol=1e-5)
    # More noise, a larger distance.
    c = jnp.clip(a + 0.8 * jax.random.normal(jax.random.PRNGKey(3), a.shape), -1, 1)
    assert bool(jnp.all(metric(a, c) > d))


def test_l2_pool_is_the_hann_window_of_the_squares():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 2))
    out = np.asarray(dists.l2_pool(x))
    padded = np.pad(np.asarray(x) ** 2, ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    expected = np.zeros((1, 3, 3, 2))
    for i in range(3):
        for j in range(3):
            expected[0, i, j] = np.einsum("hwc,hw->c", padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
    np.testing.assert_allclose(out, np.sqrt(expected + 1e-12), rtol=1e-5)


def _package_state(metric):
    """The DISTS_pytorch state dict of ``metric``: stageK.N.*, α / β as (1, C, 1, 1), buffers."""
    stages = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    state = {}
    for key, value in _to_torch_state(metric.params).items():
        if key in ("alpha", "beta"):
            state[key] = value.reshape(1, -1, 1, 1)
        else:
            index = int(key.split(".")[1])
            state[f"stage{stages[index]}.{key.split('.', 1)[1]}"] = value
    state["stage2.4.filter"] = np.zeros((64, 1, 3, 3), np.float32)
    state["mean"] = np.zeros((1, 3, 1, 1), np.float32)
    return state


def test_dists_loads_torchvision_vgg_plus_weights_or_the_package_state_dict(tmp_path):
    metric = _random_dists()
    state = _to_torch_state(metric.params)
    vgg = {k: v for k, v in state.items() if k.startswith("features")}
    save_file({**vgg, "classifier.0.weight": np.zeros((8, 8), np.float32)}, str(tmp_path / "vgg16.safetensors"))
    save_file({k: state[k].reshape(1, -1, 1, 1) for k in ("alpha", "beta")}, str(tmp_path / "dists.safetensors"))
    loaded = dists.load_dists([tmp_path / "vgg16.safetensors", tmp_path / "dists.safetensors"])
    np.savez(tmp_path / "package.npz", **_package_state(metric))
    loaded_pkg = dists.load_dists(tmp_path / "package.npz")
    for other in (loaded, loaded_pkg):
        for key, value in flatten(metric.params).items():
            np.testing.assert_array_equal(flatten(other.params)[key], np.asarray(value), err_msg=str(key))
    # Without α / β the file does not fit: "not computed", with the missing key named.
    missing = load_or_not_computed(dists.load_dists, tmp_path / "vgg16.safetensors", "DISTS")
    assert isinstance(missing, NotComputed) and "alpha" in missing.reason


def _torchvision_stub(torch):
    """``torchvision.models.vgg16(pretrained=True).features`` with random weights (no download):
    the layer list torchvision builds, which is all DISTS_pytorch takes from it."""
    nn = torch.nn

    def vgg16(pretrained=True):
        layers, in_ch = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        return types.SimpleNamespace(features=nn.Sequential(*layers))

    stub = types.ModuleType("torchvision")
    stub.models = types.SimpleNamespace(vgg16=vgg16)
    stub.transforms = types.SimpleNamespace()
    return stub


def test_dists_equals_the_dists_pytorch_package(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("DISTS_pytorch") is None:
        pytest.skip("DISTS_pytorch is not installed (the parity extra)")
    # The package imports torchvision (only for VGG16's layer list) when it is imported.
    monkeypatch.setitem(sys.modules, "torchvision", _torchvision_stub(torch))
    for name in ("DISTS_pytorch", "DISTS_pytorch.DISTS_pt"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    reference_module = importlib.import_module("DISTS_pytorch.DISTS_pt")
    torch.manual_seed(0)
    reference = reference_module.DISTS(load_weights=False).eval()
    with torch.no_grad():   # positive α, β, as trained ones are
        reference.alpha.uniform_(0.01, 0.2)
        reference.beta.uniform_(0.01, 0.2)
    save_file({k: v.detach().numpy().copy() for k, v in reference.state_dict().items()},
              str(tmp_path / "dists_package.safetensors"))
    ours = dists.load_dists(tmp_path / "dists_package.safetensors")
    a, b = _images(2, 64)
    to_torch = lambda x: torch.from_numpy((np.asarray(x).transpose(0, 3, 1, 2) + 1) / 2)
    expected = reference(to_torch(a), to_torch(b)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours(a, b)), expected, rtol=1e-4, atol=1e-6)
    assert expected.min() > 1e-3
