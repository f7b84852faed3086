"""``auto`` metric weights: fetched once from their URL (here file:// URLs), checked against the
SHA-256 prefix their name promises, converted from .pth with torch's restricted unpickler, cached;
offline or wrong files are "not computed" with the reason, and nothing half-written is cached."""

import hashlib
import os

import numpy as np
import pytest
from test_dists import _random_dists
from test_metrics import _to_torch_state

from codi_jax import metrics
from codi_jax.metrics import NotComputed, fetch

torch = pytest.importorskip("torch")


def _save_pth(state: dict, path) -> str:
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, str(path))
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """DISTS's two files as .pth behind file:// URLs, the VGG16 one with its true hash prefix."""
    metric = _random_dists()
    state = _to_torch_state(metric.params)
    vgg_digest = _save_pth({k: v for k, v in state.items() if k.startswith("features")}, tmp_path / "vgg16.pth")
    _save_pth({k: state[k].reshape(1, -1, 1, 1) for k in ("alpha", "beta")}, tmp_path / "weights.pt")
    monkeypatch.setenv("CODI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(fetch.SOURCES, "vgg16", fetch.Source((tmp_path / "vgg16.pth").as_uri(), vgg_digest[:8]))
    monkeypatch.setitem(fetch.SOURCES, "dists", fetch.Source((tmp_path / "weights.pt").as_uri()))
    return metric, tmp_path


def test_auto_fetches_converts_and_caches(sources):
    metric, tmp_path = sources
    _, _, loaded = metrics.load_networks("", "", "alex", "auto")
    assert not isinstance(loaded, NotComputed)
    a = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    b = np.clip(a + 0.2, -1, 1)
    np.testing.assert_allclose(np.asarray(loaded(a, b)), np.asarray(metric(a, b)), rtol=1e-6)
    cached = sorted(os.listdir(fetch.cache_dir()))
    assert cached == ["dists.safetensors", "vgg16.safetensors"]
    # Cached: the sources can go away.
    os.remove(tmp_path / "vgg16.pth")
    os.remove(tmp_path / "weights.pt")
    assert not isinstance(metrics.load_networks("", "", "alex", "auto")[2], NotComputed)


def test_offline_or_a_wrong_file_is_not_computed_and_not_cached(sources, monkeypatch):
    _, tmp_path = sources
    monkeypatch.setitem(fetch.SOURCES, "dists", fetch.Source((tmp_path / "absent.pt").as_uri()))
    _, _, missing = metrics.load_networks("", "", "alex", "auto")
    assert isinstance(missing, NotComputed) and "cannot fetch" in missing.reason and "absent.pt" in missing.reason
    # A file whose hash does not match its name's promise is refused.
    monkeypatch.setitem(fetch.SOURCES, "vgg16", fetch.Source((tmp_path / "vgg16.pth").as_uri(), "00000000"))
    os.remove(os.path.join(fetch.cache_dir(), "vgg16.safetensors"))   # cached by the call above
    _, _, wrong = metrics.load_networks("", "", "alex", "auto")
    assert isinstance(wrong, NotComputed) and "SHA-256" in wrong.reason
    # Not a state dict of tensors: refused by the restricted unpickler or the check after it.
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    monkeypatch.setitem(fetch.SOURCES, "dists", fetch.Source((tmp_path / "junk.pt").as_uri()))
    monkeypatch.setitem(fetch.SOURCES, "vgg16", fetch.Source((tmp_path / "vgg16.pth").as_uri()))
    _, _, junk = metrics.load_networks("", "", "alex", "auto")
    assert isinstance(junk, NotComputed) and "state dict" in junk.reason
    # Only whole, converted files are ever in the cache (the VGG16 one, fetched last time).
    assert sorted(os.listdir(fetch.cache_dir())) == ["vgg16.safetensors"]


def test_a_given_path_is_used_as_it_is():
    assert fetch.resolve("a.safetensors,b.npz", "dists") == "a.safetensors,b.npz"
    with pytest.raises(ValueError, match="unknown"):
        fetch.resolve("auto", "musiq")
