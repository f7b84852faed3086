"""CoDi adapters: identity at initialisation, the eq. 10 blend, ControlNet residuals, trainable masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codi_jax import models
from codi_jax.models.adapters import (
    CondEncoder,
    ConditionedUNet,
    controlnet_config,
    init_adapted_params,
    trainable_mask,
)
from codi_jax.models.convert import flax_to_torch
from codi_jax.models.unet import UNet2DConditionModel

UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4,
)
SIZE = 16

ADAPTED = {
    "cond_encoder-latent": dict(unet=UNET, adapter="cond_encoder", cond_channels=7),
    "cond_encoder-pixel-per_level_mu": dict(unet=UNET, adapter="cond_encoder", cond_channels=3,
                                            cond_embedding_channels=(8, 16), per_level_mu=True),
    "controlnet-pixel": dict(unet=UNET, adapter="controlnet", cond_channels=3, cond_embedding_channels=(8, 16)),
    "controlnet-latent": dict(unet=UNET, adapter="controlnet", cond_channels=4),
}


def _random_unet_params(seed=0):
    """Random, non-zero pretrained-UNet weights (numpy RNG: Flax's initialisers compile slowly on CPU)."""
    unet = UNet2DConditionModel.from_config(UNET)
    shapes = jax.eval_shape(unet.init, jax.random.key(0), *unet.dummy_inputs(UNET))["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        noise = rng.standard_normal(s.shape, dtype=np.float32)
        if path[-1].key == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(s.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise)

    return unet, jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def pretrained():
    unet, params = _random_unet_params()
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((2, SIZE, SIZE, 4), dtype=np.float32))
    t = jnp.array([3, 900])
    ctx = jnp.asarray(rng.standard_normal((2, 5, 32), dtype=np.float32))
    ref = jax.jit(unet.apply)({"params": params}, z, t, ctx)
    return params, z, t, ctx, ref


def _cond(config, seed=2):
    factor = 2 ** (len(config["cond_embedding_channels"]) - 1) if config.get("cond_embedding_channels") else 1
    shape = (2, SIZE * factor, SIZE * factor, config["cond_channels"])
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("name", sorted(ADAPTED))
def test_adapted_model_equals_pretrained_unet_at_init(name, pretrained):
    unet_params, z, t, ctx, ref = pretrained
    config = ADAPTED[name]
    model = ConditionedUNet.from_config(config)
    params = init_adapted_params(config, unet_params, jax.random.key(0))
    assert set(params) == {"unet", "adapter"}
    cond = _cond(config)

    def loss(p):
        out = model.apply({"params": p}, z, t, cond, ctx)
        return jnp.mean(out**2), out

    # One compile for output and gradient: the output is the auxiliary value.
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert out.shape == z.shape
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-6
    # Identity holds because of the zero/μ initialisation, not because the adapter is ignored:
    # its loss gradient reaches μ (CoDi) or the zero convs (ControlNet).
    gate = grads["adapter"]["mu"] if config["adapter"] == "cond_encoder" else grads["adapter"]["controlnet_mid_block"]["kernel"]
    assert float(jnp.max(jnp.abs(gate))) > 0


def test_adapter_encoder_is_a_copy_of_the_unet_encoder(pretrained):
    unet_params = pretrained[0]
    params = init_adapted_params(ADAPTED["cond_encoder-latent"], unet_params, jax.random.key(0))
    adapter = params["adapter"]
    for name in ("down_blocks_0", "down_blocks_1", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, adapter[name], unet_params[name])
    kernel, pre = adapter["conv_in"]["kernel"], unet_params["conv_in"]["kernel"]
    assert kernel.shape == (3, 3, 7, 32)
    np.testing.assert_array_equal(kernel[:, :, :4], pre)
    assert not np.any(np.asarray(kernel[:, :, 4:]))
    assert adapter["mu"].shape == () and float(adapter["mu"]) == 0.0
    fewer = init_adapted_params(dict(ADAPTED["cond_encoder-latent"], cond_channels=3), unet_params, jax.random.key(0))
    np.testing.assert_array_equal(fewer["adapter"]["conv_in"]["kernel"], pre[:, :, :3])
    per_level = init_adapted_params(ADAPTED["cond_encoder-pixel-per_level_mu"], unet_params, jax.random.key(0))
    # conv_in, 2 down-block layers, 1 downsampler, then the mid block: 5 blend points.
    assert per_level["adapter"]["mu"].shape == (5,)
    cn = init_adapted_params(ADAPTED["controlnet-pixel"], unet_params, jax.random.key(0))["adapter"]
    for name in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, cn[name], unet_params[name])
    assert not np.any(np.asarray(cn["controlnet_cond_embedding"]["conv_out"]["kernel"]))
    assert np.any(np.asarray(cn["controlnet_cond_embedding"]["conv_in"]["kernel"]))


def test_blend_points_line_up_with_the_unet_features(pretrained):
    """With c = z_t and the copied encoder, h_η(c) = h_θ(z_t) at every point, so any μ is a no-op.

    A feature compared against the wrong skip point (or a missed point) would change the output.
    """
    unet_params, z, t, ctx, ref = pretrained
    config = dict(unet=UNET, adapter="cond_encoder", cond_channels=4, per_level_mu=True)
    params = init_adapted_params(config, unet_params, jax.random.key(0))
    params["adapter"]["mu"] = jnp.linspace(0.2, 1.0, 5)
    model = ConditionedUNet.from_config(config)
    apply = jax.jit(model.apply)
    out = apply({"params": params}, z, t, z, ctx)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # ... while a different condition now changes the prediction, and does so smoothly in μ.
    other = apply({"params": params}, z, t, _cond(config), ctx)
    assert float(jnp.max(jnp.abs(other - ref))) > 1e-2


def test_time_dependent_mu_interpolates_its_knots(pretrained):
    """μ(t) with K knots: constant knots give the constant-μ model exactly; knots (0, 1) give, at
    each example's t, the constant-μ model with μ = t / 1000."""
    unet_params, z, t, ctx, ref = pretrained
    const = dict(unet=UNET, adapter="cond_encoder", cond_channels=4)
    knots = dict(const, mu_knots=2)
    p_const = init_adapted_params(const, unet_params, jax.random.key(0))
    p_knots = init_adapted_params(knots, unet_params, jax.random.key(0))
    assert p_knots["adapter"]["mu"].shape == (2,) and float(jnp.max(jnp.abs(p_knots["adapter"]["mu"]))) == 0.0
    apply_const = jax.jit(ConditionedUNet.from_config(const).apply)
    apply_knots = jax.jit(ConditionedUNet.from_config(knots).apply)
    cond = _cond(const)
    np.testing.assert_allclose(apply_knots({"params": p_knots}, z, t, cond, ctx), ref, atol=1e-5)
    p_const["adapter"]["mu"] = jnp.asarray(0.4)
    p_knots["adapter"]["mu"] = jnp.array([0.4, 0.4])
    np.testing.assert_allclose(apply_knots({"params": p_knots}, z, t, cond, ctx),
                               apply_const({"params": p_const}, z, t, cond, ctx), atol=1e-5)
    p_knots["adapter"]["mu"] = jnp.array([0.0, 1.0])
    ramp = apply_knots({"params": p_knots}, z, t, cond, ctx)
    for b in range(z.shape[0]):
        p_const["adapter"]["mu"] = jnp.asarray(float(t[b]) / 1000.0)
        one = apply_const({"params": p_const}, z[b:b + 1], t[b:b + 1], cond[b:b + 1], ctx[b:b + 1])
        np.testing.assert_allclose(ramp[b:b + 1], one, atol=1e-5)


def test_mu_blends_linearly(pretrained):
    """Eq. 10 at the mid block: blending with μ equals adding μ (f - h) to the mid output h."""
    unet_params, z, t, ctx, _ = pretrained
    config = dict(unet=UNET, adapter="cond_encoder", cond_channels=3, per_level_mu=True)
    params = init_adapted_params(config, unet_params, jax.random.key(0))
    unet = UNet2DConditionModel.from_config(UNET)
    encoder = CondEncoder.from_config(config)
    temb = unet.apply({"params": unet_params}, t, 2, method=unet.embed_time)
    feats, _ = encoder.apply({"params": params["adapter"]}, _cond(config), temb, t, ctx)
    # conv_in, down-block layer, downsampler, down-block layer, mid block.
    assert [f.shape[1:] for f in feats] == [(16, 16, 32), (16, 16, 32), (8, 8, 32), (8, 8, 64), (8, 8, 64)]
    _, state = unet.apply({"params": unet_params}, z, t, ctx,
                          capture_intermediates=lambda m, _: m.name == "mid_block")
    h_mid = state["intermediates"]["mid_block"]["__call__"][0]
    mu = 0.3
    blended = unet.apply({"params": unet_params}, z, t, ctx, encoder_features=feats,
                         encoder_mix=jnp.array([0.0, 0.0, 0.0, 0.0, mu]))
    residual = unet.apply({"params": unet_params}, z, t, ctx, mid_block_additional_residual=mu * (feats[-1] - h_mid))
    np.testing.assert_allclose(blended, residual, atol=1e-5)
    assert float(jnp.max(jnp.abs(blended - pretrained[4]))) > 1e-3


def test_trainable_mask_freezes_the_unet_for_pe_codi(pretrained):
    params = init_adapted_params(ADAPTED["controlnet-latent"], pretrained[0], jax.random.key(0))
    full, pe = trainable_mask(params, "all"), trainable_mask(params, "adapter")
    assert jax.tree.structure(full) == jax.tree.structure(params) == jax.tree.structure(pe)
    assert all(jax.tree.leaves(full))
    assert not any(jax.tree.leaves(pe["unet"])) and all(jax.tree.leaves(pe["adapter"]))
    labels = jax.tree.map(lambda m: "train" if m else "freeze", pe)
    opt = optax.multi_transform({"train": optax.sgd(1.0), "freeze": optax.set_to_zero()}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert not any(bool(jnp.any(u)) for u in jax.tree.leaves(updates["unet"]))
    assert all(bool(jnp.all(u == -1)) for u in jax.tree.leaves(updates["adapter"]))
    with pytest.raises(ValueError, match="mode"):
        trainable_mask(params, "unet")
    plain = init_adapted_params(dict(unet=UNET, adapter="none"), pretrained[0], jax.random.key(0))
    assert set(plain) == {"unet"}
    with pytest.raises(ValueError, match="adapter"):
        trainable_mask(plain, "adapter")


def test_config_errors_are_explicit(pretrained):
    with pytest.raises(ValueError, match="cond_channel"):
        ConditionedUNet.from_config(dict(unet=UNET, cond_channel=4))
    with pytest.raises(ValueError, match="adapter="):
        ConditionedUNet.from_config(dict(unet=UNET, adapter="t2i_adapter"))
    wrong = dict(UNET, block_out_channels=(32, 32))
    with pytest.raises(ValueError, match="unet_params"):
        init_adapted_params(dict(unet=wrong, adapter="cond_encoder", cond_channels=4), pretrained[0], jax.random.key(0))


@pytest.mark.parity
def test_controlnet_adapter_exports_with_diffusers_keys(pretrained):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = ADAPTED["controlnet-pixel"]
    params = init_adapted_params(config, pretrained[0], jax.random.key(0))
    exported = flax_to_torch(params["adapter"])
    reference = diffusers.ControlNetModel(**{k: v for k, v in controlnet_config(config).items() if k != "_class_name"})
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in exported.items()} == expected


def test_full_codi_on_sd21_has_the_papers_size():
    """Paper Table 1: full CoDi has 1.22 B parameters (UNet + duplicated encoder); PE-CoDi trains 364 M."""
    config = dict(unet=models.get_config("unet", "sd21"), adapter="cond_encoder", cond_channels=4)
    model = ConditionedUNet.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *ConditionedUNet.dummy_inputs(config))["params"]
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert count(shapes["unet"]) == 865_910_724
    assert round(count(shapes) / 1e9, 2) == 1.22
    pe = dict(config, adapter="controlnet", cond_channels=3, cond_embedding_channels=(16, 32, 96, 256))
    pe_shapes = jax.eval_shape(ConditionedUNet.from_config(pe).init, jax.random.key(0),
                               *ConditionedUNet.dummy_inputs(pe))["params"]
    assert count(pe_shapes["adapter"]) == 364_228_240
