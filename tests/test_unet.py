"""UNet2DConditionModel / ControlNetModel: diffusers parity, remat, bf16, config handling, SD sizes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import models
from codi_jax.models.controlnet import ControlNetModel
from codi_jax.models.convert import torch_to_flax
from codi_jax.models.unet import UNet2DConditionModel

# SD 1.x-like: int head count, conv projections; one plain block on each side.
TINY_SD1 = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4,
)
# SD 2.x-like: per-block head counts, linear projections, fp32 attention; plus inpainting-style
# 9 input channels, uneven layers, two transformer layers and the other sinusoid convention.
TINY_SD2 = dict(
    in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=(1, 2), norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=(2, 4),
    use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=(1, 2), flip_sin_to_cos=False,
    freq_shift=1,
)
# One block each way (no down/upsampler): the cheapest graph with resnets, attention and skips,
# for the tests that compile several variants (remat, bf16).
MICRO = dict(
    in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=16,
    attention_head_dim=2,
)
TINY_CONTROLNET = dict(
    in_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    conditioning_channels=3, conditioning_embedding_out_channels=(8, 16),
)


def random_params(module, config, seed=0):
    """Random params shaped like ``module``'s, without running its initialisers.

    (Compiling Flax's truncated-normal initialisers costs ~1 s per parameter on CPU; the values
    only need to be random and of a sensible scale: kernels ~ N(0, 1/fan_in), norm scales ~ 1.)
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs(config))["params"]
    paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, s in paths:
        noise = rng.standard_normal(s.shape, dtype=np.float32)
        name = path[-1].key
        if name == "kernel":
            leaves.append(noise / np.sqrt(np.prod(s.shape[:-1])))
        elif name == "scale":
            leaves.append(1.0 + 0.1 * noise)
        else:
            leaves.append(0.1 * noise)
    return jax.tree_util.tree_unflatten(tree, [jnp.asarray(x) for x in leaves])


def _inputs(config, height=16, width=16, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, config["in_channels"]), dtype=np.float32)
    ctx = rng.standard_normal((batch, 5, config["cross_attention_dim"]), dtype=np.float32)
    return x, np.array([10, 999][:batch]), ctx


@pytest.fixture(scope="module")
def sd1():
    unet = UNet2DConditionModel.from_config(TINY_SD1)
    return unet, random_params(unet, TINY_SD1)


@pytest.fixture(scope="module")
def micro():
    unet = UNet2DConditionModel.from_config(MICRO)
    return unet, random_params(unet, MICRO)


def _count(module, config):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs(config)))["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _torch_state(module):
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():  # diffusers zero-inits some layers; make every weight matter
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parity
@pytest.mark.parametrize("config,size", [(TINY_SD1, (16, 16)), (TINY_SD2, (15, 13))], ids=["sd1", "sd2-odd-size"])
def test_unet_matches_diffusers(config, size):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref_model = diffusers.UNet2DConditionModel(**config).eval()
    state = _torch_state(ref_model)
    unet = UNet2DConditionModel.from_config(dict(ref_model.config))
    shapes = jax.eval_shape(unet.init, jax.random.key(0), *unet.dummy_inputs(config))["params"]
    params = torch_to_flax(state, shapes)
    x, t, ctx = _inputs(config, *size)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    out = jax.jit(unet.apply)({"params": params}, x, t, ctx)
    assert out.shape == x.shape[:3] + (4,)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


@pytest.mark.parity
def test_controlnet_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref_model = diffusers.ControlNetModel(**TINY_CONTROLNET).eval()
    state = _torch_state(ref_model)
    net = ControlNetModel.from_config(dict(ref_model.config))
    shapes = jax.eval_shape(net.init, jax.random.key(0), *net.dummy_inputs(TINY_CONTROLNET))["params"]
    params = torch_to_flax(state, shapes)
    x, t, ctx = _inputs(TINY_CONTROLNET)
    cond = np.random.default_rng(1).standard_normal((2, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        down, mid = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx),
                              torch.from_numpy(cond.transpose(0, 3, 1, 2)), conditioning_scale=0.7, return_dict=False)
    out_down, out_mid = jax.jit(net.apply)({"params": params}, x, t, ctx, cond, 0.7)
    assert len(out_down) == len(down) == 4
    for a, b in zip(out_down, down):
        np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out_mid), mid.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)

    # The residuals enter the UNet as diffusers adds them (skips and mid output).
    ref_unet = diffusers.UNet2DConditionModel(**TINY_SD1).eval()
    unet_state = _torch_state(ref_unet)
    unet = UNet2DConditionModel.from_config(TINY_SD1)
    unet_params = torch_to_flax(unet_state, jax.eval_shape(unet.init, jax.random.key(0), *unet.dummy_inputs(TINY_SD1))["params"])
    with torch.no_grad():
        ref = ref_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx),
                       down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    out = jax.jit(unet.apply)({"params": unet_params}, x, t, ctx, out_down, out_mid)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_parameter_paths_follow_diffusers_keys(sd1):
    _, params = sd1
    block = params["down_blocks_0"]["attentions_0"]
    assert block["proj_in"]["kernel"].shape == (1, 1, 32, 32)  # conv projection (SD 1.x)
    tb = block["transformer_blocks_0"]
    assert set(tb) == {"norm1", "attn1", "norm2", "attn2", "norm3", "ff"}
    assert tb["ff"]["net_0"]["proj"]["kernel"].shape == (32, 256) and "net_2" in tb["ff"]
    assert set(tb["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"} and "bias" not in tb["attn2"]["to_q"]
    assert tb["attn2"]["to_k"]["kernel"].shape == (32, 32)
    assert set(params["up_blocks_1"]) == {"resnets_0", "resnets_1", "attentions_0", "attentions_1"}
    assert params["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"].shape == (3, 3, 64, 64)
    assert params["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert params["time_embedding"]["linear_1"]["kernel"].shape == (32, 128)
    assert params["up_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 64 + 32, 32)
    assert set(params["mid_block"]) == {"resnets_0", "attentions_0", "resnets_1"}


def test_remat_gives_same_output_and_gradients(micro):
    unet, params = micro
    x, t, ctx = _inputs(MICRO, 8, 8)

    def loss(module, p):
        return jnp.mean(module.apply({"params": p}, x, t, ctx) ** 2)

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(unet, p)))(params)
    remat = UNet2DConditionModel.from_config(MICRO, remat="nothing_saveable")
    val, grad = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(val, ref_loss, rtol=1e-6)
    diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12), grad, ref_grad)
    assert max(float(d) for d in jax.tree.leaves(diffs)) < 1e-4
    assert float(jnp.max(jnp.abs(ref_grad["conv_in"]["kernel"]))) > 0
    # The remat'd blocks really are checkpointed: the jaxpr holds a remat (checkpoint) primitive.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    with pytest.raises(ValueError, match="not_a_policy"):
        UNet2DConditionModel.from_config(MICRO, remat="not_a_policy").init(jax.random.key(0), *unet.dummy_inputs(MICRO))


def test_bf16_compute_stays_close(micro):
    unet, params = micro
    x, t, ctx = _inputs(MICRO, 8, 8)
    ref = jax.jit(unet.apply)({"params": params}, x, t, ctx)
    out = jax.jit(UNet2DConditionModel.from_config(MICRO, dtype=jnp.bfloat16).apply)({"params": params}, x, t, ctx)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.05


def test_scalar_timestep_broadcasts_and_timestep_matters(micro):
    unet, params = micro
    x, _, ctx = _inputs(MICRO, 8, 8)
    apply = jax.jit(unet.apply)
    scalar = apply({"params": params}, x, jnp.float32(500), ctx)
    batched = apply({"params": params}, x, jnp.array([500, 500]), ctx)
    np.testing.assert_allclose(scalar, batched, atol=1e-6)
    assert float(jnp.max(jnp.abs(apply({"params": params}, x, jnp.array([10, 10]), ctx) - batched))) > 1e-3


def test_model_without_cross_attention_takes_no_context():
    config = dict(TINY_SD1, cross_attention_dim=None)
    unet = UNet2DConditionModel.from_config(config)
    sample, t, context = unet.dummy_inputs(config)
    assert context is None
    params = random_params(unet, config)
    tb = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert "attn2" not in tb and "norm2" not in tb
    assert jax.jit(unet.apply)({"params": params}, sample, t).shape == sample.shape
    with_cross = UNet2DConditionModel.from_config(TINY_SD1)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        with_cross.init(jax.random.key(0), sample, t, None)


@pytest.mark.parametrize(
    "key,value",
    [("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")), ("class_embed_type", "timestep"),
     ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("resnet_time_scale_shift", "scale_shift"),
     ("layers_per_block", (1, 1, 1))],
)
def test_unsupported_config_values_raise_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel.from_config(dict(TINY_SD1, **{key: value}))


def test_unknown_config_keys_are_ignored():
    config = dict(TINY_SD1, _class_name="UNet2DConditionModel", _diffusers_version="0.30.0", sample_size=64)
    assert UNet2DConditionModel.from_config(config).arch == UNet2DConditionModel.from_config(TINY_SD1).arch


@pytest.mark.parametrize(
    "cls,component,preset,expected",
    [(UNet2DConditionModel, "unet", "sd15", 859_520_964), (UNet2DConditionModel, "unet", "sd21", 865_910_724),
     (ControlNetModel, "controlnet", "sd15", 361_279_120)],
)
def test_sd_parameter_counts_without_materialising(cls, component, preset, expected):
    config = models.get_config(component, preset)
    assert _count(cls.from_config(config), config) == expected


@pytest.mark.parametrize("preset", models.PRESETS)
def test_to_config_round_trips(preset):
    unet = UNet2DConditionModel.from_config(models.get_config("unet", preset))
    assert UNet2DConditionModel.from_config(unet.to_config()).arch == unet.arch
    net = ControlNetModel.from_config(models.get_config("controlnet", preset))
    rebuilt = ControlNetModel.from_config(net.to_config())
    assert rebuilt == net
    json.dumps(unet.to_config()) and json.dumps(net.to_config())


@pytest.mark.parity
def test_to_config_builds_the_same_diffusers_model():
    diffusers = pytest.importorskip("diffusers")
    for cls, ref_cls, config in ((UNet2DConditionModel, diffusers.UNet2DConditionModel, TINY_SD2),
                                 (ControlNetModel, diffusers.ControlNetModel, TINY_CONTROLNET)):
        exported = {k: v for k, v in cls.from_config(config).to_config().items() if k != "_class_name"}
        ref_keys = {k: tuple(v.shape) for k, v in ref_cls(**config).state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ref_cls(**exported).state_dict().items()} == ref_keys
