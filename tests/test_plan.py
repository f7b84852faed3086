"""The on-paper plan: abstract SD teachers have diffusers' parameter counts and no weights; the
compiled step's memory and FLOPs respond to fsdp and batch as they must; the projection is labelled."""

import json
import os

import jax
import numpy as np
import pytest

from codi_jax import config_lib, plan
from tiny import TINY_UNET

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _tiny(fsdp):
    c = config_lib.base_config("sr")
    c.model.pretrained = ""
    c.model.unet_config = TINY_UNET
    c.data.image_size = 16
    c.mesh.data, c.mesh.fsdp, c.mesh.min_shard_size = -1, fsdp, 64
    return c


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_abstract_sd15_teacher_has_diffusers_sizes_and_no_weights():
    cfg = config_lib.config_module(os.path.join(CONFIGS, "sr.py"), "sr").get_config("sd15")
    assert plan.preset_of(cfg) == "sd15"
    t = plan.abstract_teacher(cfg, "sd15")
    for tree in (t.unet_params, t.vae_params, t.text_params):
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
    assert _count(t.unet_params) == 859_520_964
    assert _count(t.vae_params) == 83_653_863
    assert _count(t.text_params) == 123_060_480
    assert t.prediction_type == "epsilon" and t.latent


def test_unknown_pipeline_needs_a_preset():
    cfg = config_lib.base_config("sr")
    cfg.model.pretrained = "someone/custom-model"
    with pytest.raises(ValueError, match="--preset"):
        plan.preset_of(cfg)


def test_compiled_memory_shrinks_with_fsdp_and_flops_grow_with_batch():
    devices = jax.devices()[:8]
    one = plan.compile_step(_tiny(1), "", 1, devices=devices)      # replicated state, 1 example/device
    bigger = plan.compile_step(_tiny(8), "", 4, devices=devices)   # state split 8 ways, 4 examples/device
    assert one.trainable_params == bigger.trainable_params > 0
    # The state (most of the inputs) is split 8 ways; replicated small tensors keep it above 1/8.
    assert bigger.argument_bytes < one.argument_bytes / 3
    # Donated state: outputs alias inputs (all but the batch and the rng).
    assert one.alias_bytes > 0.9 * (one.argument_bytes - 16 * 16 * 6 * 4)
    # Per-device compute follows the per-device batch, whatever the sharding of the weights.
    assert 3.0 < bigger.flops_per_device / one.flops_per_device < 5.0
    assert bigger.temp_bytes > one.temp_bytes
    # Projection arithmetic and labelling.
    s = bigger.step_seconds("v4")
    assert s == pytest.approx(bigger.flops_per_device / (275e12 * 0.4))
    assert bigger.images_per_second_per_chip("v4") == pytest.approx(4 / s)
    text = plan.report(bigger)
    assert "PROJECTION" in text and "v5e" in text and "v5p" in text
    # Each CPU-compiled figure carries its caveat on its own line.
    assert bigger.backend == "cpu" and "compiled by XLA:CPU" in text
    memory_line = next(l for l in text.splitlines() if "per-device memory" in l)
    assert plan.CPU_CAVEAT in memory_line
    assert all("by the CPU estimate" in l for l in text.splitlines() if "HBM" in l)
    row = json.loads(json.dumps(bigger.to_json()))
    assert row["projection"]["v5e"]["fits_hbm"] is True
    table = plan.markdown_table([row], batches=(1, 4), fsdps=(8,), remats=("off",))
    assert table.splitlines()[0].startswith("Compiled by XLA:CPU (" + plan.CPU_CAVEAT)
    assert "| off | 1 | 8 | not computed |" in table and "| off | 4 | 8 | " in table


def test_sweep_grid_order_and_errors():
    grid = plan.sweep_settings("remat=nothing_saveable,off;batch=1,4;fsdp=8")
    assert grid[0] == {"remat": "nothing_saveable", "batch": "1", "fsdp": "8"} and len(grid) == 4
    with pytest.raises(ValueError, match="bad axis"):
        plan.sweep_settings("tensor=2")


def test_the_plan_compiles_what_the_trainer_sets_up():
    """plan.py's abstract teacher and student go through the trainer's own ``abstract_setup``:
    every state, frozen and aux leaf has the shape, dtype and sharding that ``train.setup`` places
    (with the frozen teacher copy of ``distill.predictor=teacher``)."""
    from codi_jax import sharding, train

    cfg = _tiny(8)
    cfg.distill.predictor = "teacher"
    mesh = sharding.make_mesh(1, 8, jax.devices()[:8])
    planned = train.abstract_setup(cfg, mesh, *plan.abstract_student(cfg, plan.abstract_teacher(cfg, "")))
    real = train.setup(cfg, mesh)
    assert "teacher" in planned.aux
    for a, b in ((planned.state, real.state), (planned.frozen, real.frozen), (planned.aux, real.aux)):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert (x.shape, x.dtype, x.sharding) == (y.shape, y.dtype, y.sharding)
