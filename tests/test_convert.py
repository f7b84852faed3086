"""PyTorch <-> Flax renaming and transposes (codi_jax.models.convert)."""
import numpy as np
import pytest

from codi_jax.models import convert


def _spec(shape, dtype=np.float32):
    return np.empty(shape, dtype)


def test_key_paths_round_trip_on_names_with_digits():
    cases = {
        "time_embedding.linear_1.weight": ("time_embedding", "linear_1", "kernel"),
        "down_blocks.0.resnets.1.conv1.weight": ("down_blocks_0", "resnets_1", "conv1", "kernel"),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias": (
            "down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0", "bias"),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (
            "mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "kernel"),
        "controlnet_cond_embedding.blocks.5.bias": ("controlnet_cond_embedding", "blocks_5", "bias"),
        "encoder.layers.11.layer_norm2.weight": ("encoder", "layers_11", "layer_norm2", "scale"),
        "embeddings.token_embedding.weight": ("embeddings", "token_embedding", "embedding"),
    }
    for key, flax_path in cases.items():
        assert convert.flax_path_to_torch_key(flax_path) == key
        assert convert.torch_key_to_flax_path(key) == flax_path[:-1] + (key.rsplit(".", 1)[1],)


def test_dense_conv_norm_embedding_layouts():
    rng = np.random.default_rng(0)
    sd = {
        "lin.weight": rng.normal(size=(5, 3)).astype(np.float32),  # (out, in)
        "lin.bias": rng.normal(size=(5,)).astype(np.float32),
        "conv.weight": rng.normal(size=(6, 4, 3, 2)).astype(np.float32),  # OIHW
        "norm.weight": rng.normal(size=(6,)).astype(np.float32),
        "emb.weight": rng.normal(size=(10, 4)).astype(np.float32),  # (vocab, dim), not transposed
    }
    target = {
        "lin": {"kernel": _spec((3, 5)), "bias": _spec((5,))},
        "conv": {"kernel": _spec((3, 2, 4, 6))},
        "norm": {"scale": _spec((6,))},
        "emb": {"embedding": _spec((10, 4))},
    }
    params = convert.torch_to_flax(sd, target)
    np.testing.assert_array_equal(params["lin"]["kernel"], sd["lin.weight"].T)
    np.testing.assert_array_equal(params["conv"]["kernel"][1, 0], sd["conv.weight"][:, :, 1, 0].T)
    np.testing.assert_array_equal(params["emb"]["embedding"], sd["emb.weight"])
    back = convert.flax_to_torch(params)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
        assert back[k].flags["C_CONTIGUOUS"]


def test_casts_to_target_dtype_and_squeezes_legacy_1x1_attention():
    sd = {"attn.to_q.weight": np.ones((4, 2, 1, 1), np.float16)}
    params = convert.torch_to_flax(sd, {"attn": {"to_q": {"kernel": _spec((2, 4))}}})
    assert params["attn"]["to_q"]["kernel"].dtype == np.float32
    assert params["attn"]["to_q"]["kernel"].shape == (2, 4)


def test_all_problems_reported_together():
    sd = {
        "a.weight": np.zeros((3, 2), np.float32),
        "b.weight": np.zeros((7, 7), np.float32),
        "extra.bias": np.zeros((1,), np.float32),
        "embeddings.position_ids": np.arange(4)[None],  # buffer, silently not a parameter
    }
    target = {
        "a": {"kernel": _spec((2, 3))},
        "b": {"kernel": _spec((4, 5))},
        "time_embedding": {"linear_1": {"bias": _spec((8,))}},
    }
    with pytest.raises(convert.WeightMismatchError) as info:
        convert.torch_to_flax(sd, target, context="unet")
    err = info.value
    assert err.missing == ["time_embedding.linear_1.bias"]
    assert err.unexpected == ["extra.bias"]
    assert err.mismatched == [("b.weight", (7, 7), (5, 4))]
    message = str(err)
    for needle in ("unet", "time_embedding.linear_1.bias", "extra.bias", "b.weight", "(7, 7)", "(5, 4)"):
        assert needle in message
    assert isinstance(err, ValueError)


def test_flax_to_torch_rejects_colliding_names():
    params = {"blocks_0": {"bias": np.zeros(1)}, "blocks": {"0": {"bias": np.zeros(1)}}}
    with pytest.raises(ValueError, match="blocks.0.bias"):
        convert.flax_to_torch(params)


def _flax_leaf_for(key: str, ndim: int) -> str:
    # What the Flax modules use for each PyTorch `weight`: embeddings are the nn.Embedding tables.
    if not key.endswith(".weight"):
        return key.rsplit(".", 1)[1]
    if key.endswith("_embedding.weight"):
        return "embedding"
    return "kernel" if ndim >= 2 else "scale"


def _round_trip_real_keys(state_dict: dict):
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    target = {}
    for key, value in state_dict.items():
        path = convert.torch_key_to_flax_path(key)
        leaf = _flax_leaf_for(key, value.ndim)
        shape = value.shape
        if leaf == "kernel":
            shape = shape[2:] + (shape[1], shape[0])
        node = target
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[leaf] = _spec(shape)
    params = convert.torch_to_flax(state_dict, target)
    back = convert.flax_to_torch(params)
    assert back.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    again = convert.flax_to_torch(convert.torch_to_flax(back, target))
    for k in back:
        np.testing.assert_array_equal(again[k], back[k])


def _real_models():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        layers_per_block=1, norm_num_groups=4, sample_size=8)
    unet2 = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=(2, 4),
        use_linear_projection=True, upcast_attention=True, layers_per_block=1, norm_num_groups=4, sample_size=8)
    controlnet = diffusers.ControlNetModel.from_unet(unet)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return {"unet": unet, "unet_sd2": unet2, "controlnet": controlnet, "vae": vae, "clip": clip}


def test_round_trip_on_real_diffusers_and_transformers_key_sets():
    for name, model in _real_models().items():
        state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        assert any("_" in k for k in state_dict), name
        _round_trip_real_keys(state_dict)
