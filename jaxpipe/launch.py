"""Local multi-process launcher: ``python -m jaxpipe.launch --nproc N -- CMD ...``.

Starts N copies of a command on this machine, each with one CPU device pinned
to its own core (round robin over the cores this process may use; the pinning
is done by ``jaxpipe.distributed.initialize`` in the child, since forking a
multithreaded JAX process to set it would risk deadlocks), the
coordinator on loopback, and the variables ``jaxpipe.distributed.initialize``
reads. Their output is forwarded line by line with a ``[rank k]`` prefix.
Each process runs in its own process group, so a wrapper such as
``bash -c "python train.py; ..."`` is stopped together with what it started.
If one process exits non-zero, every group is stopped (SIGTERM, then SIGKILL
after ``GRACE_S`` seconds) and the launcher exits with that rank's status,
naming the rank that failed first; a ``--timeout`` bounds the whole run (the
launcher returns at most ``GRACE_S`` + 1 s after it). It never waits forever.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .distributed import COORDINATOR_ENV, CORE_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

GRACE_S = 3.0  # between SIGTERM and SIGKILL: stopping takes at most this plus a second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(rank: int, stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[rank {rank}] {line.decode(errors='replace')}")
        out.flush()


def _wait(rank: int, proc: subprocess.Popen, exits: queue.Queue) -> None:
    exits.put((rank, proc.wait()))


def _signal_group(proc: subprocess.Popen, signum: int) -> bool:
    """Sends ``signum`` to the process group ``proc`` leads; False if the group is gone."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_running(proc: subprocess.Popen) -> bool:
    """Whether a process of ``proc``'s group still runs (exited but unreaped ones do not count).

    An orphan whose new parent never reaps it stays a zombie in the group, so
    signal 0 alone would call the group alive; ``/proc`` tells the states
    apart where there is one.
    """
    if not os.path.isdir("/proc/self"):
        return _signal_group(proc, 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.pid and fields[0] != "Z":
            return True
    return False


def _wait_for_groups(procs: Sequence[subprocess.Popen], seconds: float) -> list[subprocess.Popen]:
    """Polls until no process of any group runs or ``seconds`` pass; returns the groups still running."""
    running = [proc for proc in procs if _group_running(proc)]
    deadline = time.monotonic() + seconds
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [proc for proc in running if _group_running(proc)]
    return running


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """Stops every process of every child's group: SIGTERM, then SIGKILL after ``GRACE_S``.

    Whole groups, so the processes a wrapper (``bash -c "python ..."``)
    started go too, and any that ignore SIGTERM (a training loop that saves a
    checkpoint first) are killed. Returns once every process has exited (a
    killed process can take a moment under load), at most a second after the
    SIGKILL.
    """
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    for proc in _wait_for_groups(procs, GRACE_S):
        _signal_group(proc, signal.SIGKILL)
    _wait_for_groups(procs, 1.0)
    for proc in procs:
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(command: Sequence[str], nproc: int, timeout: float | None = None, out=None) -> int:
    """Runs ``command`` as ``nproc`` processes joined by ``jax.distributed``.

    Each process starts in its own process group (session). When one fails,
    on the timeout, or at the end, every group is stopped: SIGTERM, then
    SIGKILL after ``GRACE_S`` seconds.

    Args:
      command: the program and its arguments.
      nproc: number of processes (one CPU device each).
      timeout: seconds before every process is stopped; ``None`` for none.
      out: where to forward output (default ``sys.stdout``).

    Returns:
      0 if every process exited 0; else the status of the rank that failed
      first (``128 + N`` for a rank killed by signal N), or 124 on timeout.

    Raises:
      ValueError: if ``nproc < 1``, ``command`` is empty, or its program
        cannot be started.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}")
    if not command:
        raise ValueError("give the command to run after '--', e.g. -- python train.py")
    if shutil.which(command[0]) is None:
        raise ValueError(
            f"cannot run {command[0]!r}: no such program (not a file, and not found on PATH); "
            "check the command after '--'"
        )
    out = sys.stdout if out is None else out
    cores = sorted(os.sched_getaffinity(0))
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, threads, exits = [], [], queue.Queue()
    start, code = time.monotonic(), 0
    try:
        for rank in range(nproc):
            env = dict(os.environ, **{
                COORDINATOR_ENV: coordinator, NUM_PROCESSES_ENV: str(nproc), PROCESS_ID_ENV: str(rank),
                "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "PYTHONUNBUFFERED": "1",
            })
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
            env[CORE_ENV] = str(cores[rank % len(cores)])
            try:
                proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except OSError as err:
                raise ValueError(f"cannot run {command[0]!r}: {err.strerror or err}") from None
            procs.append(proc)
            for target, args in ((_forward, (rank, proc.stdout, out)), (_wait, (rank, proc, exits))):
                thread = threading.Thread(target=target, args=args, daemon=True)
                thread.start()
                threads.append(thread)
        finished = 0
        while finished < nproc:
            left = None if timeout is None else start + timeout - time.monotonic()
            if left is not None and left <= 0:
                out.write(f"[launch] timeout after {timeout:g} s; stopping all processes\n")
                code = 124
                break
            try:
                rank, status = exits.get(timeout=left)
            except queue.Empty:
                continue
            finished += 1
            if status != 0:
                out.write(f"[launch] rank {rank} {_describe(status)} (the first to fail); "
                          "stopping the other processes\n")
                code = status if status > 0 else 128 - status
                break
    finally:
        _stop(procs)
        for thread in threads:
            thread.join(timeout=0.5)
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
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
