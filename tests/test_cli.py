"""The ``jaxpipe`` command line: ``plan``, ``simulate``, ``train``, their help and their errors.

Commands run in-process through ``jaxpipe.cli.main`` (one compile each);
one test runs the installed console script in a fresh process.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import optax
import pytest
from reference import assert_matches_reference, reference_run

import jaxpipe
from jaxpipe import models
from jaxpipe.cli import main
from jaxpipe.data import progression_batches

HERE = pathlib.Path(__file__).resolve().parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOCAB, SEQ = 11, 6

# Loaded by the commands as f"{__name__}:tiny_lm" (and "test_cli:tiny_lm" from this folder).
tiny_lm = models.transformer_lm(vocab=VOCAB, seq_len=SEQ, dim=8, heads=2, blocks=2)
tiny_mlp = models.mlp([4, 8, 8, 3])
TINY = f"{__name__}:tiny_lm"


def regression_batches(rows, seed):
    """A --data function: endless (inputs [rows, 4], targets [rows, 3]) float batches."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(rows, 4)).astype(np.float32)
        yield x, np.tanh(x[:, :3])


def mse(outputs, targets):
    """A --loss function."""
    return ((outputs - targets) ** 2).mean()


def _error(capsys, argv) -> str:
    """Runs a command that must fail on its input; returns its one-line message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_plan_function_prints_devices_and_prediction():
    inputs = np.zeros((16, SEQ), np.int32)
    plan = jaxpipe.plan(tiny_lm, (1, 4), inputs, num_microbatches=4, schedule="balanced")
    text = str(plan)
    assert plan.chosen.label == "balanced"
    for p in range(4):
        assert f"device {p}:" in text
    assert "predicted step" in text and "plain 1f1b" in text


def test_cli_plan_in_process(capsys):
    assert main(["plan", TINY, "--mesh", "1,2", "--microbatches", "2",
                 "--input-shape", f"4,{SEQ}", "--input-dtype", "int32", "--schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 1f1b") and "device 1:" in out


@pytest.mark.parametrize("command", ["plan", "simulate", "train"])
def test_help_has_description_and_example(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: jaxpipe {command}" in out and "MODULE:FUNCTION" in out and "--mesh" in out
    assert "example" in out and f"\n  jaxpipe {command} jaxpipe.models:demo_lm --mesh" in out


def test_simulate_prints_plan_and_draws_the_chosen_schedule(capsys, tmp_path):
    out_png = tmp_path / "t.png"
    argv = ["simulate", TINY, "--mesh", "1,4", "--microbatches", "4", "--input-shape", f"8,{SEQ}",
            "--input-dtype", "int32", "--schedule", "balanced", "--out", str(out_png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = jaxpipe.plan(tiny_lm, (1, 4), np.zeros((8, SEQ), np.int32), num_microbatches=4, schedule="balanced")
    sim = jaxpipe.simulate(jaxpipe.make_schedule("1f1b", 4, 4, fused=True), plan.chosen.costs)
    assert out.startswith(str(plan) + "\n")
    assert f"simulated step {sim.makespan:.4g} flop, bubble {sim.bubble_fraction:.1%}" in out
    assert out_png.read_bytes().startswith(PNG_MAGIC)


def test_train_matches_reference_and_resumes_from_checkpoint(capsys, tmp_path):
    """Optimizer, lr, clipping, seed, batch size and data reach jaxpipe.train, and a resumed run
    continues the same trajectory: the CLI's per-step losses equal plain single-device training."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    common = [TINY, "--mesh", "2,2", "--microbatches", "2", "--optimizer", "adam", "--lr", "0.01",
              "--clip-norm", "0.5", "--seed", "3", "--checkpoint-dir", str(ckpt), "--keep-checkpoints", "1",
              "--metrics-path", str(metrics), "--log-every", "1", "--quiet"]
    assert main(["train", *common, "--steps", "2", "--checkpoint-every", "1"]) == 0
    first = capsys.readouterr().out
    assert sorted(p.name for p in ckpt.iterdir()) == ["2"]
    assert main(["train", *common, "--steps", "4", "--schedule", "1f1b", "--eval-every", "2"]) == 0
    second = capsys.readouterr().out
    assert first.startswith("trained steps 1-2 ") and second.startswith("trained steps 3-4 ")
    assert f"checkpoint {ckpt / '4'} (step 4)" in second

    rows = 8 * 2 * 2  # default batch: 8 rows per micro-batch x data x M
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.01))
    data = progression_batches(rows, SEQ, VOCAB, seed=3)
    expected, _, _ = reference_run(tiny_lm, [next(data) for _ in range(4)], models.lm_loss, optimizer, seed=3)
    assert_matches_reference([r["loss"] for r in records], expected)
    assert [r["step"] for r in records if "eval_loss" in r] == [4]
    assert np.isfinite(records[-1]["eval_loss"])
    assert f"eval loss {records[-1]['eval_loss']:.4f} at step 4" in second


def test_train_with_own_data_and_loss_matches_reference(capsys, tmp_path):
    metrics = tmp_path / "m.jsonl"
    argv = ["train", f"{__name__}:tiny_mlp", "--data", f"{__name__}:regression_batches", "--loss",
            f"{__name__}:mse", "--mesh", "1,2", "--microbatches", "2", "--batch-size", "12", "--steps", "3",
            "--optimizer", "sgd", "--lr", "0.1", "--seed", "5", "--metrics-path", str(metrics),
            "--log-every", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: gpipe, M=2 micro-batches of B=6 rows, P=2") and "trained steps 1-3 " in out
    data = regression_batches(12, 5)
    expected, _, _ = reference_run(tiny_mlp, [next(data) for _ in range(3)], mse, optax.sgd(0.1), seed=5)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert_matches_reference(losses, expected)


@pytest.mark.parametrize("argv, message", [
    (["train", "nocolon"], "expected MODULE:FUNCTION (e.g. jaxpipe.models:demo_lm), got 'nocolon'"),
    (["train", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["train", "jaxpipe.models:no_such_model"], "module 'jaxpipe.models' has no attribute 'no_such_model'"),
    (["train", "jaxpipe:__version__"], "'jaxpipe:__version__' is a str, not a function"),
    (["train", "jaxpipe.models:mlp"], "jaxpipe.models:mlp must be a model_fn"),
    (["train", f"{__name__}:tiny_mlp"], "needs --vocab and --seq-len"),
    (["train", TINY, "--loss", "jaxpipe.models:nope"], "has no attribute 'nope'"),
    (["train", TINY, "--data", "nocolon"], "expected MODULE:FUNCTION"),
    (["train", TINY, "--mesh", "4,4"], "--mesh 4,4 needs 16 devices but 8 cpu devices are available; "
                                       "pass --host-devices 16 for fake CPU devices"),
    (["plan", TINY, "--input-shape", "4,6", "--mesh", "3,3"], "--mesh 3,3 needs 9 devices"),
    (["train", TINY, "--checkpoint-every", "2"], "checkpoint_every=2 needs checkpoint_dir"),
    (["train", TINY, "--batch-size", "7", "--mesh", "2,1"], "the global batch has 7 rows"),
    (["plan", "nocolon", "--input-shape", "4,8"], "expected MODULE:FUNCTION"),
    (["simulate", TINY, "--input-shape", f"4,{SEQ}", "--input-dtype", "int32", "--mesh", "1,8",
      "--schedule", "1f1b"], "has 8 pipe devices"),
])
def test_bad_input_exits_with_one_line(capsys, argv, message):
    err = _error(capsys, argv)
    assert err.startswith(f"jaxpipe {argv[0]}: error: ") and message in err


@pytest.mark.parametrize("argv, message", [
    (["train", TINY, "--mesh", "3"], "argument --mesh: expected DATA,PIPE as two integers >= 1"),
    (["train", TINY, "--mesh", "2,x"], "argument --mesh: expected comma-separated integers"),
    (["train", TINY, "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["train", TINY, "--schedule", "zigzag"], "argument --schedule: invalid choice: 'zigzag'"),
    (["simulate", TINY], "the following arguments are required: --input-shape"),
])
def test_bad_options_exit_like_argparse(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"jaxpipe {argv[0]}: error: ") and message in last


def test_traceback_flag_shows_the_exception():
    with pytest.raises(ValueError, match="expected MODULE:FUNCTION"):
        main(["train", "nocolon", "--traceback"])


def test_console_script_in_a_fresh_process(tmp_path):
    """The installed ``jaxpipe`` entry point, run from this folder (importable) without XLA_FLAGS:
    --host-devices makes the CPU devices the (1, 4) mesh needs."""
    script = shutil.which("jaxpipe", path=str(pathlib.Path(sys.executable).parent))
    assert script is not None, "the jaxpipe console script is not installed next to this Python"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out_png = tmp_path / "timeline.png"
    done = subprocess.run(
        [script, "simulate", "test_cli:tiny_lm", "--mesh", "1,4", "--host-devices", "4", "--microbatches", "4",
         "--input-shape",
         f"8,{SEQ}", "--input-dtype", "int32", "--schedule", "gpipe", "--out", str(out_png)],
        capture_output=True, text=True, cwd=HERE, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("plan: gpipe") and "device 3:" in done.stdout and "timeline:" in done.stdout
    assert out_png.read_bytes().startswith(PNG_MAGIC)


# One line and exit 2 for every user error (issue 15)


def test_simulate_into_a_missing_folder_is_one_line(capsys, tmp_path):
    out = tmp_path / "missing" / "x.png"
    err = _error(capsys, ["simulate", TINY, "--input-shape", f"4,{SEQ}", "--input-dtype", "int32",
                          "--out", str(out)])
    assert err.startswith("jaxpipe simulate: error: ")
    assert f"--out {out}: the folder {out.parent} does not exist; create it or give another path" in err


def test_a_module_with_a_syntax_error_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_model_i15.py").write_text("def model_fn(rngs:\n    return []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _error(capsys, ["train", "broken_model_i15:model_fn"])
    assert err.startswith("jaxpipe train: error: cannot import 'broken_model_i15' (from "
                          "'broken_model_i15:model_fn'): SyntaxError: ")


@pytest.mark.parametrize("argv, message", [
    (["train", TINY, "--clip-norm", "-1"], "argument --clip-norm: expected a finite number > 0, got '-1'"),
    (["train", TINY, "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["train", TINY, "--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["plan", TINY, "--input-shape", "4,6", "--max-memory-mib", "inf"],
     "argument --max-memory-mib: expected a finite number > 0, got 'inf'"),
])
def test_numeric_flags_are_validated(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"jaxpipe {argv[0]}: error: ") and message in last
