"""LoRA: identity at initialisation (B = 0), merge = the unmerged model, only factors and new
weights train, a few steps of training move only them, and the PEFT file diffusers reads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_adapters import ADAPTED, UNET, _cond, _random_unet_params

from codi_jax.models import lora
from codi_jax.models.adapters import ConditionedUNet, init_adapted_params, new_weights_mask


@pytest.fixture(scope="module")
def base():
    _, unet_params = _random_unet_params()
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((2, 16, 16, 4), dtype=np.float32))
    t = jnp.array([3, 900])
    ctx = jnp.asarray(rng.standard_normal((2, 5, 32), dtype=np.float32))
    return unet_params, z, t, ctx


def _flat(tree):
    return traverse_util.flatten_dict(tree)


@pytest.mark.parametrize("convs", [False, True])
def test_lora_starts_as_the_base_model_and_merges_exactly(base, convs):
    unet_params, z, t, ctx = base
    config = ADAPTED["cond_encoder-latent"]
    model = ConditionedUNet.from_config(config)
    params = init_adapted_params(config, unet_params, jax.random.key(0))
    with_lora = lora.add_lora(params, 4, jax.random.key(1), convs=convs, skip=new_weights_mask(params))
    flat = _flat(with_lora)
    factored = [p[:-1] for p in flat if p[-1] == "lora_A"]
    # Attention projections of the UNet and of the conditional encoder's copy; with convs, the
    # convolutions too, but never a new weight (the condition's conv_in trains fully).
    assert any(p[0] == "unet" and p[-1] == "to_q" for p in factored)
    assert any(p[0] == "adapter" and p[-1] == "to_out_0" for p in factored)
    assert any(p[-1] == "conv1" for p in factored) == convs
    assert ("adapter", "conv_in") not in factored
    assert all(flat[p + ("lora_A",)].shape == flat[p + ("kernel",)].shape[:-1] + (4,) for p in factored)
    cond = _cond(config)
    apply = jax.jit(lambda p: model.apply({"params": lora.merge(p)}, z, t, cond, ctx))
    np.testing.assert_array_equal(apply(with_lora), apply(params))   # B = 0: exactly the base
    # Moved factors: the merged tree (what is exported) computes what the factored one does.
    moved = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.05 if path[-1].key == "lora_B" else v, with_lora)
    merged = lora.merge(moved)
    assert not lora.has_lora(merged) and jax.tree.structure(merged) == jax.tree.structure(params)
    out_factored = apply(moved)
    out_merged = jax.jit(lambda p: model.apply({"params": p}, z, t, cond, ctx))(merged)
    np.testing.assert_allclose(out_merged, out_factored, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out_factored - apply(params)))) > 1e-3


def test_only_factors_and_new_weights_train(base):
    unet_params = base[0]
    for name in ("cond_encoder-latent", "controlnet-pixel"):
        params = init_adapted_params(ADAPTED[name], unet_params, jax.random.key(0))
        new = new_weights_mask(params)
        mask = _flat(lora.trainable_mask(lora.add_lora(params, 2, jax.random.key(1), skip=new), new))
        trained = {p for p, m in mask.items() if m}
        assert all(p[-1] in lora.FACTORS or p[1] in ("mu", "conv_in", "cond_embedding", "controlnet_cond_embedding")
                   or p[1].startswith("controlnet_") for p in trained)
        assert not any(p[0] == "unet" and p[-1] not in lora.FACTORS for p in trained)
        assert ("adapter", "mu") in trained or ("adapter", "controlnet_mid_block", "kernel") in trained
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(params, 0, jax.random.key(1))


def test_peft_state_dict_layout(base):
    params = lora.add_lora({"unet": base[0]}, 3, jax.random.key(1), modules=("unet",), convs=True)
    state = lora.peft_state_dict(params["unet"])
    a = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    b = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"]
    assert a.shape == (3, UNET["block_out_channels"][0]) and b.shape == (UNET["block_out_channels"][0], 3)
    conv_a = state["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    conv_b = state["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"]
    assert conv_a.shape == (3, 32, 3, 3) and conv_b.shape == (32, 3, 1, 1)
    # The conv factors compose to the merged kernel's delta (PyTorch layout (out, in, kh, kw)).
    flat = _flat(params["unet"])
    path = ("down_blocks_0", "resnets_0", "conv1")
    delta = np.tensordot(np.asarray(flat[path + ("lora_A",)]), np.asarray(flat[path + ("lora_B",)]), 1)
    np.testing.assert_allclose(np.einsum("or,rikl->oikl", conv_b[:, :, 0, 0], conv_a),
                               delta.transpose(3, 2, 0, 1), rtol=1e-5, atol=1e-7)


def test_lora_run_trains_only_factors_and_new_weights_and_exports_both(tmp_path):
    """The trainer with ``model.lora_rank``: the state holds the factors and the new weights only
    (no optimizer state or EMA for the base), training moves B, and the export has the merged
    model plus ``lora/pytorch_lora_weights.safetensors``."""
    from safetensors.numpy import load_file
    from tiny import tiny_config

    from codi_jax import sharding, train
    from codi_jax.export import load_exported

    cfg = tiny_config(num_steps=3)
    cfg.model.lora_rank, cfg.model.lora_convs = 2, True   # the tiny UNet has no attention
    s = train.setup(cfg, sharding.make_mesh(1, 1, jax.devices()[:1]))
    trained = _flat(s.state["params"])
    assert all(p[-1] in lora.FACTORS or p[:2] in (("adapter", "mu"), ("adapter", "conv_in")) for p in trained)
    assert not any(p[-1] in lora.FACTORS for p in _flat(s.frozen))
    n_opt = sum(x.size for x in jax.tree.leaves(s.state["opt_state"]))
    assert n_opt <= 2 * sum(x.size for x in jax.tree.leaves(s.state["params"])) + 10
    cfg.export = True
    train.train_and_evaluate(cfg, str(tmp_path))
    student, params, _, _ = load_exported(str(tmp_path / "export"))
    assert not lora.has_lora(params)
    peft = load_file(str(tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    b = [v for k, v in peft.items() if k.endswith("lora_B.weight")]
    assert peft and all(k.startswith("unet.") for k in peft) and any(np.abs(v).max() > 0 for v in b)
