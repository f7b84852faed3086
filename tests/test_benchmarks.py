"""benchmarks/sd_step.py, the accelerator benchmark of issue-sized SD steps, checked on a CPU with
toy-width SD configs: a JAX cell (the trainer's compiled step) and the diffusers ControlNet step
each run in their own process, write their JSON line, are skipped when run again, and pair up
in the table."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sd_step.py")


def test_sd_step_benchmark_runs_its_cells_on_tiny_configs(tmp_path):
    out = tmp_path / "sd_step.jsonl"
    cmd = [sys.executable, SCRIPT, "--tiny", "--cells=pe:1:on,torch:1:on", "--steps=1", "--warmup=0",
           f"--json={out}"]
    env = dict(os.environ, XLA_FLAGS="")  # one device, as on the accelerator
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pe, torch = [json.loads(l) for l in open(out)]
    assert (pe["variant"], torch["variant"]) == ("pe", "torch")
    for r in (pe, torch):
        assert "error" not in r and r["step_s"] > 0 and r["images_per_second"] == 1 / r["step_s"]
    # The JAX cell is the trainer's step: PE-CoDi trains the ControlNet only, XLA counted its FLOPs.
    assert pe["flops"] > 0 and pe["compiled_peak_bytes"] > pe["argument_bytes"] > 0 and pe["backend"] == "cpu"
    assert 0 < pe["trainable_params"] < torch["trainable_params"] * 1.5
    assert pe["mfu"] is None  # no peak FLOP/s for a CPU
    table = [l for l in proc.stdout.splitlines() if l.startswith("| tiny | pe |")]
    ratio = float(table[0].rstrip(" |").rsplit("|", 1)[1])  # the diffusers step's time / ours
    assert ratio == pytest.approx(torch["step_s"] / pe["step_s"], rel=0.01)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "cell " not in again.stdout  # both cells done: skipped
    assert len(open(out).read().splitlines()) == 2
