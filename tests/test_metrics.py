"""Metrics: the Fréchet distance (against scipy), the Inception-v3 and LPIPS networks and their
weight loading (on random weights: the real ones are user-supplied), "not computed" when weights
are absent, and the multi-scale sliced Wasserstein distance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from safetensors.numpy import save_file

from codi_jax.metrics import NotComputed, load_or_not_computed
from codi_jax.metrics import distribution, fid, lpips
from codi_jax.models.convert import flatten


def _reference_fid(f1, f2):
    """pytorch-fid's formula with scipy.linalg.sqrtm."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_identity_symmetry_and_scipy_reference():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(32, 32))
    f1 = rng.normal(size=(400, 32)) @ mix
    f2 = rng.normal(size=(300, 32)) @ (mix + 0.3 * rng.normal(size=(32, 32))) + 0.5
    assert fid.fid_from_features(f1, f1) == 0.0
    # The same set in another order: equal statistics up to rounding, through the eigen path.
    assert fid.fid_from_features(f1, f1[::-1]) < 1e-8 * np.trace(np.cov(f1, rowvar=False))
    d12, d21 = fid.fid_from_features(f1, f2), fid.fid_from_features(f2, f1)
    assert d12 > 1.0
    assert d12 == pytest.approx(d21, rel=1e-9)
    assert d12 == pytest.approx(_reference_fid(f1, f2), rel=1e-6)
    # Closed form for commuting (diagonal) covariances: ‖Δμ‖² + Σ(√a − √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 + 0 + 4)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Fewer samples than dimensions: singular covariances still give a finite, non-negative value.
    assert 0.0 <= fid.fid_from_features(rng.normal(size=(10, 64)), rng.normal(size=(12, 64))) < np.inf
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu1, np.diag(a), mu2[:2], np.diag(b[:2]))


def _random_params(module, *inputs, seed=0):
    """Random weights from the module's shapes (numpy, no traced forward: fast on a CPU):
    fan-in-scaled kernels, unit BN scale/variance, small biases and means."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(shape.shape[:-1]))
            return (rng.normal(size=shape.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name in ("scale", "running_var"):
            return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
        return (0.01 * rng.normal(size=shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _inception_params(variant="pytorch_fid"):
    module = fid.InceptionV3(variant=variant)
    return module, _random_params(module, jnp.zeros((1, 75, 75, 3)))


def _to_torch_state(params):
    """Our Flax tree → the PyTorch state dict a user's file holds (names, layouts, extra buffers)."""
    state = {}
    for path, value in flatten(params).items():
        value = np.asarray(value)
        leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
        if path[-1] == "kernel":
            value = np.transpose(value, (value.ndim - 1, value.ndim - 2) + tuple(range(value.ndim - 2)))
        key = ".".join(path[:-1] + (leaf,))
        # lpips-style list indices: features_0 → features.0, model_1 → model.1
        key = key.replace("features_", "features.").replace("model_1", "model.1")
        state[key] = np.ascontiguousarray(value)
    return state


def test_inception_has_torchvisions_trunk_and_loads_a_pytorch_state_dict(tmp_path):
    module, params = _inception_params()
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and fc
    # (2,049,000) the trunk has 21,785,568 (conv kernels + BN scale/bias; running stats are buffers).
    trainable = sum(int(np.prod(v.shape)) for p, v in flatten(params).items()
                    if p[-1] not in ("running_mean", "running_var"))
    assert trainable == 21_785_568
    state = _to_torch_state(params)
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)
    state["fc.bias"] = np.zeros((1008,), np.float32)
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(7, np.int64)
    state["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    path = tmp_path / "pt_inception.safetensors"
    save_file(state, str(path))
    extractor = fid.load_inception(path, input_size=75)
    assert extractor.module.variant == "pytorch_fid"
    loaded, original = flatten(extractor.params), flatten(params)
    assert loaded.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(loaded[key], np.asarray(original[key]), err_msg=str(key))
    # The same file with torchvision's 1000-way fc selects the torchvision block variants.
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)
    np.savez(tmp_path / "tv.npz", **state)
    assert fid.load_inception(tmp_path / "tv.npz").module.variant == "torchvision"


@pytest.mark.slow
def test_inception_features_and_fid_mechanics():
    """The whole network forward on random weights (compiling Inception-v3 takes a while on a CPU)."""
    module, params = _inception_params()
    # Batches of 2 for 4 images: one compiled shape (compiling Inception dominates this test).
    extractor = fid.InceptionFeatures(module, params, input_size=75, batch_size=2)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (4, 40, 40, 3), minval=-1, maxval=1))
    feats = extractor(images)
    assert feats.shape == (4, fid.FEATURE_DIM) and np.isfinite(feats).all() and feats.std() > 0
    np.testing.assert_array_equal(extractor(images[2:]), feats[2:])
    assert fid.fid(images, images, extractor) == 0.0
    other = np.clip(images + 0.5, -1, 1)
    assert fid.fid(images, other, extractor) == pytest.approx(fid.fid(other, images, extractor), rel=1e-6)
    assert fid.fid(images, other, extractor) > 0.0


def test_missing_or_bad_weights_are_not_computed(tmp_path):
    result = load_or_not_computed(fid.load_inception, None, "fid")
    assert isinstance(result, NotComputed) and "no weight file" in result.reason
    result = load_or_not_computed(fid.load_inception, tmp_path / "absent.safetensors", "fid")
    assert isinstance(result, NotComputed) and "absent.safetensors" in result.reason
    assert result.to_json() == {"value": None, "not_computed": result.reason}
    with pytest.raises(TypeError, match="not computed"):
        float(result)
    (tmp_path / "w.pth").write_bytes(b"not really")
    assert "pickled" in load_or_not_computed(fid.load_inception, tmp_path / "w.pth", "fid").reason
    save_file({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)},
              str(tmp_path / "partial.safetensors"))
    reason = load_or_not_computed(fid.load_inception, tmp_path / "partial.safetensors", "fid").reason
    assert "missing" in reason and "Mixed_7c" in reason
    save_file({"features.0.weight": np.full((64, 3, 11, 11), np.nan, np.float32)}, str(tmp_path / "nan.safetensors"))
    assert "NaN" in load_or_not_computed(lambda p: lpips.load_lpips(p), tmp_path / "nan.safetensors", "lpips").reason


def _random_lpips(net):
    module = lpips.LPIPSNet(net=net)
    params = _random_params(module, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
    # Trained LPIPS heads are non-negative.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.abs(v) if p[0].key.startswith("lin") else v, params)
    return lpips.PairedMetric(module, params)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_zero_on_identical_images_and_positive_otherwise(net):
    metric = _random_lpips(net)
    a = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3), minval=-1, maxval=1)
    b = jnp.clip(a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), -1, 1)
    np.testing.assert_array_equal(metric(a, a), np.zeros(3))
    d = metric(a, b)
    assert d.shape == (3,) and bool(jnp.all(d > 0))
    np.testing.assert_allclose(metric(b, a), d, rtol=1e-5)
    if net == "alex":
        # Usable as a training loss: finite gradients even at a = b.
        g = jax.grad(lambda x: jnp.sum(metric.module.apply({"params": metric.params}, x, a)))(a)
        assert bool(jnp.all(jnp.isfinite(g)))
        with pytest.raises(ValueError, match="shape"):
            metric(a, b[:2])


def test_lpips_loads_package_or_torchvision_plus_heads(tmp_path):
    metric = _random_lpips("alex")
    state = _to_torch_state(metric.params)
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    backbone = {k: v for k, v in state.items() if k.startswith("features")}
    assert heads["lin0.model.1.weight"].shape == (1, 64, 1, 1)
    # torchvision alexnet (+ classifier, ignored) and the LPIPS heads in two files.
    save_file({**backbone, "classifier.1.weight": np.zeros((4096, 9216), np.float32)},
              str(tmp_path / "alexnet.safetensors"))
    save_file(heads, str(tmp_path / "alex_heads.safetensors"))
    loaded = lpips.load_lpips([tmp_path / "alexnet.safetensors", tmp_path / "alex_heads.safetensors"], "alex")
    # The lpips package's own state dict: net.sliceK.N.* and the scaling layer's buffers.
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    package = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in backbone.items()}
    package.update(heads)
    package["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
    np.savez(tmp_path / "lpips_alex.npz", **package)
    loaded_pkg = lpips.load_lpips(tmp_path / "lpips_alex.npz", "alex")
    for other in (loaded, loaded_pkg):
        for key, value in flatten(metric.params).items():
            np.testing.assert_array_equal(flatten(other.params)[key], np.asarray(value), err_msg=str(key))


def test_multiscale_swd_identity_symmetry_and_shift():
    rng = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(rng)
    # Smooth random images: blurred noise, so every pyramid level carries signal.
    base = distribution._blur(distribution._blur(jax.random.normal(k1, (24, 32, 32, 3))))
    other = distribution._blur(distribution._blur(jax.random.normal(k2, (16, 32, 32, 3))))
    same = distribution.multiscale_swd(base, base)
    assert same["swd"] == 0.0 and set(same["levels"]) == {"32", "lowpass16"}
    d_ab = distribution.multiscale_swd(base, other)
    d_ba = distribution.multiscale_swd(other, base)
    assert d_ab["swd"] == pytest.approx(d_ba["swd"], rel=1e-5)   # also with unequal set sizes
    shifts = [distribution.multiscale_swd(base, base + s)["swd"] for s in (0.05, 0.2, 0.5)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    # A different sample of the same distribution is closer than a shifted copy.
    assert d_ab["swd"] < shifts[2]
    # Blur changes the band-pass level, not just the mean colour.
    blurred = distribution.multiscale_swd(base, distribution._blur(base))
    assert blurred["levels"]["32"] > 5 * d_ab["levels"]["32"]
    with pytest.raises(ValueError, match="image shape"):
        distribution.multiscale_swd(base, base[:, :16])


def test_evaluation_metrics_with_lpips_weights_and_without_fid_weights(tmp_path):
    """evaluate.DistributionMetrics: LPIPS from the configured files (0 for identical images, the
    masked padding example left out), SWD of a set against itself 0, FID "not computed"."""
    from codi_jax import config_lib, evaluate

    metric = _random_lpips("alex")
    save_file(_to_torch_state(metric.params), str(tmp_path / "lpips_alex.safetensors"))
    cfg = config_lib.base_config()
    cfg.eval.lpips_weights = str(tmp_path / "lpips_alex.safetensors")
    dist = evaluate.DistributionMetrics(cfg)
    assert set(dist.not_computed) == {"fid", "dists"} and "no weight file" in dist.not_computed["fid"]
    a = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1, maxval=1)
    b = jnp.clip(a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), -1, 1)
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    assert dist.add("same", a, a, mask) == {"lpips": 0.0}
    noisy = dist.add("noisy", b, a, mask)["lpips"]
    np.testing.assert_allclose(noisy, float(jnp.sum(metric(b, a)[:3])), rtol=1e-5)
    dist.add("target", a, a, mask)
    assert dist.compare("same", "target") == {"swd": 0.0}
    assert dist.compare("noisy", "target")["swd"] > 0
    assert sum(len(x) for x in dist._sets["noisy"]) == 3
