"""Does a device skip its layers on idle ticks? Kernel counts and wall time.

Fake CPU devices share the machine's cores, so wall time measures the *sum*
of all devices' work, not the critical path. GPipe on P devices runs
M + P - 1 forward ticks; if idle ticks (fill and drain) ran the layers on
padding, the total work would grow by (M + P - 1) / M. Two measurements:

* Kernel executions: the XLA profiler trace of one loss-and-gradient call
  lists every matmul kernel (``dot``/``ynn_fusion`` events) each device ran.
  Skipping idle ticks means the pipeline runs exactly the kernels of the
  single-device run; computing them would add (M + P - 1) / M as many.
* Wall time of one training step, median of repeats after warm-up. On fake
  devices it also carries the cost of the per-tick rendezvous of 8 device
  threads on 2 cores, which is not work and not idle compute.

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

import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402

WIDTH, LAYERS, M, ROWS_PER_MB, REPEATS = 1024, 8, 8, 128, 7
RESULTS = pathlib.Path(__file__).parent / "results"


def _kernels(pipe, state, placed):
    """Matmul-kernel executions in the profile of one loss-and-gradient call."""
    jax.block_until_ready(pipe.loss_and_grad(state.params, placed))
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(pipe.loss_and_grad(state.params, placed))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz")
    events = json.load(gzip.open(path))["traceEvents"]
    counts = collections.Counter(
        e["name"] for e in events
        if e.get("ph") == "X" and not e["name"].startswith("end:")
        and (e["name"].startswith("dot") or e["name"].startswith("ynn_fusion"))
    )
    return sum(counts.values())


def measure(mesh, m, **options):
    """(median step seconds, matmul kernels per loss-and-gradient call)."""
    rng = np.random.default_rng(0)
    rows = M * ROWS_PER_MB  # the same global batch for every configuration
    batch = (rng.normal(size=(rows, WIDTH)).astype(np.float32), rng.normal(size=(rows, WIDTH)).astype(np.float32))
    pipe = jaxpipe.Pipeline(
        models.mlp([WIDTH] * (LAYERS + 1)), mesh, lambda o, t: jnp.mean((o - t) ** 2),
        optax.sgd(1e-3), m, batch, **options,
    )
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    kernels = _kernels(pipe, state, placed)
    for _ in range(3):
        state, loss = pipe.train_step(state, placed)
    jax.block_until_ready((state, loss))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        state, loss = pipe.train_step(state, placed)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - start)
    return statistics.median(times), kernels


def main():
    runs = {
        "autodiff_1x1": measure((1, 1), M, executor="autodiff"),
        "autodiff_1x8_skip_idle": measure((1, 8), M, executor="autodiff"),
        "autodiff_1x8_compute_idle": measure((1, 8), M, executor="autodiff", _skip_idle=False),
        "table_1x1": measure((1, 1), M),
        "table_gpipe_1x8": measure((1, 8), M, schedule="gpipe"),
        "table_1f1b_1x8": measure((1, 8), M, schedule="1f1b"),
    }
    ref_s, ref_k = runs["autodiff_1x1"]
    # The table executor folds the last stage's forward into its backward: on
    # (1, 1) that is the whole model, on (1, 8) one layer, so (1, 8) runs the
    # forward matmul of the 7 other layers once more per micro-batch.
    table_ref_k = runs["table_1x1"][1] + (LAYERS - 1) * M
    result = {
        "model": f"MLP {LAYERS} x Linear({WIDTH}, {WIDTH}), {M} micro-batches of {ROWS_PER_MB} rows",
        "mesh": "(1, 8): GPipe has 15 forward ticks, 56 of 120 device-ticks idle",
        "runs": {k: {"step_s": s, "matmul_kernels": k_} for k, (s, k_) in runs.items()},
        "autodiff_skip_kernels_over_reference": runs["autodiff_1x8_skip_idle"][1] / ref_k,
        "autodiff_compute_idle_kernels_over_reference": runs["autodiff_1x8_compute_idle"][1] / ref_k,
        "expected_if_idle_computed": (M + 8 - 1) / M,
        "table_gpipe_kernels_over_expected": runs["table_gpipe_1x8"][1] / table_ref_k,
        "table_1f1b_kernels_over_expected": runs["table_1f1b_1x8"][1] / table_ref_k,
        "autodiff_skip_step_over_reference": runs["autodiff_1x8_skip_idle"][0] / ref_s,
        "autodiff_compute_idle_step_over_skip": runs["autodiff_1x8_compute_idle"][0] / runs["autodiff_1x8_skip_idle"][0],
        "jax": jax.__version__,
        "devices": f"{len(jax.devices())} fake {jax.devices()[0].platform}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "idle_skip.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, (seconds, kernels) in runs.items():
        print(f"{name:28s} step {seconds * 1e3:8.1f} ms   matmul kernels {kernels}")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:46s} {value:.3f}")


if __name__ == "__main__":
    main()
