"""Does a device skip its layers on idle ticks? Wall time on 8 fake CPU devices.

Fake CPU devices share the machine's cores, so wall time measures the *sum*
of all devices' work, not the critical path. GPipe on P devices runs
M + P - 1 ticks; if idle ticks (fill and drain) ran the layers on padding, the
total work would grow by (M + P - 1) / M. Skipping them keeps the total at the
single-device reference's work plus the pipeline's bookkeeping.

Measures one training step (median of repeats after warm-up) of:
  * the (1, 1) single-device reference (one micro-batch of all rows),
  * the (1, 1) pipeline with M = 8 micro-batches (same work, M small matmuls),
  * GPipe by autodiff on (1, 8), idle ticks skipped (``lax.cond``),
  * GPipe by autodiff on (1, 8), idle ticks computed on padding,
  * GPipe and 1F1B through the table executor on (1, 8) (idle = empty branch).

Writes ``experiments/results/idle_skip.json``.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402

WIDTH, LAYERS, M, ROWS_PER_MB, REPEATS = 1024, 8, 8, 128, 7
RESULTS = pathlib.Path(__file__).parent / "results"


def step_time(mesh, m, **options):
    rng = np.random.default_rng(0)
    rows = M * ROWS_PER_MB  # the same global batch for every configuration
    batch = (rng.normal(size=(rows, WIDTH)).astype(np.float32), rng.normal(size=(rows, WIDTH)).astype(np.float32))
    pipe = jaxpipe.Pipeline(
        models.mlp([WIDTH] * (LAYERS + 1)), mesh, lambda o, t: jnp.mean((o - t) ** 2),
        optax.sgd(1e-3), m, batch, **options,
    )
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    for _ in range(3):
        state, loss = pipe.train_step(state, placed)
    jax.block_until_ready((state, loss))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        state, loss = pipe.train_step(state, placed)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    # The reference sees the same global batch (M * B rows) as one micro-batch.
    ref = step_time((1, 1), 1, executor="autodiff")
    ref_m = step_time((1, 1), M, executor="autodiff")
    skip = step_time((1, 8), M, executor="autodiff")
    noskip = step_time((1, 8), M, executor="autodiff", _skip_idle=False)
    table_gpipe = step_time((1, 8), M, schedule="gpipe")
    table_1f1b = step_time((1, 8), M, schedule="1f1b")
    result = {
        "model": f"MLP {LAYERS} x Linear({WIDTH}, {WIDTH}), {M * ROWS_PER_MB} rows per step",
        "mesh": "(1, 8), M=8: GPipe has 15 forward ticks, 56 of 120 device-ticks idle",
        "reference_1x1_s": ref,
        "reference_1x1_M8_s": ref_m,
        "autodiff_gpipe_skip_idle_s": skip,
        "autodiff_gpipe_compute_idle_s": noskip,
        "table_gpipe_s": table_gpipe,
        "table_1f1b_s": table_1f1b,
        "autodiff_skip_over_reference_M8": skip / ref_m,
        "autodiff_compute_idle_over_skip": noskip / skip,
        "expected_ratio_if_idle_computed": (M + 8 - 1) / M,
        "table_gpipe_over_reference_M8": table_gpipe / ref_m,
        "jax": jax.__version__,
        "devices": f"{len(jax.devices())} fake {jax.devices()[0].platform}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "idle_skip.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
