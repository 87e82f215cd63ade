"""Per-process data: which rows a process feeds, global arrays from them, joining the job by itself."""

import importlib.util
import io
import os
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from models_for_tests import CASES, batches
from reference import assert_matches_reference, reference_run

import jaxpipe
from jaxpipe import distributed
from jaxpipe.batches import DataShard, shard_of
from jaxpipe.launch import launch

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize("grid,expected", [
    ([[0, 1]], {0: (0, 1), 1: (0, 1)}),                            # one replica over two processes
    ([[0], [1]], {0: (0, 2), 1: (1, 2)}),                          # one replica per process
    ([[0, 0], [1, 1]], {0: (0, 2), 1: (1, 2)}),
    ([[0], [0], [1], [1]], {0: (0, 2), 1: (1, 2)}),                # two replicas per process
    ([[0, 0, 1, 1], [2, 2, 3, 3]], {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}),
])
def test_shard_of_groups_processes_by_their_replicas(grid, expected):
    for process, (index, count) in expected.items():
        assert shard_of(np.array(grid), process) == DataShard(index, count)


@pytest.mark.parametrize("grid,message", [
    ([[0], [1], [0], [1]], r"replicas \[\(0, 2\), \(1, 3\)\].*one contiguous block"),
    ([[0, 0], [0, 1], [1, 1]], r"replicas \[\(0, 1\), \(1, 2\)\]"),
    ([[0], [0], [1]], r"replicas \[\(0, 1\), \(2,\)\].*the same size for all"),
    ([[1]], r"process 0 holds no device of the \(1, 1\) mesh"),
])
def test_shard_of_refuses_layouts_without_one_block_per_process(grid, message):
    with pytest.raises(ValueError, match=message):
        shard_of(np.array(grid), 0)


def test_data_shard_rows():
    assert DataShard(1, 4).rows(16) == slice(4, 8)
    assert jaxpipe.data_shard((2, 2)) == DataShard(0, 1)  # one process: all rows
    with pytest.raises(ValueError, match=r"a global batch of 10 rows does not divide into 4 per-process blocks"):
        DataShard(0, 4).rows(10)


def test_per_process_data_on_one_process_is_the_global_batch():
    case = CASES["mlp"]
    data = batches(case, 8)
    common = dict(loss_fn=case.loss_fn, optimizer=optax.adam(1e-2), steps=3, num_microbatches=2, progress=False)
    want = jaxpipe.train(case.model_fn, (2, 2), data=data, **common)
    got = jaxpipe.train(case.model_fn, (2, 2), data=data, data_per_process=True, eval_data=data[:1], **common)
    assert got.losses == want.losses
    for a, b in zip(jax.tree.leaves(got.pipeline.from_stacks(got.state.params)),
                    jax.tree.leaves(want.pipeline.from_stacks(want.state.params))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"built for batches of 8 rows, got a leaf of shape \[4, 6\]"):
        got.pipeline.shard_batch((data[0][0][:4], data[0][1][:4]), per_process=True)
    with pytest.raises(TypeError, match=r"data_per_process must be True or False, got 1"):
        jaxpipe.train(case.model_fn, (2, 2), data=data, data_per_process=1, **common)


def test_job_size_reads_the_launcher_and_cluster_variables(monkeypatch):
    for name in ("JAXPIPE_COORDINATOR", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.job_size() == 1
    assert distributed.auto_initialize() is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.job_size() == 1  # a one-task allocation is not a job to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.job_size() == 4
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1")
    assert distributed.job_size() == 2
    monkeypatch.setenv("JAXPIPE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("JAXPIPE_NUM_PROCESSES", "3")
    assert distributed.job_size() == 3


def test_joining_after_jax_was_used_is_a_clear_error(monkeypatch):
    """The backend is up in this process, so a job of 4 (SLURM) cannot be joined any more."""
    jax.devices()
    for name in ("JAXPIPE_COORDINATOR", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match=r"a job of 4 processes .* used JAX before joining it.*"
                                           r"jaxpipe.distributed.initialize\(\) at the top of the script"):
        jaxpipe.Pipeline(CASES["mlp"].model_fn, (1, 1), CASES["mlp"].loss_fn, optax.sgd(0.1), 1,
                         batches(CASES["mlp"], 4)[0])


def _example():
    spec = importlib.util.spec_from_file_location("grain_two_process", ROOT / "examples" / "grain_two_process.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grain_loader_feeds_two_processes_their_own_rows(tmp_path, monkeypatch):
    """Two processes, mesh (2, 1), each reading half of every batch with grain, train like one device."""
    example = _example()  # imports grain, which the test extra installs
    out = tmp_path / "result.npz"
    log = io.StringIO()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + sys.path))
    code = launch([sys.executable, str(ROOT / "examples" / "grain_two_process.py"), "--out", str(out)],
                  nproc=2, timeout=240, out=log)
    assert code == 0, log.getvalue()
    assert "[rank 0] process 0 of 2 read rows slice(0, 8, None)" in log.getvalue(), log.getvalue()
    assert "[rank 1] process 1 of 2 read rows slice(8, 16, None)" in log.getvalue(), log.getvalue()
    saved = np.load(out)
    want = example.global_batches(2)
    # Process i's rows are block i of the global batch the mesh holds.
    np.testing.assert_array_equal(saved["arr_1"], want[0][0])
    np.testing.assert_array_equal(saved["arr_2"], want[0][1])
    assert not np.array_equal(want[0][0][:8], want[0][0][8:])
    ref_losses, _, ref_params = reference_run(example.MODEL, want, example.models.lm_loss, example.OPTIMIZER)
    leaves = jax.tree.leaves(ref_params)
    assert_matches_reference(saved["arr_0"], ref_losses, [saved[f"arr_{i + 3}"] for i in range(len(leaves))], leaves)
