"""Peer baseline: ``torch.distributed.pipelining`` 1F1B against jaxpipe's plain and balanced plans.

The model and sizes are experiment 01's case (a): 3 equal ``Dense(2048 ->
2048)`` blocks (``jaxpipe.models.mlp([2048] * 4)``: tanh-approximated GELU
after all but the last), MSE loss, SGD, a global batch of M = 8
micro-batches x 64 rows, float32, 2 stages on 2 real processes, each with one
thread pinned to its own core, gloo collectives, coordinator on loopback.

* torch: ``PipelineStage`` + ``Schedule1F1B`` (``n_microbatches=8``), with the
  integer cuts ``[1, 2]`` (jaxpipe's plain cut) and ``[2, 1]``;
* jaxpipe: ``schedule="1f1b"`` (plain integer cut) and ``"balanced"``
  (fractional cut), mesh ``(1, 2)``.

Both frameworks run under ``jaxpipe.launch.launch`` (2 processes, core k for
rank k, the same free loopback port scheme); the torch workers pin
themselves and call ``torch.set_num_threads(1)`` before any work. A step is
the whole pipelined forward/backward plus the SGD update. Per run: median
step time of rank 0 over ``STEPS`` timed steps after ``WARMUP`` steps; one
repeat runs all four configurations in a fresh process pair each, and ratios
are taken within a repeat. A single-process micro-benchmark (one pinned
core) times one layer's forward and backward on a micro-batch in each
framework, from which a compute-only estimate of every step is derived.

Writes ``experiments/results/torch_baseline.json`` and ``.csv``. Needs the
``bench`` extra (``pip install -e ".[bench]"``). Run:
``python experiments/06_torch_baseline.py``.
"""

import csv
import io
import json
import os
import pathlib
import statistics
import sys
import time

WIDTH, ROWS, M, BLOCKS = 2048, 64, 8, 3
WARMUP, STEPS, REPEATS, MICRO_REPS = 3, 10, 3, 30
TORCH_CUTS = ((1, 2), (2, 1))
JAX_SCHEDULES = ("1f1b", "balanced")
TIMEOUT_S = 300
RESULTS = pathlib.Path(__file__).parent / "results"


def _batch():
    import numpy as np

    rng = np.random.default_rng(0)
    rows = M * ROWS
    return rng.normal(size=(rows, WIDTH)).astype(np.float32), rng.normal(size=(rows, WIDTH)).astype(np.float32)


def _summary(times: list[float]) -> dict:
    return {"step_s": statistics.median(times), "step_min_s": min(times), "step_times_s": times}


def _pin(env_names: dict) -> None:
    if env_names["core"] in os.environ:
        os.sched_setaffinity(0, {int(os.environ[env_names["core"]])})


def _torch_blocks():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(approximate="tanh")) if i < BLOCKS - 1
        else nn.Linear(WIDTH, WIDTH)
        for i in range(BLOCKS)
    ]


def torch_worker(cut: tuple[int, ...], env_names: dict) -> None:
    """One rank of the torch pipeline; rank 0 prints ``RESULT {json}``."""
    _pin(env_names)
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    rank, world = int(os.environ[env_names["rank"]]), int(os.environ[env_names["nproc"]])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ[env_names['coordinator']]}",
                            rank=rank, world_size=world)
    first = sum(cut[:rank])
    module = nn.Sequential(*_torch_blocks()[first:first + cut[rank]])
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, n_microbatches=M, loss_fn=lambda out, target: torch.mean((out - target) ** 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
    inputs, targets = (torch.from_numpy(a) for a in _batch())
    losses: list = []

    def step() -> None:
        losses.clear()
        if rank == 0:
            schedule.step(inputs, return_outputs=False)
        elif rank == world - 1:
            schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    dist.barrier()
    times, first_loss = [], None
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if losses and first_loss is None:
            first_loss = float(torch.stack(losses).mean())
    dist.barrier()
    mine = {"rank": rank, **_summary(times), "first_loss": first_loss,
            "last_loss": float(torch.stack(losses).mean()) if losses else None}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        last = everyone[-1]
        print("RESULT " + json.dumps({
            **_summary(times), "partition": list(cut), "per_rank_step_s": [r["step_s"] for r in everyone],
            "first_loss": last["first_loss"], "last_loss": last["last_loss"],
        }))
    dist.destroy_process_group()


def jax_worker(schedule: str) -> None:
    """One process of jaxpipe's pipeline; process 0 prints ``RESULT {json}``."""
    import jaxpipe

    jaxpipe.distributed.initialize()
    import jax
    import jax.numpy as jnp
    import optax

    from jaxpipe import models

    batch = _batch()
    pipe = jaxpipe.Pipeline(models.mlp([WIDTH] * (BLOCKS + 1)), (1, 2), lambda o, t: jnp.mean((o - t) ** 2),
                            optax.sgd(1e-4), M, batch, schedule=schedule)
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    start = time.perf_counter()
    for _ in range(WARMUP):
        state, loss = pipe.train_step(state, placed)
    jax.block_until_ready((state, loss))
    warmup_s = time.perf_counter() - start
    times, losses = [], []
    for _ in range(STEPS):
        start = time.perf_counter()
        state, loss = pipe.train_step(state, placed)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({
            **_summary(times), "partition": list(pipe.partition), "warmup_s": warmup_s,
            "predicted_s": pipe.plan.chosen.step, "loads": pipe.plan.chosen.loads.tolist(),
            "first_loss": losses[0], "last_loss": losses[-1],
        }))


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_micro(env_names: dict) -> None:
    """Per-layer forward / backward seconds on one pinned core, hidden (GELU) block, 64 and 32 rows."""
    _pin(env_names)
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    block = _torch_blocks()[0]
    out = {}
    for rows in (ROWS, ROWS // 2):
        x = torch.randn(rows, WIDTH, requires_grad=True)
        cotangent = torch.randn(rows, WIDTH)

        def forward():
            with torch.no_grad():
                block(x)

        def forward_backward():
            block(x).backward(cotangent)

        forward()
        forward_backward()
        f = _median_time(forward, MICRO_REPS)
        fb = _median_time(forward_backward, MICRO_REPS)
        out[str(rows)] = {"forward_s": f, "backward_s": fb - f}
    print("RESULT " + json.dumps(out))


def jax_micro(env_names: dict) -> None:
    """Per-layer forward / backward / recompute+backward seconds on one pinned core (jaxpipe's Dense)."""
    _pin(env_names)
    import jax
    import numpy as np
    from flax import nnx

    from jaxpipe import models

    graphdef, params = nnx.split(models.Dense(WIDTH, WIDTH, activate=True, rngs=nnx.Rngs(0)))

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    forward = jax.jit(apply)
    vjp_only = jax.jit(lambda residual, ct: residual(ct))
    recompute_backward = jax.jit(lambda p, x, ct: jax.vjp(apply, p, x)[1](ct))
    out = {}
    for rows in (ROWS, ROWS // 2):
        rng = np.random.default_rng(0)
        x = jax.numpy.asarray(rng.normal(size=(rows, WIDTH)).astype(np.float32))
        ct = jax.numpy.asarray(rng.normal(size=(rows, WIDTH)).astype(np.float32))
        _, residual = jax.vjp(apply, params, x)
        residual = jax.tree_util.Partial(residual)
        runs = {
            "forward_s": lambda: jax.block_until_ready(forward(params, x)),
            "backward_s": lambda: jax.block_until_ready(vjp_only(residual, ct)),
            "recompute_backward_s": lambda: jax.block_until_ready(recompute_backward(params, x, ct)),
        }
        for fn in runs.values():
            fn()
        out[str(rows)] = {name: _median_time(fn, MICRO_REPS) for name, fn in runs.items()}
    print("RESULT " + json.dumps(out))


def _launch(args: list[str], nproc: int) -> dict:
    from jaxpipe.launch import launch

    out = io.StringIO()
    code = launch([sys.executable, __file__, *args], nproc=nproc, timeout=TIMEOUT_S, out=out)
    if code:
        raise RuntimeError(f"{' '.join(args)} failed with code {code}:\n{out.getvalue()}")
    line = next(line for line in out.getvalue().splitlines() if "RESULT " in line)
    return json.loads(line.split("RESULT ", 1)[1])


def _env_names() -> str:
    from jaxpipe.distributed import (
        COORDINATOR_ENV,
        CORE_ENV,
        NUM_PROCESSES_ENV,
        PROCESS_ID_ENV,
    )

    return json.dumps({"coordinator": COORDINATOR_ENV, "nproc": NUM_PROCESSES_ENV, "rank": PROCESS_ID_ENV,
                       "core": CORE_ENV})


def _estimates(torch_layer: dict, jax_layer: dict) -> dict:
    """Compute-only step estimates (seconds) from the per-layer micro-benchmark.

    Pipelined 1F1B on 2 stages, no communication or framework cost: the
    bottleneck stage works M micro-batches, the other stage adds one
    micro-batch of fill/drain. Torch keeps activations (forward + backward per
    layer); jaxpipe's table executor recomputes a stage's forward inside the
    backward; a balanced device holds 1.5 layers: one full layer and half
    the rows (32) of the split layer.
    """
    t, j, jh = torch_layer[str(ROWS)], jax_layer[str(ROWS)], jax_layer[str(ROWS // 2)]
    torch_fb = t["forward_s"] + t["backward_s"]
    jax_fb = j["forward_s"] + j["recompute_backward_s"]
    jax_half_fb = jh["forward_s"] + jh["recompute_backward_s"]
    return {
        "torch_layer_fwd_bwd_s": torch_fb,
        "jax_layer_fwd_recompute_bwd_s": jax_fb,
        "jax_layer_fwd_bwd_no_recompute_s": j["forward_s"] + j["backward_s"],
        "torch_1f1b_[1,2]_compute_s": (M * 2 + 1) * torch_fb,
        "jaxpipe_1f1b_[1,2]_compute_s": (M * 2 + 1) * jax_fb,
        "jaxpipe_balanced_compute_s": (M + 1) * (jax_fb + jax_half_fb),
        "ideal_single_core_torch_s": M * BLOCKS * torch_fb / 2,
    }


def main() -> None:
    import jax
    import torch

    names = _env_names()
    micro = {"torch": _launch(["--torch-micro", names], 1), "jax": _launch(["--jax-micro", names], 1)}
    for framework, layer in micro.items():
        print(f"micro {framework}: " + ", ".join(
            f"{rows} rows " + " ".join(f"{k[:-2]} {v * 1e3:.2f} ms" for k, v in d.items()) for rows, d in layer.items()
        ), flush=True)
    configs = [(f"torch 1f1b {list(c)}", ["--torch-worker", ",".join(map(str, c)), names]) for c in TORCH_CUTS]
    configs += [(f"jaxpipe {s}", ["--jax-worker", s]) for s in JAX_SCHEDULES]
    repeats = []
    for repeat in range(REPEATS):
        runs = {}
        for name, args in configs:
            runs[name] = _launch(args, 2)
            print(f"repeat {repeat}: {name} {runs[name]['partition']} {runs[name]['step_s'] * 1e3:.1f} ms", flush=True)
        repeats.append(runs)
    medians = {name: statistics.median(r[name]["step_s"] for r in repeats) for name, _ in configs}
    torch_best = min(medians[f"torch 1f1b {list(c)}"] for c in TORCH_CUTS)
    ratio_pairs = [(f"torch 1f1b {list(TORCH_CUTS[0])}", "jaxpipe balanced"),
                   (f"torch 1f1b {list(TORCH_CUTS[1])}", "jaxpipe balanced"),
                   (f"torch 1f1b {list(TORCH_CUTS[0])}", "jaxpipe 1f1b"),
                   ("jaxpipe 1f1b", "jaxpipe balanced")]
    ratios = {f"{a} / {b}": statistics.median(r[a]["step_s"] / r[b]["step_s"] for r in repeats)
              for a, b in ratio_pairs}
    ratios["best torch / jaxpipe balanced"] = statistics.median(
        min(r[f"torch 1f1b {list(c)}"]["step_s"] for c in TORCH_CUTS) / r["jaxpipe balanced"]["step_s"]
        for r in repeats)
    estimates = _estimates(micro["torch"], micro["jax"])
    print("\nconfig                 partition    median step   vs best torch")
    for name, _ in configs:
        print(f"{name:22s} {str(repeats[-1][name]['partition']):12s} {medians[name] * 1e3:8.1f} ms"
              f"   {medians[name] / torch_best:6.3f}x")
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.3f}")
    for key, value in estimates.items():
        print(f"estimate {key}: {value * 1e3:.1f} ms")
    result = {
        "model": f"mlp([{WIDTH}] * {BLOCKS + 1}), tanh-GELU, MSE, SGD(1e-4), float32",
        "processes": 2, "threads_per_process": 1, "rows_per_microbatch": ROWS, "M": M,
        "warmup_steps": WARMUP, "timed_steps": STEPS, "repeats": REPEATS,
        "versions": {"torch": torch.__version__, "jax": jax.__version__, "python": sys.version.split()[0]},
        "median_step_s": medians, "ratios": ratios, "micro_benchmark_s": micro,
        "compute_estimates_s": estimates, "runs": repeats,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "torch_baseline.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(RESULTS / "torch_baseline.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["repeat", "config", "partition", "step_s", "step_min_s", "first_loss", "last_loss"])
        for repeat, runs in enumerate(repeats):
            for name, run in runs.items():
                writer.writerow([repeat, name, " ".join(map(str, run["partition"])), f"{run['step_s']:.6f}",
                                 f"{run['step_min_s']:.6f}", run["first_loss"], run["last_loss"]])
        for name, value in medians.items():
            writer.writerow(["median", name, "", f"{value:.6f}", "", "", ""])


if __name__ == "__main__":
    mode = sys.argv[1:2]
    if mode == ["--torch-worker"]:
        torch_worker(tuple(int(n) for n in sys.argv[2].split(",")), json.loads(sys.argv[3]))
    elif mode == ["--jax-worker"]:
        jax_worker(sys.argv[2])
    elif mode == ["--torch-micro"]:
        torch_micro(json.loads(sys.argv[2]))
    elif mode == ["--jax-micro"]:
        jax_micro(json.loads(sys.argv[2]))
    else:
        main()
