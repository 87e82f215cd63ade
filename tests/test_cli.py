"""``jaxpipe plan``: the function and the command line print a plan without training."""

import subprocess
import sys

import numpy as np

import jaxpipe
from jaxpipe import models
from jaxpipe.cli import main


def test_plan_function_prints_devices_and_prediction():
    inputs = np.zeros((16, 8), np.int32)
    plan = jaxpipe.plan(models.transformer_lm(64, 8, 16, 2, 6), (1, 4), inputs, num_microbatches=4,
                        schedule="balanced")
    text = str(plan)
    assert plan.chosen.label == "balanced"
    for p in range(4):
        assert f"device {p}:" in text
    assert "predicted step" in text and "plain 1f1b" in text


def test_cli_plan_in_process(capsys):
    assert main(["plan", "jaxpipe.models:demo_lm", "--mesh", "1,2", "--microbatches", "2",
                 "--input-shape", "4,128", "--input-dtype", "int32", "--schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 1f1b") and "device 1:" in out


def test_cli_help_and_bad_model_spec():
    done = subprocess.run([sys.executable, "-m", "jaxpipe", "plan", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "MODULE:FUNCTION" in done.stdout
    done = subprocess.run([sys.executable, "-m", "jaxpipe", "plan", "nocolon", "--input-shape", "4,8"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "expected MODULE:FUNCTION" in done.stderr
