"""jaxpipe quickstart: a small transformer LM on a (data=2, pipe=4) mesh.

Runs on 8 fake CPU devices when no accelerator is present, so it works on any
laptop: ``python examples/quickstart.py``. The task is synthetic (arithmetic
progressions of tokens, made on the fly), so nothing is downloaded.
"""

import os

# 8 fake CPU devices, set before jax is imported (appended to existing flags).
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import time  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402
from jaxpipe.data import progression_batches  # noqa: E402

VOCAB, SEQ_LEN, DIM, HEADS, BLOCKS = 32, 16, 64, 4, 6
MESH = (2, 4)  # (data, pipe)
MICROBATCHES = 4  # per data replica
ROWS = 64  # global batch: 2 replicas x 4 micro-batches x 8 rows
STEPS = 200


def main() -> None:
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; mesh (data, pipe) = {MESH}")
    start = time.perf_counter()
    result = jaxpipe.train(
        models.transformer_lm(VOCAB, SEQ_LEN, DIM, HEADS, BLOCKS),
        mesh_shape=MESH,
        data=progression_batches(ROWS, SEQ_LEN, VOCAB, seed=0),
        loss_fn=models.lm_loss,
        optimizer=optax.adamw(3e-3),
        steps=STEPS,
        num_microbatches=MICROBATCHES,
        schedule="gpipe",
        seed=0,
    )
    elapsed = time.perf_counter() - start
    pipe = result.pipeline
    print(f"layers per pipe device: {pipe.partition} ({len(result.layers)} layers)")
    losses = result.losses
    for step in (0, 24, 49, 99, 149, STEPS - 1):
        print(f"step {step + 1:4d}  loss {losses[step]:.3f}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps, {elapsed:.0f} s")


if __name__ == "__main__":
    main()
