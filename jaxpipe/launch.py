"""Local multi-process launcher: ``python -m jaxpipe.launch --nproc N -- CMD ...``.

Starts N copies of a command on this machine, each with one CPU device pinned
to its own core (round robin over the cores this process may use; the pinning
is done by ``jaxpipe.distributed.initialize`` in the child, since forking a
multithreaded JAX process to set it would risk deadlocks), the
coordinator on loopback, and the variables ``jaxpipe.distributed.initialize``
reads. Their output is forwarded line by line with a ``[rank k]`` prefix. If
one process exits non-zero, the others are stopped (SIGTERM, then SIGKILL
after a grace period) and the launcher exits non-zero naming the rank that
failed; a ``--timeout`` bounds the whole run. It never waits forever.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .distributed import COORDINATOR_ENV, CORE_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

GRACE_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(rank: int, stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[rank {rank}] {line.decode(errors='replace')}")
        out.flush()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch(command: Sequence[str], nproc: int, timeout: float | None = None, out=None) -> int:
    """Runs ``command`` as ``nproc`` processes joined by ``jax.distributed``.

    Args:
      command: the program and its arguments.
      nproc: number of processes (one CPU device each).
      timeout: seconds before every process is stopped; ``None`` for none.
      out: where to forward output (default ``sys.stdout``).

    Returns:
      0 if every process exited 0, else a non-zero exit code.

    Raises:
      ValueError: if ``nproc < 1`` or ``command`` is empty.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if not command:
        raise ValueError("give the command to run after '--', e.g. -- python train.py")
    out = sys.stdout if out is None else out
    cores = sorted(os.sched_getaffinity(0))
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, threads = [], []
    for rank in range(nproc):
        env = dict(os.environ, **{
            COORDINATOR_ENV: coordinator, NUM_PROCESSES_ENV: str(nproc), PROCESS_ID_ENV: str(rank),
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "PYTHONUNBUFFERED": "1",
        })
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
        env[CORE_ENV] = str(cores[rank % len(cores)])
        proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        thread = threading.Thread(target=_forward, args=(rank, proc.stdout, out), daemon=True)
        thread.start()
        threads.append(thread)
    start, code = time.monotonic(), 0
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                out.write(f"[launch] rank {rank} exited with code {code}; stopping the other processes\n")
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                out.write(f"[launch] timeout after {timeout:.0f} s; stopping all processes\n")
                code = 124
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
        for thread in threads:
            thread.join(timeout=GRACE_S)
    out.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m jaxpipe.launch --nproc N [--timeout S] -- CMD ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpipe.launch",
        description="Run a command as N local processes joined by jax.distributed (one CPU device each, "
        "gloo collectives, coordinator on loopback). The script calls jaxpipe.distributed.initialize().",
    )
    parser.add_argument("--nproc", type=int, required=True, help="number of processes")
    parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return launch(command, args.nproc, args.timeout)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
