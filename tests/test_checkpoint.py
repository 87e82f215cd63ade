"""Checkpoints: per-layer on disk, resume on any mesh or schedule, atomic, preemption-safe.

Resumed runs are checked against the plain single-device reference with the
float32 tolerances of ``reference.assert_matches_reference``; the steps a
killed run took past its last checkpoint are taken again bit for bit (same
mesh, same program, same data).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import train_worker
from reference import assert_matches_reference, reference_run

import jaxpipe
from jaxpipe.checkpoint import CheckpointSaveError, Checkpoints

HERE = pathlib.Path(__file__).parent
MODEL, LOSS = train_worker.MODEL, train_worker.mse
OPTIMIZER = optax.adam(1e-2)  # a scalar count and parameter-shaped moments
DATA = [batch for batch, _ in zip(train_worker.data(), range(6))]


def _train(mesh, steps, data=DATA, **options):
    return jaxpipe.train(
        MODEL, mesh, data=data, loss_fn=LOSS, optimizer=OPTIMIZER, steps=steps, num_microbatches=2,
        progress=False, **options,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two steps on mesh (2, 2) with GPipe, a checkpoint after each, the newest kept."""
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    result = _train((2, 2), 2, checkpoint_dir=directory, checkpoint_every=1, keep_checkpoints=1)
    return directory, result


def test_checkpoint_holds_per_layer_trees_and_metadata(saved):
    directory, result = saved
    assert Checkpoints(directory).steps() == [2]  # keep_checkpoints=1 deleted step 1
    arrays = ocp.PyTreeCheckpointer().restore(directory / "2" / "arrays")
    meta = json.loads((directory / "2" / "meta" / "metadata").read_text())
    layers = result.pipeline.from_stacks(result.state.params)
    for i, tree in enumerate(layers):
        for j, leaf in enumerate(jax.tree.leaves(tree)):
            np.testing.assert_array_equal(arrays["params"][str(i)][str(j)], np.asarray(leaf))
    adam = result.pipeline.to_layers(result.state)[1][0]
    np.testing.assert_array_equal(arrays["opt_state"]["0"], np.asarray(adam.count))
    for k, moment in ((1, adam.mu), (2, adam.nu)):
        for i, tree in enumerate(moment):
            for j, leaf in enumerate(jax.tree.leaves(tree)):
                np.testing.assert_array_equal(arrays["opt_state"][str(k)][str(i)][str(j)], np.asarray(leaf))
    assert meta["step"] == meta["data_position"] == 2
    assert [layer["shapes"] for layer in meta["layers"]] == [[[8], [4, 8]], [[8], [8, 8]], [[8], [8, 8]], [[4], [8, 4]]]
    assert [leaf["kind"] for leaf in meta["opt_state"]] == ["array", "layers", "layers"]
    assert meta["written_by"]["mesh_shape"] == [2, 2]


def test_resume_on_other_meshes_schedules_and_cuts(saved, tmp_path):
    source, first = saved
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    ref_losses, _, ref_params = reference_run(MODEL, DATA, LOSS, OPTIMIZER)
    # (2, 2) GPipe -> (1, 4) balanced (a layer split by rows: every copy filled), data as a function.
    positions = []
    second = _train((1, 4), 4, data=lambda at: positions.append(at) or DATA[at:], schedule="balanced",
                    checkpoint_dir=directory)
    assert positions == [2] and second.start_step == 2
    pipe = second.pipeline
    plan = pipe.placement
    assert len(plan.copy_layer) > plan.num_layers, "expected a split layer"
    restored, info = Checkpoints(directory).restore(pipe, 2)
    host = [np.asarray(a) for a in restored.params]
    for copy, layer in enumerate(plan.copy_layer):
        for a, b in zip(plan.stacks.from_stacks(host, copy), jax.tree.leaves(first.pipeline.from_stacks(first.state.params)[layer])):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=f"parameter copy {copy} of layer {layer}")
    # (1, 4) fractional -> (1, 1), data as a fresh generator that replays from the start.
    third = _train((1, 1), 6, data=train_worker.data(), checkpoint_dir=directory)
    assert third.start_step == 4
    losses = first.losses + second.losses + third.losses
    assert_matches_reference(losses, ref_losses, third.pipeline.from_stacks(third.state.params), ref_params)
    again = _train((1, 1), 6, checkpoint_dir=directory)
    assert again.losses == [] and again.start_step == 6 and again.checkpoint.step == 6


def test_an_unfinished_save_is_ignored(saved, tmp_path):
    source, first = saved
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    partial = directory / "3.orbax-checkpoint-tmp-1700000000"  # what a crash mid-save leaves
    shutil.copytree(directory / "2", partial)
    shutil.rmtree(partial / "arrays")
    store = Checkpoints(directory)
    assert store.latest() == 2
    state, info = store.restore(first.pipeline)
    assert info.step == 2 and int(state.step) == 2
    for a, b in zip(state.params, first.state.params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_another_model_or_optimizer_is_refused(saved, tmp_path):
    source, _ = saved
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    with pytest.raises(ValueError, match=r"holds a model of 4 layers, but model_fn builds 3"):
        jaxpipe.train(jaxpipe.models.mlp([4, 8, 8, 4]), data=DATA, loss_fn=LOSS, optimizer=OPTIMIZER, steps=4,
                      checkpoint_dir=directory, progress=False)
    with pytest.raises(ValueError, match=r"holds layer 1 as Dense with parameter shapes \[\[8\], \[8, 8\]\], "
                                         r"but model_fn builds Dense with \[\[9\], \[8, 9\]\]"):
        jaxpipe.train(jaxpipe.models.mlp([4, 8, 9, 8, 4]), data=DATA, loss_fn=LOSS, optimizer=OPTIMIZER, steps=4,
                      checkpoint_dir=directory, progress=False)
    with pytest.raises(ValueError, match=r"holds optimizer state .* but this optimizer's state is"):
        jaxpipe.train(MODEL, data=DATA, loss_fn=LOSS, optimizer=optax.sgd(0.1), steps=4,
                      checkpoint_dir=directory, progress=False)


def test_data_that_cannot_replay_the_used_batches_is_an_error(saved, tmp_path):
    source, _ = saved
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    with pytest.raises(ValueError, match=r"data ran out after 1 batches while skipping the 2 batches"):
        _train((1, 1), 4, data=iter(DATA[:1]), checkpoint_dir=directory)


@pytest.fixture(scope="module")
def reference():
    """The worker's run as plain single-device training: its losses."""
    batches = [batch for batch, _ in zip(train_worker.data(), range(train_worker.STEPS))]
    return reference_run(MODEL, batches, LOSS, OPTIMIZER)[0]


def _start_worker(directory, every, pause=0.15):
    return subprocess.Popen(
        [sys.executable, str(HERE / "train_worker.py"), str(directory), str(every), str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )


def _read_until_step(worker, step):
    seen = []
    for line in worker.stdout:
        seen.append(json.loads(line))
        if seen[-1].get("step") == step:
            return seen
    raise AssertionError(f"the worker ended before step {step}: {worker.stderr.read()}")


def test_sigterm_saves_at_the_step_reached_and_resume_matches(tmp_path, reference):
    directory = tmp_path / "ckpt"
    worker = _start_worker(directory, 100)
    seen = _read_until_step(worker, 3)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    seen += [json.loads(line) for line in out.splitlines()]
    end, reached = seen[-1], seen[-2]["step"]
    assert end == {"stopped": "sigterm", "checkpoint": reached} and 3 <= reached < train_worker.STEPS
    assert Checkpoints(directory).steps() == [reached]
    resumed = train_worker.run(directory)
    assert resumed.start_step == reached and len(resumed.losses) == train_worker.STEPS - reached
    losses = [s["loss"] for s in seen[:-1]] + resumed.losses
    assert_matches_reference(losses, reference)


def test_sigkill_between_checkpoints_resumes_from_the_last_one(tmp_path, reference):
    directory = tmp_path / "ckpt"
    worker = _start_worker(directory, 3)
    killed = [s["loss"] for s in _read_until_step(worker, 7)]
    worker.kill()
    worker.communicate(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    last = Checkpoints(directory).latest()
    assert last in (6, 9)  # 9 only if the kill landed after the step-9 save
    resumed = train_worker.run(directory, 3)
    assert resumed.start_step == last and len(resumed.losses) == train_worker.STEPS - last
    # The steps the killed run took after its last checkpoint are taken again, bit for bit.
    np.testing.assert_array_equal(resumed.losses[: len(killed) - last], killed[last:])
    assert_matches_reference(killed[:last] + resumed.losses, reference)
    logged = [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, train_worker.STEPS + 1))  # the killed run's later lines dropped


def test_checkpoint_of_the_flat_layout_resumes(tmp_path):
    """A checkpoint the first, flat-row layout wrote still resumes exactly.

    ``tests/data/checkpoint_flat_layout`` was written by jaxpipe 29b4f8b
    (parameters packed ``[P, N]``): mesh (2, 2), GPipe, Adam, this module's
    model and data, 2 steps. Resuming on (1, 2) with 1F1B for 2 more steps
    must give the reference's steps 3 and 4 and its parameters.
    """
    directory = tmp_path / "ckpt"
    shutil.copytree(HERE / "data" / "checkpoint_flat_layout", directory)
    ref_losses, _, ref_params = reference_run(MODEL, DATA[:4], LOSS, OPTIMIZER)
    result = _train((1, 2), 4, schedule="1f1b", checkpoint_dir=directory)
    assert result.start_step == 2
    assert_matches_reference(result.losses, ref_losses[2:], result.pipeline.from_stacks(result.state.params), ref_params)


# Failing early and failing safely (issue 15)


def _make_read_only(path: pathlib.Path):
    """Makes ``path`` read-only (``chattr +i`` for root, who ignores permission bits); returns the undo."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("root without chattr +i here: no way to make a read-only folder")
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        undo = lambda: path.chmod(mode)  # noqa: E731
    try:
        (path / ".probe").touch()
    except OSError:
        return undo
    undo()
    pytest.skip("this file system ignores the read-only setting")


def test_a_read_only_checkpoint_dir_fails_before_the_first_step(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    undo = _make_read_only(directory)
    steps = []
    try:
        with pytest.raises(ValueError, match=rf"checkpoint_dir='{directory}' is not writable \(.*\); give a folder"):
            _train((1, 1), 3, checkpoint_dir=directory, metrics_path=tmp_path / "metrics.jsonl",
                   callbacks=[steps.append])
    finally:
        undo()
    assert steps == []


def test_a_failed_save_keeps_the_last_good_checkpoint_and_says_where(tmp_path, reference):
    directory = tmp_path / "ckpt"
    undo = []

    def lock_after_step_1(metrics):
        if metrics.step == 2:  # after step 1's checkpoint, before step 2's
            undo.append(_make_read_only(directory))

    try:
        with pytest.raises(CheckpointSaveError, match=re.escape(
            f"saving the checkpoint of step 2 in {directory} failed"
        ) + r" \(.*\); " + re.escape(f"the last good checkpoint is {directory / '1'} (step 1), untouched")) as info:
            _train((1, 2), 3, data=train_worker.data(), checkpoint_dir=directory, checkpoint_every=1,
                   metrics_path=tmp_path / "metrics.jsonl", callbacks=[lock_after_step_1])
    finally:
        for fn in undo:
            fn()
    assert info.value.step == 2 and info.value.last_good.step == 1
    resumed = _train((1, 1), 3, data=train_worker.data(), checkpoint_dir=directory)
    assert resumed.start_step == 1
    assert_matches_reference(resumed.losses, reference[1:3])


@pytest.mark.parametrize("content", ["", '{"format": 1, "step": 2, "data_po', "{}"], ids=["empty", "partial", "no keys"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, content):
    directory = tmp_path / "ckpt"
    _train((1, 1), 2, data=train_worker.data(), checkpoint_dir=directory, checkpoint_every=1)
    meta = directory / "2" / "meta" / "metadata"
    meta.write_text(content)
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {directory / '2'} has ") + r"(unreadable|incomplete) "
                      + re.escape(f"metadata {meta}")):
        resumed = _train((1, 2), 3, data=train_worker.data(), checkpoint_dir=directory, checkpoint_every=1)
    assert resumed.start_step == 1
    assert_matches_reference(resumed.losses, reference[1:3])
    assert Checkpoints(directory).steps() == [1, 2, 3]  # step 2 saved anew; the unreadable one moved aside
    assert (directory / "unreadable-2" / "meta" / "metadata").read_text() == content


def test_no_readable_checkpoint_is_an_error_naming_them(tmp_path):
    directory = tmp_path / "ckpt"
    _train((1, 1), 1, data=train_worker.data(), checkpoint_dir=directory)
    (directory / "1" / "meta" / "metadata").write_text("")
    with pytest.warns(UserWarning, match="unreadable metadata"), pytest.raises(
        ValueError, match=re.escape(f"no checkpoint in {directory} can be read (steps [1]")
    ):
        _train((1, 1), 2, data=train_worker.data(), checkpoint_dir=directory)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {directory / '1'} has unreadable metadata")):
        Checkpoints(directory).info(1)
