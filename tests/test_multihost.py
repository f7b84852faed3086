"""Multi-host training for real: two processes on localhost (4 virtual CPU devices each, gloo
collectives, ``jax.distributed`` set up by ``codi_jax.main``'s flags) against one process with 8
devices. Same losses, one coherent checkpoint that a single process restores, and each process
reads only its own data shard."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from codi_jax import config_lib, data, distributed, sharding, train
from tiny import TINY_OVERRIDES, override

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 600

# The tiny trainer config plus what this test needs; the same lines build the in-process reference
# and the config file the worker processes read.
OVERRIDES = TINY_OVERRIDES + (
    # fsdp over all 8 devices: parameters and optimizer state are split across the two processes,
    # so the gradient all-reduce, checkpoint writes and the export gather all cross processes.
    ("mesh.data", 1), ("mesh.fsdp", 8), ("mesh.min_shard_size", 64),
    # A short evaluation at the end (it runs collectively like the step): eval.batch_size is the
    # global batch, and each global batch is the same records for any process count, so both runs
    # score the same 8 of the split's 16 examples. The export is on: process 0 writes it
    # from parameters half of which live in process 1.
    ("eval.num_examples", 8), ("eval.batch_size", 8), ("eval.steps", (1,)), ("eval.splits", ("eval",)),
    ("eval.online", False), ("data.embedded.eval_crops_per_image", 4),
    ("export", True),
)


def _config():
    return override(config_lib.base_config("sr"), OVERRIDES)


def _config_file(path, overrides=OVERRIDES):
    lines = ["from codi_jax import config_lib", "", "", "def get_config(arg=None):",
             "    c = config_lib.base_config('sr')"]
    lines += [f"    c.{key} = {value!r}" for key, value in overrides]
    lines.append("    return c")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _scalars(workdir, prefix="train/"):
    """{tag: [(step, value)]} from the TensorBoard event files clu wrote into ``workdir``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag.startswith(prefix):
                    value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    out.setdefault(v.tag, []).append((event.step, value))
    return {k: sorted(v) for k, v in out.items()}


def _shard_iterator(cfg, process_count):
    """What a single process must feed to see the multi-process global batches: the per-process
    streams of a ``process_count``-process run, concatenated in process order."""

    original = data.make_train_iterator  # captured: the test patches the name with this function

    def make(cfg_data, *, global_batch_size, seed, start_step=0, **_):
        its = [original(cfg_data, global_batch_size=global_batch_size, seed=seed,
                                        start_step=start_step, process_index=p, process_count=process_count)
               for p in range(process_count)]
        while True:
            parts = [next(it) for it in its]
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return make


def _run_two_workers(tmp_path, overrides, workdir, while_running=None):
    """Runs ``python -m codi_jax.main`` as two processes of one run (4 virtual devices each) on
    ``overrides``' config, calling ``while_running(procs)`` every half second until both exit;
    fails with both logs' tails unless both exit 0."""
    config_path = str(tmp_path / "tiny_config.py")
    _config_file(config_path, overrides)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    address = f"localhost:{_free_port()}"
    procs, logs = [], []
    try:
        for p in range(2):
            log = open(tmp_path / f"worker{p}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(tmp_path / f"records{p}.json"),
                 f"--config={config_path}", f"--workdir={workdir}", f"--coordinator_address={address}",
                 "--num_processes=2", f"--process_id={p}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        # Wait for both; stop early when one fails (the other would block in a collective until
        # the coordinator gives up).
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"multi-process run did not finish in {TIMEOUT_S} s")
            if while_running is not None:
                while_running(procs)
            time.sleep(0.5)
    finally:
        for proc in procs:  # whatever happened (timeout, failure, Ctrl-C): no process outlives the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- worker {p}:\n" + (tmp_path / f"worker{p}.log").read_text()[-3000:] for p in range(2))
    assert [proc.returncode for proc in procs] == [0, 0], tails


def test_resolve_topology_from_flags_env_and_clusters():
    assert distributed.resolve(environ={}, tpu_vm=False).kind == "none"
    explicit = distributed.resolve("h:1234", 4, 3, environ={}, tpu_vm=False)
    assert (explicit.kind, explicit.num_processes, explicit.process_id) == ("explicit", 4, 3)
    env = {"JAX_COORDINATOR_ADDRESS": "c:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.resolve(environ=env, tpu_vm=False) == distributed.Plan("explicit", "c:99", 2, 1)
    # Flags win over the environment.
    assert distributed.resolve(process_id=0, environ=env, tpu_vm=False).process_id == 0
    assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, tpu_vm=False).kind == "slurm"
    assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, tpu_vm=False).kind == "none"
    assert distributed.resolve(environ={}, tpu_vm=True).kind == "tpu"
    assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "a,b"}, tpu_vm=None).kind == "tpu"
    assert distributed.resolve(environ={"CODI_JAX_DISTRIBUTED": "0"}, tpu_vm=True).kind == "none"
    with pytest.raises(ValueError, match="all of coordinator"):
        distributed.resolve("h:1", None, None, environ={}, tpu_vm=False)
    with pytest.raises(ValueError, match="not in"):
        distributed.resolve("h:1", 2, 2, environ={}, tpu_vm=False)


def test_two_processes_train_like_one_with_eight_devices(tmp_path, monkeypatch):
    assert jax.device_count() == 8, "conftest gives the test process 8 virtual CPU devices"
    cfg = _config()

    # Reference first (it also builds the demo dataset, so the two workers only read it): one
    # process, 8 devices, fed the two processes' shards side by side.
    ref_dir = str(tmp_path / "single")
    monkeypatch.setattr(data, "make_train_iterator", _shard_iterator(cfg.data, 2))
    train.train_and_evaluate(cfg, ref_dir)
    monkeypatch.undo()
    ref = _scalars(ref_dir)
    assert [s for s, _ in ref["train/loss"]] == [1, 2, 3, 4]

    mp_dir = str(tmp_path / "multi")
    _run_two_workers(tmp_path, OVERRIDES, mp_dir)
    assert "process 1 of 2" in (tmp_path / "worker1.log").read_text(), "jax.distributed was not initialised"

    # The loss trajectory (and every logged training scalar) equals the single process's.
    multi = _scalars(mp_dir)
    assert set(multi) == set(ref), (sorted(multi), sorted(ref))
    for tag in ref:
        assert [s for s, _ in multi[tag]] == [s for s, _ in ref[tag]], tag
        np.testing.assert_allclose([v for _, v in multi[tag]], [v for _, v in ref[tag]], rtol=1e-5, atol=1e-6,
                                   err_msg=tag)

    # Each process read only its own shard of the training split, and together all of it... at
    # least as far as 4 steps of 4 examples go: disjoint, each inside its half.
    records = [json.loads((tmp_path / f"records{p}.json").read_text()) for p in range(2)]
    train_split = [name for name in records[0] if name.endswith(":train")]
    assert train_split, records[0].keys()
    for name in train_split:
        (o0, n0, total), (o1, n1, total1) = records[0][name]["shard"], records[1][name]["shard"]
        assert total == total1 and (o0, o0 + n0, o1 + n1) == (0, o1, total), (name, records[0][name]["shard"])
        read0, read1 = set(records[0][name]["read"]), set(records[1][name]["read"])
        assert read0 and read1 and not read0 & read1, name
        assert all(0 <= i < o1 for i in read0) and all(o1 <= i < total for i in read1), name

    # One checkpoint series, complete (no temporary directories left by either process), written
    # once; it restores in this single process onto another mesh and equals the reference state.
    ckpt_dir = os.path.join(mp_dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4"], os.listdir(ckpt_dir)
    s = train.setup(cfg, sharding.make_mesh(2, 4))
    restored = train.restore_latest(train.checkpoint_manager(mp_dir, cfg), s.abstract_state())
    reference = train.restore_latest(train.checkpoint_manager(ref_dir, cfg), s.abstract_state())
    assert int(restored["step"]) == 4
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(reference))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # The evaluation visited eval.num_examples examples in all, not per process, and scored them
    # as the single process did.
    single, multi_eval = (json.loads(open(os.path.join(d, "eval.json")).read()) for d in (ref_dir, mp_dir))
    assert single["num_examples"] == multi_eval["num_examples"] == 8
    for k in ("psnr", "ssim"):
        np.testing.assert_allclose(multi_eval["samplers"]["codi"]["1"][k], single["samplers"]["codi"]["1"][k],
                                   rtol=1e-4, err_msg=k)

    from safetensors.numpy import load_file

    exported = load_file(os.path.join(mp_dir, "export", "cond_encoder", "model.safetensors"))
    expected = load_file(os.path.join(ref_dir, "export", "cond_encoder", "model.safetensors"))
    assert exported.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(exported[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    """A preemption notice reaches one host only: JAX's preemption sync manager (no collective of
    ours per step) agrees on one step, at which both processes save one checkpoint together and
    exit cleanly (status 0, so the scheduler's rerun resumes)."""
    workdir = str(tmp_path / "multi")
    overrides = OVERRIDES + (("train.num_steps", 10_000), ("train.checkpoint_every", 10_000), ("export", False))
    log = os.path.join(workdir, "train_log.jsonl")
    sent = []

    def preempt_process_1_once_training(procs):
        if not sent and os.path.exists(log) and len(open(log).read().splitlines()) >= 2:
            procs[1].send_signal(signal.SIGTERM)
            sent.append(time.monotonic())

    _run_two_workers(tmp_path, overrides, workdir, preempt_process_1_once_training)
    assert sent, "the run ended before it was preempted"
    (step,) = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
    assert 2 <= step < 10_000
    for p in range(2):
        assert f"SIGTERM: saved step {step} and stopped" in (tmp_path / f"worker{p}.log").read_text(), p
