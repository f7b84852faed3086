"""The trainer: sharded steps equal the single-device step, bitwise resume, SIGTERM, corrupt
checkpoints, NaN stops, restore onto another mesh."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codi_jax import sharding, train
from tiny import tiny_config


def _batch(seed=0, n=8):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"image": jax.random.uniform(k1, (n, 16, 16, 3), minval=-1, maxval=1),
            "cond": jax.random.uniform(k2, (n, 16, 16, 3), minval=-1, maxval=1)}


def _run_steps(cfg, mesh, n=2):
    s = train.setup(cfg, mesh)
    step, state = train.jit_train_step(cfg, s, mesh), s.state
    losses = []
    for i in range(n):
        batch = sharding.global_batch({k: np.asarray(v) for k, v in _batch(i).items()}, mesh)
        state, metrics = step(state, s.frozen, s.aux, batch, jax.random.PRNGKey(7))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def test_sharded_step_equals_single_device_step():
    cfg = tiny_config()
    cfg.mesh.min_shard_size = 64          # shard even the tiny model's parameters
    ref_state, ref_losses = _run_steps(cfg, sharding.make_mesh(1, 1, jax.devices()[:1]))
    for data, fsdp in [(2, 4), (1, 8)]:
        state, losses = _run_steps(cfg, sharding.make_mesh(data, fsdp))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pe_codi_state_holds_only_the_adapter():
    """PE-CoDi: the frozen UNet has no gradient, optimizer state or EMA copy."""
    cfg = tiny_config()
    cfg.model.adapter, cfg.model.trainable = "controlnet", "adapter"
    s = train.setup(cfg, sharding.make_mesh(1, 1, jax.devices()[:1]))
    assert set(s.state["params"]) == {"adapter"} and set(s.state["target"]) == {"adapter"}
    assert set(s.frozen) == {"unet"}
    n_opt = sum(x.size for x in jax.tree.leaves(s.state["opt_state"]))
    n_adapter = sum(x.size for x in jax.tree.leaves(s.state["params"]))
    assert n_opt <= 2 * n_adapter + 10  # Adam's two moments of the adapter only


def _checkpoint(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_resume_is_bitwise_identical_and_checkpoints_know_their_config(tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    train.train_and_evaluate(tiny_config(num_steps=4), whole)
    train.train_and_evaluate(tiny_config(num_steps=2), halves)   # "killed" after step 2
    stored = train.stored_config(halves)
    assert stored.model.unet_config.block_out_channels == [8, 16] and stored.train.num_steps == 2
    # A longer run may continue these checkpoints; another model may not (refused up front).
    other = tiny_config(num_steps=4)
    other.model.adapter = "controlnet"
    with pytest.raises(ValueError, match="model.adapter: 'cond_encoder' in the checkpoint, 'controlnet' now"):
        train.train_and_evaluate(other, halves)
    train.train_and_evaluate(tiny_config(num_steps=4), halves)   # resumes at 2
    a, b = _checkpoint(whole, 4), _checkpoint(halves, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The workdir alone rebuilds the run: an export from the stored config loads back.
    from codi_jax.export import load_exported

    export_dir = train.export_checkpoint(train.stored_config(whole), whole)
    student, params, _, grid = load_exported(export_dir)
    assert grid == 10 and student.config["adapter"] == "cond_encoder"
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(train.final_params(a, {}))):
        np.testing.assert_allclose(x, y, rtol=0, atol=0)


def test_sigterm_saves_a_restorable_checkpoint_and_stops(tmp_path, monkeypatch):
    from codi_jax import data as data_lib

    real = data_lib.make_train_iterator

    def preempting_iterator(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data_lib, "make_train_iterator", preempting_iterator)
    cfg = tiny_config(num_steps=50, checkpoint_every=1000)
    with pytest.raises(train.Preempted) as stop:
        train.train_and_evaluate(cfg, str(tmp_path))
    assert stop.value.step == 3
    restored = _checkpoint(str(tmp_path), 3)
    assert int(restored["step"]) == 3


def test_several_processes_ask_the_preemption_sync_manager_not_a_collective(monkeypatch):
    """On several processes the stop is JAX's agreed sync point, asked once per step: no
    ``process_allgather`` (a blocking host barrier) in the step loop, and no SIGTERM handler of
    ours over the one ``jax.distributed`` installs."""
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or step == 7)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda *a, **k: pytest.fail("a collective"))
    before = signal.getsignal(signal.SIGTERM)
    flag = train.PreemptionFlag()
    assert signal.getsignal(signal.SIGTERM) is before
    assert [flag.stop_after(step) for step in range(5, 9)] == [False, False, True, False]
    assert asked == [5, 6, 7, 8]
    flag.restore()


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_config(num_steps=4), workdir)
    latest = os.path.join(workdir, "checkpoints", "4")
    for root, _, files in os.walk(latest):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    cfg = tiny_config(num_steps=4)
    abstract = train.setup(cfg, sharding.make_mesh()).abstract_state()
    restored = train.restore_latest(train.checkpoint_manager(workdir, cfg), abstract)
    assert int(restored["step"]) == 2
    assert "checkpoint 4" in caplog.text and "cannot be restored" in caplog.text


def test_restore_onto_a_different_mesh(tmp_path):
    workdir = str(tmp_path)
    cfg = tiny_config(num_steps=2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.min_shard_size = 1, 8, 64
    train.train_and_evaluate(cfg, workdir)
    saved = _checkpoint(workdir, 2)
    cfg.mesh.data, cfg.mesh.fsdp = 4, 2
    abstract = train.setup(cfg, sharding.make_mesh(4, 2)).abstract_state()
    restored = train.restore_latest(train.checkpoint_manager(workdir, cfg), abstract)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(x), y)
    sharded = [x for x in jax.tree.leaves(restored) if "fsdp" in str(x.sharding.spec)]
    assert sharded and all(x.sharding.mesh.shape["fsdp"] == 2 for x in sharded)


def test_nan_loss_stops_naming_the_step_and_keeps_parameters(tmp_path, monkeypatch):
    from codi_jax import data as data_lib

    real = data_lib.make_train_iterator

    def poisoned(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(data_lib, "make_train_iterator", poisoned)
    with pytest.raises(train.NonFiniteLossError, match="step 3"):
        train.train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=2), str(tmp_path))
    assert int(_checkpoint(str(tmp_path), 2)["step"]) == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_checkpoint(str(tmp_path), 2)))


def test_mesh_shape_errors_name_the_axes():
    assert sharding.mesh_shape(-1, 2, 8) == (4, 2)
    with pytest.raises(ValueError, match="mesh"):
        sharding.mesh_shape(3, -1, 8)
    with pytest.raises(ValueError, match="mesh"):
        sharding.mesh_shape(-1, -1, 8)
    with pytest.raises(ValueError, match="train.batch_size"):
        train.train_and_evaluate(tiny_config(batch_size=6), "/nonexistent-never-written")


def test_gradient_accumulation_runs_sharded():
    """Two micro-batches on a 2x4 mesh: a finite loss of the same size as the plain step's, and an
    update (the micro-batches draw their own noise, so the two steps are not bitwise equal)."""
    cfg = tiny_config(grad_accum=2)
    mesh = sharding.make_mesh(2, 4)
    # Two steps: the warm-up schedule's learning rate is 0 at step 0.
    state, losses = _run_steps(cfg, mesh, n=2)
    ref_state, ref_losses = _run_steps(tiny_config(), mesh, n=2)
    assert all(np.isfinite(losses)) and all(0.2 < a / b < 5 for a, b in zip(losses, ref_losses))
    moved = [float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"]))]
    assert max(moved) > 0  # different micro-batch noise gives a different (real) update


def test_mu_gets_its_own_step_size():
    t = tiny_config(lr=1e-3, warmup_steps=1, grad_clip=0.0).train
    t.mu_lr_scale = 50.0
    tx, _ = train.make_optimizer(t)
    params = {"adapter": {"mu": jnp.zeros(()), "conv": {"kernel": jnp.zeros((3,))}}}
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    ratio = float(params["adapter"]["mu"]) / float(params["adapter"]["conv"]["kernel"][0])
    assert ratio == pytest.approx(50.0, rel=1e-5)


def test_evaluation_ema_is_separate_from_the_consistency_target():
    """The evaluation EMA follows the ramped decay (1 + n) / (10 + n), whatever θ⁻'s decay is; the
    diffusion objective keeps no θ⁻ at all."""
    cfg = tiny_config(ema_decay=0.5)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    s = train.setup(cfg, mesh)
    init = jax.device_get(s.state["params"])
    state, _ = _run_steps(cfg, mesh, n=2)
    # step 0: d = 0.1 → ema₁ = 0.1 init + 0.9 p₁; step 1: d = 2/11 → ema₂ = d ema₁ + (1 − d) p₂.
    # Recompute p₁ from one step.
    one, _ = _run_steps(cfg, mesh, n=1)
    ema1 = jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, init, one["params"])
    d = 2.0 / 11.0
    want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema1, state["params"])
    for a, b in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(state["target"]),
                                                    jax.tree.leaves(state["ema"])))
    cfg.objective = "diffusion"
    assert train.setup(cfg, mesh).state["target"] == {}


def test_evaluation_during_training_writes_the_curve(tmp_path):
    """eval.every: the EMA is evaluated on every split while training, the online weights beside
    it at the end, each line in eval_log.jsonl; train metrics in train_log.jsonl, with images/s
    and MFU from the ahead-of-time compiled step's FLOPs (compile_log.jsonl), the evaluation's
    time left out of them."""
    import json

    cfg = tiny_config(num_steps=4, peak_flops_per_chip=1e12)
    cfg.eval.num_examples, cfg.eval.batch_size, cfg.eval.steps, cfg.eval.every = 8, 8, (1,), 2
    cfg.data.embedded.eval_crops_per_image, cfg.data.embedded.procedural_eval = 1, 4
    cfg.data.embedded.natural_repeats, cfg.data.embedded.procedural_train = 1, 4
    results = train.train_and_evaluate(cfg, str(tmp_path))
    lines = [json.loads(l) for l in open(tmp_path / "eval_log.jsonl")]
    assert [(l["step"], l["split"], l["weights"]) for l in lines] == [
        (2, "eval", "ema"), (2, "eval_procedural", "ema"),
        (4, "eval", "ema"), (4, "eval_procedural", "ema"), (4, "eval", "online")]
    assert results["samplers"]["codi"]["1"] == lines[2]["samplers"]["codi"]["1"]
    assert set(results["splits"]) == {"eval_procedural"} and "online" in results
    assert "condition" in results  # SR's trivial baseline: the bicubic-upsampled input
    train_log = [json.loads(l) for l in open(tmp_path / "train_log.jsonl")]
    assert [l["step"] for l in train_log] == [1, 2, 3, 4]
    (compiled,) = [json.loads(l) for l in open(tmp_path / "compile_log.jsonl")]
    assert compiled["step"] == 0 and compiled["backend"] == "cpu" and compiled["flops"] > 0
    assert compiled["temp_bytes"] > 0 and compiled["peak_flops_per_chip"] == 1e12
    # Step 2's interval held the evaluation after it: no figure rather than a wrong one.
    timed = [l for l in train_log if "images_per_second" in l]
    assert [l["step"] for l in timed] == [1, 3, 4]
    for l in timed:
        assert l["images_per_second"] == pytest.approx(8 * l["steps_per_second"])
        assert l["mfu"] == pytest.approx(compiled["flops"] * l["steps_per_second"] / 1e12)
    for name in ("eval_samples.png", "eval_online_samples.png", "eval_procedural_samples.png"):
        assert (tmp_path / name).exists()


def test_setup_leaves_only_the_placed_shards_on_the_devices():
    """The pipeline's weights (UNet, VAE) are read and adapted on the host and placed once: after
    ``setup`` the new device buffers are exactly the state, frozen and aux trees, each with the
    sharding the fsdp rule gives it, and no unsharded copy of the teacher stays alive."""
    import gc
    import math

    from codi_jax import config_lib

    cfg = config_lib.base_config("sr")  # the embedded latent teacher, read from its folder
    cfg.distill.predictor = "teacher"   # an aux copy of the teacher's UNet too
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.min_shard_size = 1, 8, 64
    gc.collect()
    before = jax.live_arrays()  # kept alive, so no new array can reuse one of their ids
    s = train.setup(cfg, sharding.make_mesh(1, 8))
    gc.collect()
    seen = {id(a) for a in before}
    new = [a for a in jax.live_arrays() if id(a) not in seen]
    placed = jax.tree.leaves((s.state, s.frozen, s.aux))
    assert {"vae", "teacher"} <= set(s.aux)
    assert sorted(map(id, new)) == sorted(map(id, placed))
    for tree, shardings in ((s.state, s.state_sharding), (s.frozen, s.frozen_sharding), (s.aux, s.aux_sharding)):
        for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
            assert x.sharding == sh
    # Per device: the bytes the shardings imply, and for the sharded majority 1/8 of the whole.
    implied = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in placed)
    for device in jax.devices():
        on_device = sum(sh.data.nbytes for x in new for sh in x.addressable_shards if sh.device == device)
        assert on_device == implied
    total = sum(x.nbytes for x in placed)
    assert implied < 0.2 * total
    # The student's teacher points at the placed VAE; of its UNet only the shapes remain.
    assert s.student.teacher.vae_params is s.aux["vae"]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(s.student.teacher.unet_params))
