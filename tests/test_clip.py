"""CLIP text encoder (codi_jax.models.clip): structure, masking, pooling, tokenizer, PyTorch parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models import convert
from codi_jax.models.clip import CLIPTextModel, load_tokenizer, tokenize
from tiny import write_tiny_tokenizer

# Stable Diffusion 1.5 text_encoder/config.json (openai/clip-vit-large-patch14), abridged.
SD15_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}
# Stable Diffusion 2.1 text_encoder (OpenCLIP ViT-H/14 with its last layer dropped: 23 of 24).
SD21_CONFIG = dict(
    SD15_CONFIG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act="gelu", projection_dim=512,
)

TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "hidden_act": "quick_gelu",
    "bos_token_id": 98,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
BOS, EOS = 98, 99


def _count(model, config):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(config))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _ids(batch=3, length=16, eos_at=(5, 10, 15), seed=0):
    ids = np.random.RandomState(seed).randint(3, BOS, (batch, length)).astype(np.int32)
    ids[:, 0] = BOS
    for row, pos in enumerate(eos_at):
        ids[row, pos] = EOS
        ids[row, pos + 1:] = EOS  # SD 1.x pads with the EOS token
    return ids


def _init(config, seed=0):
    """Model and random fp32 params built from shapes alone (``model.init`` would also run an eager
    forward pass, which compiles op by op and is slow on a loaded CPU)."""
    model = CLIPTextModel.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(config))["params"]
    rng = np.random.RandomState(seed)
    flat = {}
    for path, leaf in convert.flatten(shapes).items():
        base = 1.0 if path[-1] == "scale" else 0.0
        scale = 1.0 / np.sqrt(leaf.shape[0]) if path[-1] == "kernel" else 0.5
        flat[path] = jnp.asarray(base + scale * rng.randn(*leaf.shape), jnp.float32)
    return model, convert.unflatten(flat)


def _apply(model, **kwargs):
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, **kwargs))


@pytest.mark.parametrize("config, expected", [(SD15_CONFIG, 123_060_480), (SD21_CONFIG, 340_387_840)])
def test_parameter_count_of_real_configs(config, expected):
    # 123,060,480 is what transformers reports for CLIP ViT-L/14's text model; the SD 2.1 number was
    # measured with transformers' CLIPTextModel on the meta device.
    assert _count(CLIPTextModel.from_config(config), config) == expected


def test_parameter_paths_mirror_checkpoint_keys():
    model = CLIPTextModel.from_config(TINY)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(TINY))["params"]
    keys = {convert.flax_path_to_torch_key(p) for p in convert.flatten(shapes)}
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.encoder.layers.2.self_attn.q_proj.bias" in keys
    assert "text_model.encoder.layers.0.mlp.fc2.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys
    assert len(keys) == 2 + 3 * 16 + 2


def test_from_config_rejects_unsupported_values():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModel.from_config(dict(TINY, hidden_act="relu"))
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        CLIPTextModel.from_config(dict(TINY, architectures=["CLIPTextModelWithProjection"]))
    model = CLIPTextModel.from_config(dict(TINY, some_unknown_key=3), num_hidden_layers=1)
    assert model.num_hidden_layers == 1


def test_attention_is_causal_and_padding_mask_applies():
    model, params = _init(TINY)
    ids = _ids()
    changed = ids.copy()
    changed[:, 8] = 7
    apply = _apply(model)
    out = apply(params, ids)
    out2 = apply(params, changed)
    # Positions before the edit cannot see it; positions after it can.
    np.testing.assert_array_equal(out.last_hidden_state[:, :8], out2.last_hidden_state[:, :8])
    assert np.abs(out.last_hidden_state[:, 8:] - out2.last_hidden_state[:, 8:]).min(axis=-1).max() > 0
    mask = np.ones_like(ids)
    mask[:, 6:] = 0
    masked = apply(params, ids, mask)
    np.testing.assert_allclose(masked.last_hidden_state[:, :6], out.last_hidden_state[:, :6], atol=1e-6)
    assert np.abs(masked.last_hidden_state[:, 6:] - out.last_hidden_state[:, 6:]).max() > 1e-3


def test_pooled_output_picks_eos_position_by_either_rule():
    ids = _ids(eos_at=(5, 10, 14))
    ids[ids == 60] = 61
    ids[:, 3] = 60  # the EOS id of the second model below
    rows = np.arange(3)
    legacy, params = _init(TINY)  # eos_token_id == 2: position of the largest id (99, padded)
    out = _apply(legacy)(params, ids)
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[rows, [5, 10, 14]])
    current = CLIPTextModel.from_config(dict(TINY, eos_token_id=60))  # first occurrence of the EOS id
    out = _apply(current)(params, ids)
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[rows, [3, 3, 3]])


def test_outputs_shapes_and_clip_skip():
    model, params = _init(TINY)
    ids = _ids()
    out = _apply(model)(params, ids)
    assert out.last_hidden_state.shape == (3, 16, 32) and out.pooler_output.shape == (3, 32)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    no_skip = _apply(model, method=model.encode_prompt)(params, ids)
    np.testing.assert_array_equal(no_skip, out.last_hidden_state)
    skip = _apply(model, clip_skip=1, method=model.encode_prompt)(params, ids)
    assert np.abs(skip - out.last_hidden_state).max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip"):
        _apply(model, clip_skip=3, method=model.encode_prompt)(params, ids)


def test_bf16_compute_keeps_fp32_params():
    model, params = _init(TINY)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    ids = _ids()
    ref = _apply(model)(params, ids).last_hidden_state
    bf16 = CLIPTextModel.from_config(TINY, dtype=jnp.bfloat16)
    out = _apply(bf16)(params, ids).last_hidden_state
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)


def test_tokenize_pads_truncates_and_loads_from_pipeline_folder(tmp_path):
    vocab = write_tiny_tokenizer(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path)  # the pipeline folder: picks its tokenizer/ subfolder
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids, mask = tokenize(tok, ["a cat", "Cat " * 20], max_length=8)
    assert ids.dtype == np.int32 and ids.shape == (2, 8) and mask.shape == (2, 8)
    np.testing.assert_array_equal(ids[0], [bos, vocab["a</w>"], vocab["cat</w>"], eos, eos, eos, eos, eos])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    # Truncation keeps BOS ... EOS and lower-cases.
    np.testing.assert_array_equal(ids[1], [bos] + [vocab["cat</w>"]] * 6 + [eos])
    assert mask[1].all()
    single, _ = tokenize(load_tokenizer(tmp_path / "tokenizer"), "a", max_length=4)
    assert single.shape == (1, 4)


@pytest.mark.parity
@pytest.mark.parametrize("hidden_act, eos_token_id", [("quick_gelu", 2), ("gelu", EOS)])
def test_parity_with_transformers(hidden_act, eos_token_id):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = dict(TINY, hidden_act=hidden_act, eos_token_id=eos_token_id)
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    # Checkpoints on disk (SD pipelines) carry the "text_model." prefix; transformers >= 5 drops it
    # from state_dict(), older versions keep it.
    state = {k if k.startswith("text_model.") else "text_model." + k: v.numpy()
             for k, v in torch_model.state_dict().items()}
    model = CLIPTextModel.from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(config))["params"]
    params = convert.torch_to_flax(state, shapes)

    ids = _ids()
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 11:] = 0
    for attention_mask in (None, mask):
        torch_mask = None if attention_mask is None else torch.tensor(attention_mask)
        with torch.no_grad():
            ref = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch_mask,
                              output_hidden_states=True)
            ref_skip = torch_model.final_layer_norm(ref.hidden_states[-2])
        out = _apply(model)(params, ids, attention_mask)
        skip = _apply(model, clip_skip=1, method=model.encode_prompt)(params, ids, attention_mask)
        diff = lambda a, b: float(np.abs(np.asarray(a) - b.numpy()).max())
        assert diff(out.last_hidden_state, ref.last_hidden_state) <= 1e-4
        assert diff(out.pooler_output, ref.pooler_output) <= 1e-4
        assert len(out.hidden_states) == len(ref.hidden_states)
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            assert diff(ours, theirs) <= 1e-4
        assert diff(skip, ref_skip) <= 1e-4
