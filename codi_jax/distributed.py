"""Multi-host start-up: ``jax.distributed`` for TPU pod slices, SLURM clusters and explicit setups.

``maybe_initialize`` runs first thing in ``main`` (before any JAX computation: the distributed
runtime must exist before the backend is created). Where the topology comes from, first match wins:

1. explicit arguments (``main``'s ``--coordinator_address``, ``--num_processes``, ``--process_id``);
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (what ``launch/slurm_gpu.sbatch`` exports; any launcher can set them);
3. a SLURM step with more than one task (``SLURM_NTASKS`` > 1): JAX's own SLURM detection;
4. a Cloud TPU VM (TPU device files or ``TPU_WORKER_HOSTNAMES``): JAX's own TPU detection, which
   reads the worker list from the VM metadata, so the same command runs on every pod worker.

Anything else is a single-process run and nothing is initialised. ``CODI_JAX_DISTRIBUTED=0``
turns all of this off (e.g. to run one worker of a pod on its own for debugging).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Mapping, Optional

from absl import logging

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SWITCH = "CODI_JAX_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to initialise: ``kind`` is "explicit", "slurm", "tpu" or "none"."""

    kind: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


def _int(name: str, value: Optional[str]) -> Optional[int]:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def on_tpu_vm(environ: Mapping[str, str] = os.environ) -> bool:
    """A Cloud TPU VM: the TPU chips' device files exist (v4/v5: /dev/accel*, v5e/v6e: /dev/vfio),
    or a TPU runtime variable is set. Checked without importing JAX or asking the metadata server."""
    if environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES"):
        return True
    return bool(glob.glob("/dev/accel[0-9]*")) or (
        os.path.isdir("/dev/vfio") and bool(glob.glob("/dev/vfio/[0-9]*")) and "TPU_SKIP_MDS_QUERY" not in environ)


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, environ: Mapping[str, str] = os.environ,
            tpu_vm: Optional[bool] = None) -> Plan:
    """Decides how (and whether) to initialise, without side effects (see the module docstring)."""
    if environ.get(ENV_SWITCH, "").lower() in ("0", "false", "off", "no"):
        return Plan("none")
    coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int(ENV_NUM_PROCESSES, environ.get(ENV_NUM_PROCESSES))
    process_id = process_id if process_id is not None else _int(ENV_PROCESS_ID, environ.get(ENV_PROCESS_ID))
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"distributed: process_id {process_id} not in [0, num_processes={num_processes})")
        if num_processes == 1:
            return Plan("none")
        return Plan("explicit", coordinator_address, num_processes, process_id)
    if any(given):
        # A half-given topology would silently train N independent copies: refuse it.
        raise ValueError(
            "distributed: give all of coordinator address, number of processes and process id "
            f"(flags or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}), or none; got "
            f"coordinator={coordinator_address!r}, num_processes={num_processes}, process_id={process_id}")
    if "SLURM_JOB_ID" in environ and (_int("SLURM_NTASKS", environ.get("SLURM_NTASKS")) or 1) > 1:
        return Plan("slurm")
    if tpu_vm if tpu_vm is not None else on_tpu_vm(environ):
        return Plan("tpu")
    return Plan("none")


def maybe_initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> Plan:
    """Initialises ``jax.distributed`` when this is one process of a multi-process run.

    Returns the plan that was followed. Must run before any JAX computation.
    """
    plan = resolve(coordinator_address, num_processes, process_id)
    if plan.kind == "none":
        return plan
    import jax

    if jax.distributed.is_initialized():
        return plan
    if plan.kind == "explicit":
        logging.info("jax.distributed: process %d of %d, coordinator %s", plan.process_id,
                     plan.num_processes, plan.coordinator_address)
        # CPU processes exchange data through gloo (the default today; set so an older default or a
        # user's environment cannot leave CPU collectives unimplemented).
        if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id)
    elif plan.kind == "slurm":
        logging.info("jax.distributed: SLURM job %s, %s tasks", os.environ.get("SLURM_JOB_ID"),
                     os.environ.get("SLURM_NTASKS"))
        jax.distributed.initialize()
    else:  # tpu
        try:
            jax.distributed.initialize()
        except ValueError as err:
            # No pod metadata (a single-host TPU VM outside GCE, e.g. Colab): one process is all
            # there is; a real pod slice always has the metadata JAX reads.
            logging.info("jax.distributed: not initialised on this TPU VM (%s); single process", err)
            return Plan("none")
    from codi_jax import console

    console.say(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
                f"{jax.local_device_count()} local / {jax.device_count()} global devices", every_process=True)
    return plan


def wait_for_every_process(name: str, timeout_s: int = 1800) -> None:
    """Blocks until every process has reached the point ``name`` (unique per use), through the
    coordination service rather than a device collective. Before the first train step: gloo's
    first CPU collective waits only 30 s for the other processes, and one process may compile for
    longer than that. A no-op in a single-process run."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the coordination client has no public handle

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)
