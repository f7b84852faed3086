"""Autoencoder pretraining (objective "autoencoder"): the loss, a short run that resumes, evaluates
during training and exports a VAE that the teacher loader reads back."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import autoencoder, config_lib, models
from codi_jax.models.vae import AutoencoderKL

TINY_VAE = dict(config_lib.MINI_VAE, block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)


def _pretrain_vae_config(arg):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pretrain_vae", os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_vae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_vae_config(num_steps):
    cfg = _pretrain_vae_config("minimal")
    cfg.model.vae_config = TINY_VAE
    cfg.data.image_size = 16
    cfg.train.num_steps = num_steps
    cfg.train.lr_schedule, cfg.train.warmup_steps = "constant", 1  # the same schedule for 2 and 4 steps
    cfg.train.checkpoint_every = 2
    cfg.eval.every = 2
    return cfg


def test_presets_compose_and_unknown_ones_are_named():
    cfg = _pretrain_vae_config("wide,minimal")
    assert list(cfg.model.vae_config.block_out_channels) == [64, 128, 128] and cfg.train.num_steps == 6
    assert list(_pretrain_vae_config(None).model.vae_config.block_out_channels) == [32, 64, 64]
    stage2 = _pretrain_vae_config("finetune64")
    assert stage2.data.image_size == 64 and stage2.train.num_steps == 1000 and stage2.train.lr == 3e-4
    with pytest.raises(ValueError, match=r"\['tall'\]"):
        _pretrain_vae_config("wide,tall")


def test_loss_terms():
    vae = AutoencoderKL.from_config(TINY_VAE)
    params = vae.init(jax.random.PRNGKey(0), *AutoencoderKL.dummy_inputs(TINY_VAE))["params"]
    cfg = tiny_vae_config(2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
    total, m = autoencoder.make_loss(vae, cfg)(params, x, jax.random.PRNGKey(2))
    w = cfg.autoencoder
    np.testing.assert_allclose(total, w.l1_weight * m["l1"] + w.l2_weight * m["l2"] + w.kl_weight * m["kl"],
                               rtol=1e-6)
    assert float(m["kl"]) > 0 and float(m["l2"]) <= float(m["l1"]) * 2

    # lowpass_weight adds the squared error of the 8x8 block means, and nothing else.
    cfg.autoencoder.lowpass_weight = 3.0
    total_lp, m_lp = autoencoder.make_loss(vae, cfg)(params, x, jax.random.PRNGKey(2))
    z = vae.apply({"params": params}, x, method=vae.encode).sample(jax.random.PRNGKey(2))
    rec = np.asarray(vae.apply({"params": params}, z, method=vae.decode), np.float64)
    blocks = lambda a: a.reshape(2, 2, 8, 2, 8, 3).mean(axis=(2, 4))
    expected = np.mean(np.square(blocks(rec) - blocks(np.asarray(x, np.float64))))
    np.testing.assert_allclose(m_lp["lowpass"], expected, rtol=1e-4)
    np.testing.assert_allclose(total_lp, total + 3.0 * expected, rtol=1e-5)


def test_torch_default_init_draws_pytorch_bounds_and_keeps_norms():
    from flax import traverse_util

    from codi_jax.models.torch_init import torch_default_init

    vae = AutoencoderKL.from_config(TINY_VAE)
    params = vae.init(jax.random.PRNGKey(0), *AutoencoderKL.dummy_inputs(TINY_VAE))["params"]
    flat = traverse_util.flatten_dict(params)
    redrawn = traverse_util.flatten_dict(torch_default_init(params, jax.random.PRNGKey(1)))
    assert redrawn.keys() == flat.keys()
    conv_in = ("encoder", "conv_in")
    bound = 1 / np.sqrt(3 * 3 * 3)  # fan_in of a 3x3 conv on RGB
    for leaf in ("kernel", "bias"):
        v = np.asarray(redrawn[conv_in + (leaf,)])
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound  # uniform over ±bound
    assert float(np.abs(np.asarray(flat[conv_in + ("bias",)])).max()) == 0.0  # flax's zeros, replaced
    for path, v in flat.items():
        if path[-1] == "scale" or (path[-1] == "bias" and path[:-1] + ("kernel",) not in flat):
            np.testing.assert_array_equal(redrawn[path], v)  # GroupNorm affine: untouched
        elif path[-1] == "kernel":
            fan_in = np.prod(v.shape[:-1])
            assert np.abs(np.asarray(redrawn[path])).max() <= 1 / np.sqrt(fan_in)


def test_short_run_resumes_evaluates_and_exports(tmp_path):
    workdir = str(tmp_path)
    autoencoder.train_and_evaluate(tiny_vae_config(2), workdir)     # "preempted" at step 2
    results = autoencoder.train_and_evaluate(tiny_vae_config(4), workdir)
    lines = [json.loads(l) for l in open(os.path.join(workdir, "eval_log.jsonl"))]
    assert [l["step"] for l in lines] == [2, 4] and set(lines[1]) == {"step", "eval", "eval_procedural"}
    assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "train_log.jsonl"))][-1] == 4
    assert results["scaling_factor"] == json.load(open(os.path.join(workdir, "eval.json")))["scaling_factor"]
    vae, params = models.load(os.path.join(workdir, "export", "vae"), "vae")
    assert vae.scaling_factor == results["scaling_factor"] > 0
    rec = autoencoder.reconstruct(vae, params, jnp.zeros((1, 16, 16, 3)))
    assert rec.shape == (1, 16, 16, 3) and bool(jnp.all(jnp.isfinite(rec)))

    # Decoder fine-tuning from that export: the encoder (so the latent space and its scale) is
    # untouched, bit for bit, and the decoder moves.
    tuned_dir = str(tmp_path / "decoder")
    cfg = tiny_vae_config(2)
    cfg.model.vae = os.path.join(workdir, "export", "vae")
    cfg.autoencoder.trainable = "decoder"
    cfg.train.lr = 1e-2
    tuned = autoencoder.train_and_evaluate(cfg, tuned_dir)
    _, tuned_params = models.load(os.path.join(tuned_dir, "export", "vae"), "vae")
    assert tuned["scaling_factor"] == vae.scaling_factor
    for part in ("encoder", "quant_conv"):
        for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(tuned_params[part])):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["decoder"]),
                                                       jax.tree.leaves(tuned_params["decoder"])))


def test_decoder_training_needs_a_trained_vae(tmp_path):
    cfg = tiny_vae_config(2)
    cfg.autoencoder.init = "pytorch"
    with pytest.raises(ValueError, match="autoencoder.init"):
        autoencoder.train_and_evaluate(cfg, str(tmp_path))
    cfg.autoencoder.init = "flax"
    cfg.autoencoder.trainable = "decoder"
    with pytest.raises(ValueError, match="set model.vae"):
        autoencoder.train_and_evaluate(cfg, str(tmp_path))
    assert autoencoder.trainable_mask({"decoder": {"w": 0}, "encoder": {"w": 0}}, "decoder") == {
        "decoder": {"w": True}, "encoder": {"w": False}}
    with pytest.raises(ValueError, match="trainable"):
        autoencoder.trainable_mask({}, "encoders")
