"""Two real processes joined by jax.distributed train like one device; the launcher never hangs."""

import io
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from models_for_tests import CASES, batches
from reference import assert_matches_reference, reference_run

from jaxpipe.launch import launch, main

HERE = pathlib.Path(__file__).parent


@pytest.mark.parametrize("mesh,schedule", [("1,2", "balanced")])
def test_two_processes_match_the_reference(tmp_path, mesh, schedule):
    out = tmp_path / "result.npz"
    log = io.StringIO()
    env_cmd = [sys.executable, str(HERE / "distributed_worker.py"), "lm", mesh, "4", schedule, str(out)]
    code = launch(env_cmd, nproc=2, timeout=240, out=log)
    assert code == 0, log.getvalue()
    assert "[rank 0] process 0 of 2" in log.getvalue() and "[rank 1] process 1 of 2" in log.getvalue()
    d = int(mesh.split(",")[0])
    case = CASES["lm"]
    ref_losses, _, ref_params = reference_run(case.model_fn, batches(case, d * 4 * 2), case.loss_fn,
                                              optax.sgd(0.05, momentum=0.9))
    saved = np.load(out)
    leaves = jax.tree.leaves(ref_params)
    assert_matches_reference(saved["losses"], ref_losses, [saved[f"arr_{i}"] for i in range(len(leaves))], leaves)


def test_a_failing_rank_stops_the_others_and_is_named():
    script = ("import os, sys, time\n"
              "rank = int(os.environ['JAXPIPE_PROCESS_ID'])\n"
              "print('started', flush=True)\n"
              "sys.exit(3) if rank == 1 else time.sleep(120)\n")
    log = io.StringIO()
    start = time.monotonic()
    code = launch([sys.executable, "-c", script], nproc=2, timeout=60, out=log)
    assert code == 3
    assert time.monotonic() - start < 20
    assert "rank 1 exited with code 3" in log.getvalue()


def test_a_rank_raising_inside_a_job_stops_the_others():
    """Rank 1 raises after joining jax.distributed while rank 0 waits in a collective."""
    script = ("import jaxpipe\n"
              "jaxpipe.distributed.initialize()\n"
              "import jax, jax.numpy as jnp\n"
              "from jax.experimental import multihost_utils\n"
              "if jax.process_index() == 1:\n"
              "    raise RuntimeError('boom in rank 1')\n"
              "multihost_utils.sync_global_devices('never reached by rank 1')\n")
    log = io.StringIO()
    start = time.monotonic()
    code = launch([sys.executable, "-c", script], nproc=2, timeout=90, out=log)
    assert code == 1, log.getvalue()
    assert time.monotonic() - start < 45, log.getvalue()
    assert "RuntimeError: boom in rank 1" in log.getvalue() and "rank 1 exited with code 1" in log.getvalue()


def test_timeout_stops_everything():
    log = io.StringIO()
    start = time.monotonic()
    code = launch([sys.executable, "-c", "import time; time.sleep(120)"], nproc=2, timeout=2, out=log)
    assert code == 124 and time.monotonic() - start < 15
    assert "timeout after 2 s" in log.getvalue()


def test_command_line_errors():
    done = subprocess.run([sys.executable, "-m", "jaxpipe.launch", "--nproc", "0", "--", "true"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "--nproc must be >= 1, got 0" in done.stderr
    done = subprocess.run([sys.executable, "-m", "jaxpipe.launch", "--nproc", "2"], capture_output=True, text=True)
    assert done.returncode != 0 and "give the command to run after '--'" in done.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_timeout_stops_the_processes_a_wrapper_started(tmp_path):
    """``bash -c "python ...; echo x"``: the Python ranks under the shell ignore SIGTERM and must go too."""
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(tmp_path)!r}, 'pid' + os.environ['JAXPIPE_PROCESS_ID']).write_text(str(os.getpid()))\n"
        "print('waiting', flush=True)\n"
        "time.sleep(120)\n"
    )
    log = io.StringIO()
    start = time.monotonic()
    code = launch(["bash", "-c", f"{sys.executable} {script}; echo x"], nproc=2, timeout=3, out=log)
    elapsed = time.monotonic() - start
    assert code == 124 and "timeout after 3 s" in log.getvalue(), log.getvalue()
    assert elapsed < 3 + 5, elapsed
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    assert not any(_alive(pid) for pid in pids), [pid for pid in pids if _alive(pid)]


def test_sys_exit_on_rank_1_names_rank_1_at_once():
    """Rank 0 waits in a collective; rank 1 calls sys.exit(1) instead of joining it."""
    script = ("import sys, jaxpipe\n"
              "jaxpipe.distributed.initialize()\n"
              "import jax\n"
              "from jax.experimental import multihost_utils\n"
              "if jax.process_index() == 1:\n"
              "    print('giving up', flush=True)\n"
              "    sys.exit(1)\n"
              "multihost_utils.sync_global_devices('never reached by rank 1')\n")
    log = io.StringIO()
    start = time.monotonic()
    code = launch([sys.executable, "-c", script], nproc=2, timeout=90, out=log)
    assert code == 1, log.getvalue()
    assert "[launch] rank 1 exited with code 1 (the first to fail)" in log.getvalue(), log.getvalue()
    assert time.monotonic() - start < 25, log.getvalue()  # well before the 30 s collective timeout


def test_a_missing_program_is_one_line(capsys):
    assert main(["--nproc", "2", "--", "no_such_binary_xyz"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m jaxpipe.launch: error: cannot run 'no_such_binary_xyz': no such program (not a file, and not "
        "found on PATH); check the command after '--'"
    ]
