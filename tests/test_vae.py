"""KL autoencoder (codi_jax.models.vae): structure, posterior, options, PyTorch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models import convert
from codi_jax.models.vae import AutoencoderKL, DiagonalGaussian

# Stable Diffusion 1.x/2.x vae/config.json.
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}

TINY = {
    "block_out_channels": [8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}


def _shapes(model, config):
    return jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(config))["params"]


def _random_params(shapes, seed=0):
    """Random fp32 params from shapes alone: ``model.init`` would also run (and, eagerly, compile
    op by op) a full forward pass, which costs tens of seconds on a loaded CPU."""
    rng = np.random.RandomState(seed)
    flat = {}
    for path, leaf in convert.flatten(shapes).items():
        fan_in = int(np.prod(leaf.shape[:-1])) if path[-1] == "kernel" else 1
        scale = 1.0 / np.sqrt(fan_in)
        base = 1.0 if path[-1] == "scale" else 0.0
        flat[path] = jnp.asarray(base + scale * rng.randn(*leaf.shape), jnp.float32)
    return convert.unflatten(flat)


def _init(config, **options):
    model = AutoencoderKL.from_config(config, **options)
    return model, _random_params(_shapes(model, config))


def _encode(model):
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=model.encode))


def _decode(model):
    return jax.jit(lambda params, z: model.apply({"params": params}, z, method=model.decode))


def test_parameter_count_of_sd_vae():
    model = AutoencoderKL.from_config(SD_VAE_CONFIG)
    assert model.scaling_factor == 0.18215  # SD's configs omit it: diffusers' default applies
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_shapes(model, SD_VAE_CONFIG))) == 83_653_863


def test_parameter_paths_mirror_diffusers_keys():
    model = AutoencoderKL.from_config(TINY)
    keys = {convert.flax_path_to_torch_key(p) for p in convert.flatten(_shapes(model, TINY))}
    for key in (
        "encoder.down_blocks.0.resnets.0.conv1.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.conv_norm_out.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
        "decoder.up_blocks.0.resnets.1.norm2.weight",
        "decoder.up_blocks.1.upsamplers.0.conv.weight",
        "decoder.mid_block.resnets.1.conv2.bias",
    ):
        assert key in keys, key
    # The last encoder level does not downsample; the last decoder level does not upsample.
    assert not any(k.startswith("encoder.down_blocks.2.downsamplers") for k in keys)
    assert not any(k.startswith("decoder.up_blocks.2.upsamplers") for k in keys)
    assert not any("time_emb_proj" in k for k in keys)


def test_shapes_and_scaling_factor():
    model, params = _init(TINY)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 24, 3)), jnp.float32)
    posterior = _encode(model)(params, x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 6, 4)
    image = _decode(model)(params, posterior.mode())
    assert image.shape == (2, 32, 24, 3)
    reconstruct = jax.jit(lambda params, x: model.apply({"params": params}, x))
    np.testing.assert_allclose(reconstruct(params, x), image, atol=1e-5)
    assert model.scaling_factor == 0.13025
    with pytest.raises(ValueError, match="rng"):
        jax.eval_shape(lambda x: model.apply({"params": params}, x, sample_posterior=True), x)
    sampled = jax.eval_shape(
        lambda x, key: model.apply({"params": params}, x, sample_posterior=True, rng=key), x, jax.random.key(1))
    assert sampled.shape == image.shape


def test_diagonal_gaussian_clips_logvar_and_samples():
    moments = jnp.concatenate([jnp.full((1, 2, 2, 2), 3.0), jnp.array([-40.0, 25.0])[None, None, None].repeat(2, 1).repeat(2, 2)], -1)
    dist = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(dist.logvar[0, 0, 0], [-30.0, 20.0])
    np.testing.assert_allclose(dist.std[0, 0, 0], np.exp([-15.0, 10.0]), rtol=1e-6)
    np.testing.assert_allclose(dist.var[0, 0, 0], np.exp([-30.0, 20.0]), rtol=1e-6)
    np.testing.assert_array_equal(dist.mode(), dist.mean)
    big = DiagonalGaussian(mean=jnp.full((4096,), 2.0), logvar=jnp.full((4096,), np.log(0.25)))
    draws = big.sample(jax.random.key(0))
    assert abs(float(draws.mean()) - 2.0) < 0.03 and abs(float(draws.std()) - 0.5) < 0.03
    np.testing.assert_array_equal(draws, big.sample(jax.random.key(0)))


def test_from_config_rejects_unsupported_values_and_takes_options():
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL.from_config(dict(TINY, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]))
    with pytest.raises(ValueError, match="up_block_types"):
        AutoencoderKL.from_config(dict(TINY, up_block_types=["UpDecoderBlock2D"] * 2))
    with pytest.raises(ValueError, match="shift_factor"):
        AutoencoderKL.from_config(dict(TINY, shift_factor=0.0609))
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL.from_config(dict(TINY, act_fn="tanhshrink"))
    model = AutoencoderKL.from_config(dict(TINY, force_upcast=True, latents_mean=None), latent_channels=8)
    assert model.latent_channels == 8 and model.block_out_channels == (8, 16, 16)


def test_optional_quant_convs_and_mid_attention():
    config = dict(TINY, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    model, params = _init(config)
    assert "quant_conv" not in params and "post_quant_conv" not in params
    assert "attentions_0" not in params["encoder"]["mid_block"]
    assert "attentions_0" not in params["decoder"]["mid_block"]
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    posterior = _encode(model)(params, x)
    assert posterior.mean.shape == (1, 4, 4, 4)
    assert _decode(model)(params, posterior.mean).shape == (1, 16, 16, 3)


def test_bf16_compute_keeps_fp32_params_and_posterior():
    model, params = _init(TINY)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    ref = _encode(model)(params, x)
    bf16 = AutoencoderKL.from_config(TINY, dtype=jnp.bfloat16)
    post = _encode(bf16)(params, x)
    assert post.mean.dtype == jnp.float32
    np.testing.assert_allclose(post.mean, ref.mean, atol=0.05 * float(np.abs(ref.mean).max()))
    assert jax.eval_shape(lambda z: bf16.apply({"params": params}, z, method=bf16.decode), post.mean).dtype == jnp.bfloat16


@pytest.mark.parity
def test_key_set_matches_diffusers_sd_vae():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = {k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        torch_model = diffusers.AutoencoderKL(**config)
    ours = {convert.flax_path_to_torch_key(p): v.shape
            for p, v in convert.flatten(_shapes(AutoencoderKL.from_config(config), config)).items()}
    theirs = dict(torch_model.state_dict().items())
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        if key.endswith(".weight") and tensor.ndim >= 2:
            assert convert.kernel_to_torch(np.empty(ours[key], np.int8)).shape == tuple(tensor.shape), key
        else:
            assert ours[key] == tuple(tensor.shape), key


@pytest.mark.parity
@pytest.mark.parametrize("mid_block_add_attention", [True, False])
def test_parity_with_diffusers(mid_block_add_attention):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = dict(TINY, mid_block_add_attention=mid_block_add_attention)
    torch.manual_seed(0)
    torch_model = diffusers.AutoencoderKL(**config).eval()
    rng = np.random.RandomState(0)
    # Norms initialise to scale 1 / bias 0; perturb them so a swapped or missing one shows.
    state = {k: v.numpy() + (0.3 * rng.randn(*v.shape).astype(np.float32) if "norm" in k else 0)
             for k, v in torch_model.state_dict().items()}
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model = AutoencoderKL.from_config(config)
    params = convert.torch_to_flax(state, _shapes(model, config))

    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    # 36 x 22: odd sizes after the first downsampling exercise the bottom/right-only padding.
    x = rng.uniform(-1, 1, (2, 36, 22, 3)).astype(np.float32)
    z = rng.randn(2, 5, 6, 4).astype(np.float32)
    with torch.no_grad():
        ref_post = torch_model.encode(nchw(x)).latent_dist
        ref_image = torch_model.decode(nchw(z)).sample
    post = _encode(model)(params, x)
    image = _decode(model)(params, z)
    assert post.mean.shape == (2, 9, 5, 4)
    assert np.abs(post.mean - nhwc(ref_post.mean)).max() <= 1e-4
    assert np.abs(post.logvar - nhwc(ref_post.logvar)).max() <= 1e-4
    assert np.abs(post.std - nhwc(ref_post.std)).max() <= 1e-4
    assert np.abs(image - nhwc(ref_image)).max() <= 1e-4
