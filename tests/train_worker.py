"""Run by test_checkpoint.py as a subprocess: trains with checkpoints and reports each step.

``python train_worker.py DIR CHECKPOINT_EVERY PAUSE_S`` prints one JSON line
per step (``{"step", "loss"}``), sleeping ``PAUSE_S`` after each so the test
can signal it mid-run, then one line with how training ended.
"""

import json
import os
import sys
import time

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402

MODEL = models.mlp([4, 8, 8, 8, 4])
STEPS = 12


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def data(seed: int = 0):
    """An endless seeded generator of 8-row batches: a fresh one replays the same batches."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32)


def run(checkpoint_dir=None, checkpoint_every=None, callbacks=(), steps=STEPS):
    """The run every process of the test repeats: mesh (1, 2), GPipe, adam."""
    return jaxpipe.train(
        MODEL, (1, 2), data=data(), loss_fn=mse, optimizer=optax.adam(1e-2), steps=steps, num_microbatches=2,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, callbacks=callbacks, log_every=1,
        progress=False,
        devices=jax.devices()[:2],
    )


if __name__ == "__main__":
    directory, every, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    def report(metrics):
        print(json.dumps({"step": metrics.step, "loss": metrics.loss}), flush=True)
        time.sleep(pause)

    result = run(directory, every, callbacks=[report])
    print(json.dumps({"stopped": result.stopped, "checkpoint": result.checkpoint.step}), flush=True)
