"""Joining several JAX processes into one job (``jax.distributed``).

One call at the top of a training script, before anything touches a device:

```python
import jaxpipe
jaxpipe.distributed.initialize()
```

Under ``python -m jaxpipe.launch`` it reads the coordinator, process count
and rank the launcher set, and selects the gloo collectives for CPU devices;
an uncaught exception or a failing ``sys.exit(n)`` then ends the process at
once, so the launcher sees which rank failed first.
On a TPU pod or a SLURM GPU allocation, where JAX finds the cluster itself,
it calls ``jax.distributed.initialize()`` with no arguments. With neither,
it does nothing (one process).

``jaxpipe.train``, ``Pipeline`` and ``data_shard`` make this call themselves
(``auto_initialize``) when the environment describes a job of several
processes, so a script that only calls ``jaxpipe.train`` runs as it is under
the launcher or on a cluster, provided it uses no JAX device before.

Every process then runs the same script: ``jaxpipe.train`` and ``Pipeline``
build global arrays from the global batch each process passes (all processes
must pass the same batches, e.g. from the same seed), or from each process's
own rows with ``data_per_process=True`` (see ``batches.py``), so results
equal the single-process run.
"""

from __future__ import annotations

import os
import sys
import traceback

import jax

COORDINATOR_ENV = "JAXPIPE_COORDINATOR"
NUM_PROCESSES_ENV = "JAXPIPE_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXPIPE_PROCESS_ID"
CORE_ENV = "JAXPIPE_CPU_CORE"
_CLUSTER_ENVS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def initialize() -> bool:
    """Joins this process to the job described by the environment.

    Returns:
      True if ``jax.distributed`` was initialised, False for a single process.

    Raises:
      ValueError: if the launcher's variables are malformed.
    """
    if COORDINATOR_ENV in os.environ:
        try:
            num_processes = int(os.environ[NUM_PROCESSES_ENV])
            process_id = int(os.environ[PROCESS_ID_ENV])
        except (KeyError, ValueError):
            raise ValueError(
                f"{COORDINATOR_ENV} is set, so {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be "
                f"integers, got {os.environ.get(NUM_PROCESSES_ENV)!r} and {os.environ.get(PROCESS_ID_ENV)!r}"
            ) from None
        if CORE_ENV in os.environ:
            # Before the backend starts its threads, so they inherit the core.
            os.sched_setaffinity(0, {int(os.environ[CORE_ENV])})
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        sys.excepthook = _exit_on_error
        sys.exit = _exit_at_once_on_failure
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    if any(name in os.environ for name in _CLUSTER_ENVS):
        jax.distributed.initialize()
        return True
    return False


def job_size() -> int:
    """The number of processes the environment says this job has (1 if it says nothing).

    The launcher's ``JAXPIPE_NUM_PROCESSES``; else SLURM's ``SLURM_NTASKS``,
    Open MPI's ``OMPI_COMM_WORLD_SIZE``, the hosts in a TPU pod's
    ``TPU_WORKER_HOSTNAMES``, or 2 for a multi-slice TPU job
    (``MEGASCALE_COORDINATOR_ADDRESS``). Malformed values count as 1 here;
    ``initialize`` reports the launcher's.
    """
    env = os.environ
    if COORDINATOR_ENV in env:
        return _int(env.get(NUM_PROCESSES_ENV))
    if "SLURM_JOB_ID" in env:
        return _int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS")))
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _int(env["OMPI_COMM_WORLD_SIZE"])
    if "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return 2
    if "TPU_WORKER_HOSTNAMES" in env:
        return max(1, len([h for h in env["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]))
    return 1


def _int(value: str | None) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def auto_initialize() -> bool:
    """``initialize()``, once, if the environment describes a job of several processes.

    Called by ``jaxpipe.train``, ``Pipeline`` and ``data_shard`` before they
    touch a device, so a script needs no call of its own. A job of one
    process, or one already joined, is left alone.

    Returns:
      True if this call joined the job.

    Raises:
      RuntimeError: if the environment describes a job of several processes
        but JAX was used in this process before it joined (every process
        would otherwise train alone, on its own copy of the model).
    """
    size = job_size()
    if size < 2 or jax.distributed.is_initialized():
        return False
    try:
        return initialize()
    except RuntimeError as err:
        if "before any JAX" not in str(err):
            raise
        raise RuntimeError(
            f"the environment describes a job of {size} processes (e.g. `python -m jaxpipe.launch` or a "
            "cluster), but this process used JAX before joining it, so it cannot join any more; call "
            "jaxpipe.distributed.initialize() at the top of the script, before any other JAX call "
            "(jax.devices(), jax.numpy arrays, ...)"
        ) from err


def _exit_on_error(kind, value, tb) -> None:
    """Prints an uncaught exception and exits at once with status 1.

    A normal exit would run ``jax.distributed``'s shutdown, which waits for
    every other process at a barrier; the others are waiting for this one in
    a collective, so the job would hang until the launcher's timeout instead
    of the launcher seeing this rank fail and stopping the rest.
    """
    traceback.print_exception(kind, value, tb)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def _exit_at_once_on_failure(status: object = None) -> None:
    """``sys.exit`` for launched workers: a failing status ends the process at once.

    ``sys.exit(0)`` (or no status) exits normally, through
    ``jax.distributed``'s shutdown barrier, where the other processes meet
    this one. Any other status is a failure: the others may be waiting for
    this process in a collective, so waiting at the barrier would hang the job
    until a timeout and leave another rank to be reported as the failed one.
    A string status is printed to stderr and exits with 1, as ``sys.exit``
    does. ``raise SystemExit(n)`` bypasses this and exits normally.
    """
    if status is None or status == 0:
        raise SystemExit(status)
    if not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)
