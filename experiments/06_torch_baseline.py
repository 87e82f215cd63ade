"""Peer baseline: ``torch.distributed.pipelining`` 1F1B against jaxpipe's plain and balanced plans.

The model and sizes are experiment 01's case (a): 3 equal ``Dense(2048 ->
2048)`` blocks (``jaxpipe.models.mlp([2048] * 4)``: tanh-approximated GELU
after all but the last), MSE loss, SGD, a global batch of M = 8
micro-batches x 256 rows, float32, 2 stages on 2 real processes, each with one
thread pinned to its own core, gloo collectives, coordinator on loopback.

* torch: ``PipelineStage`` + ``Schedule1F1B`` (``n_microbatches=8``), with the
  integer cuts ``[1, 2]`` (jaxpipe's plain cut) and ``[2, 1]``;
* jaxpipe: ``schedule="1f1b"`` (plain integer cut) and ``"balanced"``
  (fractional cut), mesh ``(1, 2)``, planned as a user would: from a
  ``jaxpipe.profile`` of the layers (with the loss, and their pieces at
  fewer rows), measured once per run on one pinned core, and the machine's
  ``jaxpipe.calibrate`` (cached in ``results/calibration_cpu_p2.json``,
  shared with experiments 01 and 07).

The compute floor is measured in the same run: the whole model's training
step as one plain ``jax.jit`` (a scan over the M micro-batches, then SGD)
on one pinned core. The ideal 2-stage step is the floor / 2 x (M + 1) / M
(perfect balance, the 1F1B bubble only); each jaxpipe plan is reported
against it.

Both frameworks run under ``jaxpipe.launch.launch`` (2 processes, core k for
rank k, the same free loopback port scheme); the torch workers pin
themselves and call ``torch.set_num_threads(1)`` before any work. A step is
the whole pipelined forward/backward plus the SGD update. Per run: median
step time of rank 0 over ``STEPS`` timed steps after ``WARMUP`` steps; one
repeat runs every configuration in a fresh process pair each, and ratios
are taken within a repeat (median over repeats). The fastest single step
of each configuration is reported beside it: on a shared, loaded machine
it is the figure least disturbed by other work.

Where the time goes: a single-process micro-benchmark (one pinned core)
times one layer's forward and backward on a micro-batch in each framework
(fastest of ``MICRO_REPS`` calls; compute-only step estimates follow from
it), and one more run per
configuration profiles ``PROFILE_STEPS`` steps on both ranks (torch
profiler; JAX profiler trace) and splits each step into matmul,
communication, data movement (copies, slices, concatenations, zero
fills), other operators and idle time; for jaxpipe the idle time inside
the step's execution (while the host waits for it) is reported apart from
the host's time between steps.

MKL, torch's CPU BLAS, runs its AVX2 kernels on AMD CPUs even where AVX-512
is available, while XLA's matmuls use AVX-512. Where a C compiler is found,
torch ``[1, 2]`` is therefore also run with MKL's vendor check overridden
(``mkl-avx512``: a one-line library preloaded into the torch workers), to
show the comparison with equal matmul kernels.

Writes ``experiments/results/torch_baseline.json`` and ``.csv``. Needs the
``bench`` extra (``pip install -e ".[bench]"``). Run:
``python experiments/06_torch_baseline.py``.

``EXP06_MODEL=resmlp`` runs issue 10's configuration instead: 3 residual
MLP blocks ``x + W2 tanh(W1 x)``, width 512, hidden 2048, M = 8 micro-batches
of 128 rows (``jaxpipe.models.residual_mlp``; the same blocks in torch), and
writes ``torch_baseline_resmlp.{json,csv}``.
"""

import contextlib
import csv
import gzip
import io
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = os.environ.get("EXP06_MODEL", "dense")  # "dense": experiment 01 (a); "resmlp": issue 10's model
if MODEL not in ("dense", "resmlp"):
    raise SystemExit(f"EXP06_MODEL={MODEL!r}: use 'dense' or 'resmlp'")
WIDTH, ROWS, M, BLOCKS = (2048, 256, 8, 3) if MODEL == "dense" else (512, 128, 8, 3)
HIDDEN = 4 * WIDTH  # resmlp only: each block is x + W2 tanh(W1 x)
SUFFIX = "" if MODEL == "dense" else "_resmlp"
WARMUP, STEPS, REPEATS, MICRO_REPS, PROFILE_STEPS = 3, 10, 3, 30, 4
TORCH_CUTS = ((1, 2), (2, 1))
JAX_SCHEDULES = ("1f1b", "balanced")
TIMEOUT_S = 300
RESULTS = pathlib.Path(__file__).parent / "results"
CALIBRATION = RESULTS / "calibration_cpu_p2.json"  # shared with experiments 01 and 07
PROFILE = RESULTS / f"profile_06_{MODEL}.json"  # measured afresh by each run's floor process


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
    if MODEL == "resmlp":
        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WIDTH))

            def forward(self, x):
                return x + self.body(x)

        return [Residual() for _ in range(BLOCKS)]
    return [
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(approximate="tanh")) if i < BLOCKS - 1
        else nn.Linear(WIDTH, WIDTH)
        for i in range(BLOCKS)
    ]


def torch_worker(cut: tuple[int, ...], env_names: dict, profile: bool = False) -> None:
    """One rank of the torch pipeline; rank 0 prints ``RESULT {json}``, every rank ``PROFILE {json}``."""
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
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    with profiler or contextlib.nullcontext():
        for _ in range(PROFILE_STEPS if profile else STEPS):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            if losses and first_loss is None:
                first_loss = float(torch.stack(losses).mean())
    dist.barrier()
    if profile:
        ops = [(e.key, e.self_cpu_time_total * 1e-6) for e in profiler.key_averages()]
        print("PROFILE " + json.dumps({"rank": rank, **_breakdown(ops, sum(times), len(times))}))
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


def jax_worker(schedule: str, profile: bool = False) -> None:
    """One process of jaxpipe's pipeline; process 0 prints ``RESULT {json}``, every process ``PROFILE {json}``."""
    import jaxpipe

    jaxpipe.distributed.initialize()
    import jax
    import jax.numpy as jnp
    import optax

    batch = _batch()
    calibration = jaxpipe.calibrate((1, 2), cache=CALIBRATION)
    pipe = jaxpipe.Pipeline(_model_fn(), (1, 2), lambda o, t: jnp.mean((o - t) ** 2), optax.sgd(1e-4), M, batch,
                            schedule=schedule, costs=jaxpipe.Profile.load(PROFILE), calibration=calibration)
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    start = time.perf_counter()
    for _ in range(WARMUP):
        state, loss = pipe.train_step(state, placed)
    jax.block_until_ready((state, loss))
    warmup_s = time.perf_counter() - start
    times, losses = [], []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True) if profile else contextlib.nullcontext():
            for _ in range(PROFILE_STEPS if profile else STEPS):
                start = time.perf_counter()
                state, loss = pipe.train_step(state, placed)
                jax.block_until_ready((state, loss))
                times.append(time.perf_counter() - start)
                losses.append(float(loss))
        if profile:
            events = _trace_events(next(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz")))
            print("PROFILE " + json.dumps({"rank": jax.process_index(), **_breakdown(_xla_ops(events), sum(times),
                                                                                     len(times)),
                                           "idle_in_step_s": _idle_in_step(events) / len(times)}))
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({
            **_summary(times), "partition": list(pipe.partition), "warmup_s": warmup_s,
            "predicted_s": pipe.plan.chosen.step_time, "loads": pipe.plan.chosen.loads.tolist(),
            "first_loss": losses[0], "last_loss": losses[-1],
        }))


CATEGORIES = ("matmul", "communication", "data_movement", "other")


def _category(name: str) -> str:
    """Category of an operator: a torch ``aten::``/``c10d::`` name or an XLA CPU op/fusion name."""
    if re.match(r"(c10d::|gloo|ppermute|collective-permute|all-reduce|psum|all-gather|reduce-scatter|send|recv)",
                name):
        return "communication"
    if re.match(r"(aten::(mm|addmm|bmm)$|dot|ynn_fusion|.*convolution)", name):
        return "matmul"
    if re.match(r"aten::(copy_|cat|fill_|zero_|zeros|clone|to|_to_copy|contiguous|tensor_split|split|narrow|slice)$",
                name) or re.search(r"(copy|slice|concatenate|broadcast|dynamic-update|pad|transpose|gather|scatter)",
                                   name):
        return "data_movement"
    return "other"


def _breakdown(ops: list[tuple[str, float]], wall_s: float, steps: int) -> dict:
    """Seconds per step by category from ``(op name, self seconds)``; the rest of the wall time is idle.

    jaxpipe's collectives block until the peer's data arrives, so their time
    includes waiting; torch posts sends and receives asynchronously and waits
    outside any operator, so its waiting is in ``idle``.
    """
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, seconds in ops:
        totals[_category(name)] += seconds
    top = sorted(ops, key=lambda op: -op[1])[:12]
    return {"step_s": wall_s / steps, **{f"{k}_s": v / steps for k, v in totals.items()},
            "idle_s": (wall_s - sum(totals.values())) / steps,
            "top_ops": [[name, seconds / steps, _category(name)] for name, seconds in top]}


def _trace_events(trace: pathlib.Path) -> list[dict]:
    """The events of a perfetto trace written by ``jax.profiler.trace``."""
    events = json.loads(gzip.decompress(trace.read_bytes()))
    return events["traceEvents"] if isinstance(events, dict) else events


def _xla_ops(events: list[dict]) -> list[tuple[str, float]]:
    """``(XLA op name, total self seconds)`` of the ops in a perfetto trace of the CPU backend.

    Self time: the op's duration less the ops nested in it on the same
    thread. The executor's own wait-for-completion spans and Python frames
    are dropped (they only wait).
    """
    threads: dict = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("$"):
            threads.setdefault((e["pid"], e["tid"]), []).append(e)
    ops = []
    for spans in threads.values():
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list = []
        for e in spans:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                ops.append(_pop(stack))
            if stack:
                stack[-1][1] -= e["dur"]
            stack.append([e, e["dur"]])
        while stack:
            ops.append(_pop(stack))
    totals: dict = {}
    for name, us in ops:
        if not name.startswith("ThunkExecutor"):
            totals[name] = totals.get(name, 0.0) + us * 1e-6
    return list(totals.items())


def _idle_in_step(events: list[dict]) -> float:
    """Seconds with no XLA operator running while the host waits for a step's executable to finish.

    The rest of ``idle`` lies outside those waits: the host's Python and
    dispatch between steps (and the ops a step runs before the host starts
    waiting, which are counted as ops).
    """
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    waits = [e for e in spans if e["name"] == "ThunkExecutor::Execute (wait for completion)"]
    ops = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                 if not e["name"].startswith(("$", "ThunkExecutor", "ThreadpoolListener")))
    idle = 0.0
    for wait in waits:
        start, stop = wait["ts"], wait["ts"] + wait["dur"]
        covered, reach = 0.0, start
        for begin, end in ops:
            if end <= reach or begin >= stop:
                continue
            covered += min(end, stop) - max(begin, reach)
            reach = min(end, stop)
        idle += (stop - start) - covered
    return idle * 1e-6


def _pop(stack: list) -> tuple[str, float]:
    event, self_us = stack.pop()
    return event["name"], self_us


def _min_time(fn, reps: int) -> float:
    """Fastest of ``reps`` calls: the kernel's own cost, least disturbed by other load on the core."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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
        f = _min_time(forward, MICRO_REPS)
        fb = _min_time(forward_backward, MICRO_REPS)
        out[str(rows)] = {"forward_s": f, "backward_s": fb - f}
    print("RESULT " + json.dumps(out))


def jax_micro(env_names: dict) -> None:
    """Per-layer forward / backward / recompute+backward seconds on one pinned core (jaxpipe's Dense)."""
    _pin(env_names)
    import jax
    import numpy as np
    from flax import nnx

    from jaxpipe import models

    block = (models.Dense(WIDTH, WIDTH, activate=True, rngs=nnx.Rngs(0)) if MODEL == "dense"
             else models.ResidualBlock(WIDTH, HIDDEN, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(block)

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    out = {}
    for rows in (ROWS, ROWS // 2):
        forward = jax.jit(apply)
        vjp_only = jax.jit(lambda residual, ct: residual(ct))
        recompute_backward = jax.jit(lambda p, x, ct: jax.vjp(apply, p, x)[1](ct))
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
        out[str(rows)] = {name: _min_time(fn, MICRO_REPS) for name, fn in runs.items()}
    print("RESULT " + json.dumps(out))


def _model_fn():
    from jaxpipe import models

    return models.mlp([WIDTH] * (BLOCKS + 1)) if MODEL == "dense" else models.residual_mlp(WIDTH, HIDDEN, BLOCKS)


def jax_floor(env_names: dict) -> None:
    """The compute floor on one pinned core: the whole model's training step, plain ``jax.jit``, no pipeline.

    ``value_and_grad`` of the mean MSE over the M micro-batches (a
    ``lax.scan`` that accumulates the gradient) and the SGD update, with the
    parameters donated; median of ``STEPS`` steps after ``WARMUP``. Also
    profiles the model's layers for jaxpipe's plans (``PROFILE``).
    """
    _pin(env_names)
    import jax
    import jax.numpy as jnp
    import jaxpipe
    import numpy as np
    from flax import nnx

    from jaxpipe.layers import apply_layer, split_layers

    mse = lambda o, t: jnp.mean((o - t) ** 2)  # noqa: E731
    inputs, targets = _batch()
    jaxpipe.profile(_model_fn(), inputs, ROWS, loss_fn=mse, sample_targets=targets, cache=PROFILE)
    specs, params, _ = split_layers(_model_fn()(nnx.Rngs(0)))
    x_MxBxF, y_MxBxF = (jnp.asarray(a.reshape(M, ROWS, WIDTH)) for a in (inputs, targets))

    def loss(ps, x, y):
        for spec, p in zip(specs, ps):
            x = apply_layer(spec, p, x)
        return mse(x, y) / M

    def step(ps):
        def one(acc, xy):
            value, grads = jax.value_and_grad(loss)(ps, *xy)
            return (acc[0] + value, jax.tree.map(jnp.add, acc[1], grads)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, ps))
        (value, grads), _ = jax.lax.scan(one, zero, (x_MxBxF, y_MxBxF))
        return jax.tree.map(lambda p, g: p - 1e-4 * g, ps, grads), value

    step = jax.jit(step, donate_argnums=0)
    params = list(params)
    for _ in range(WARMUP):
        params, value = step(params)
    jax.block_until_ready(params)
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        params, value = step(params)
        jax.block_until_ready((params, value))
        times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({**_summary(times), "loss": float(np.asarray(value))}))


def _launch(args: list[str], nproc: int, env: dict | None = None) -> tuple[dict, list[dict]]:
    """Runs this script's worker mode ``args`` as ``nproc`` pinned processes: (RESULT, PROFILE lines by rank).

    ``env`` adds variables for the workers only (the launcher copies this
    process's environment).
    """
    from jaxpipe.launch import launch

    out, saved = io.StringIO(), dict(os.environ)
    os.environ.update(env or {})
    try:
        code = launch([sys.executable, __file__, *args], nproc=nproc, timeout=TIMEOUT_S, out=out)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if code:
        raise RuntimeError(f"{' '.join(args)} failed with code {code}:\n{out.getvalue()}")
    lines = out.getvalue().splitlines()
    result = next(json.loads(line.split("RESULT ", 1)[1]) for line in lines if "RESULT " in line)
    profiles = sorted((json.loads(line.split("PROFILE ", 1)[1]) for line in lines if "PROFILE " in line),
                      key=lambda p: p["rank"])
    return result, profiles


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

    1F1B on 2 stages without communication or framework cost: the bottleneck
    stage works all M micro-batches and the other stage adds one micro-batch
    of fill and drain, so ``(2M + 1)`` layer-micro-batches for the cuts
    ``[1, 2]`` and ``[2, 1]``, and ``(M + 1) x 1.5`` layers balanced (one
    full layer and the split layer's 32 rows). Torch keeps activations;
    jaxpipe is given both with and without recomputing the forward in the
    backward (its table executor recomputes from stashed stage inputs).
    """
    t, j, jh = torch_layer[str(ROWS)], jax_layer[str(ROWS)], jax_layer[str(ROWS // 2)]
    torch_fb = t["forward_s"] + t["backward_s"]
    jax_fb, jax_half_fb = (d["forward_s"] + d["backward_s"] for d in (j, jh))
    jax_frb, jax_half_frb = (d["forward_s"] + d["recompute_backward_s"] for d in (j, jh))
    return {
        "torch layer forward+backward": torch_fb,
        "jax layer forward+backward": jax_fb,
        "jax layer forward+recompute+backward": jax_frb,
        "torch 1f1b [1, 2] compute-only": (2 * M + 1) * torch_fb,
        "jaxpipe 1f1b [1, 2] compute-only, no recompute": (2 * M + 1) * jax_fb,
        "jaxpipe 1f1b [1, 2] compute-only, recompute": (2 * M + 1) * jax_frb,
        "jaxpipe balanced compute-only, no recompute": (M + 1) * (jax_fb + jax_half_fb),
        "jaxpipe balanced compute-only, recompute": (M + 1) * (jax_frb + jax_half_frb),
        "torch perfect balance, no bubble": M * BLOCKS * torch_fb / 2,
    }


def _mkl_avx512_env(folder: pathlib.Path) -> dict | None:
    """Environment that lets MKL take its AVX-512 kernels on a non-Intel CPU, or None without a C compiler.

    MKL picks its code path by CPU vendor: on AMD it runs AVX2 kernels even
    where AVX-512 is available, while XLA's CPU matmuls use AVX-512. The
    well-known (unsupported) override preloads a library whose
    ``mkl_serv_intel_cpu_true`` returns 1; it is compiled here from one line of
    C. On an Intel CPU it changes nothing.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = folder / "mkl_intel_cpu.c", folder / "libmkl_intel_cpu.so"
    source.write_text("int mkl_serv_intel_cpu_true(void) { return 1; }\n")
    built = subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], capture_output=True,
                           timeout=120)
    return {"LD_PRELOAD": str(library)} if built.returncode == 0 else None


def _git_state() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                              text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"torch_baseline{SUFFIX}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(RESULTS / f"torch_baseline{SUFFIX}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["repeat", "config", "partition", "step_s", "step_min_s", "first_loss", "last_loss"])
        for repeat, runs in enumerate(result["runs"]):
            for name, run in runs.items():
                writer.writerow([repeat, name, " ".join(map(str, run["partition"])), f"{run['step_s']:.6f}",
                                 f"{run['step_min_s']:.6f}", run["first_loss"], run["last_loss"]])
        for name, value in result["median_step_s"].items():
            writer.writerow(["median", name, "", f"{value:.6f}", "", "", ""])
        writer.writerow([])
        columns = ["step_s", *(f"{c}_s" for c in CATEGORIES), "idle_s"]
        writer.writerow(["profile", "config", "rank", *columns])
        for name, ranks in result["profile_s"].items():
            for p in ranks:
                writer.writerow(["profile", name, p["rank"], *(f"{p[k]:.6f}" for k in columns)])


def main() -> None:
    import jax
    import torch

    names = _env_names()
    with tempfile.TemporaryDirectory() as tmp:
        mkl_env = _mkl_avx512_env(pathlib.Path(tmp))
        _run_all(names, mkl_env, jax.__version__, torch.__version__)


def _run_all(names: str, mkl_env: dict | None, jax_version: str, torch_version: str) -> None:
    PROFILE.unlink(missing_ok=True)
    floor = _launch(["--jax-floor", names], 1)[0]
    ideal = floor["step_s"] / 2 * (M + 1) / M
    print(f"compute floor (one core, whole model, plain jit): {floor['step_s'] * 1e3:.1f} ms; ideal 2-stage step "
          f"{ideal * 1e3:.1f} ms", flush=True)
    micro = {"torch": _launch(["--torch-micro", names], 1)[0], "jax": _launch(["--jax-micro", names], 1)[0]}
    if mkl_env:
        micro["torch mkl-avx512"] = _launch(["--torch-micro", names], 1, mkl_env)[0]
    for framework, layer in micro.items():
        print(f"micro {framework}: " + ", ".join(
            f"{rows} rows " + " ".join(f"{k[:-2]} {v * 1e3:.2f} ms" for k, v in d.items()) for rows, d in layer.items()
        ), flush=True)
    torch_names = [f"torch 1f1b {list(c)}" for c in TORCH_CUTS]
    configs = [(n, ["--torch-worker", ",".join(map(str, c)), names], None) for n, c in zip(torch_names, TORCH_CUTS)]
    configs += [(f"jaxpipe {s}", ["--jax-worker", s], None) for s in JAX_SCHEDULES]
    if mkl_env:
        configs.append((f"{torch_names[0]} mkl-avx512", configs[0][1], mkl_env))
    repeats = []
    for repeat in range(REPEATS):
        runs = {}
        for name, args, env in configs:
            start = time.perf_counter()
            runs[name] = _launch(args, 2, env)[0]
            print(f"repeat {repeat}: {name} {runs[name]['partition']} {runs[name]['step_s'] * 1e3:.1f} ms "
                  f"(run took {time.perf_counter() - start:.0f} s)", flush=True)
        repeats.append(runs)
    profiles = {name: _launch([*args, "--profile"], 2, env)[1] for name, args, env in configs}
    medians = {name: statistics.median(r[name]["step_s"] for r in repeats) for name, _, _ in configs}
    best = {name: min(r[name]["step_min_s"] for r in repeats) for name, _, _ in configs}
    pairs = [(t, j) for t in torch_names for j in ("jaxpipe balanced", "jaxpipe 1f1b")]
    pairs += [("jaxpipe 1f1b", "jaxpipe balanced")] + [(n, "jaxpipe balanced") for n, _, env in configs if env]
    ratios = {f"{a} / {b}": statistics.median(r[a]["step_s"] / r[b]["step_s"] for r in repeats) for a, b in pairs}
    ratios["best torch / jaxpipe balanced"] = statistics.median(
        min(r[t]["step_s"] for t in torch_names) / r["jaxpipe balanced"]["step_s"] for r in repeats)
    estimates = _estimates(micro["torch"], micro["jax"])
    best_ratios = {f"{a} / {b}": best[a] / best[b] for a, b in pairs}
    best_ratios["best torch / jaxpipe balanced"] = min(best[t] for t in torch_names) / best["jaxpipe balanced"]
    torch_best = min(medians[t] for t in torch_names)
    print("\nconfig                           partition    median step  / best torch   fastest step")
    for name, _, _ in configs:
        print(f"{name:32s} {str(repeats[-1][name]['partition']):12s} {medians[name] * 1e3:8.1f} ms"
              f"   {medians[name] / torch_best:6.3f}   {best[name] * 1e3:8.1f} ms")
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.3f} (fastest steps: {best_ratios[key]:.3f})")
    over_ideal = {name: medians[name] / ideal for name in medians if name.startswith("jaxpipe")}
    for name, value in over_ideal.items():
        print(f"{name} / ideal (floor / 2 x (M + 1) / M): {value:.3f} (fastest step: {best[name] / ideal:.3f})")
    print("\nprofile (ms per step)            rank   step matmul   comm   data  other   idle (in step)")
    for name, ranks in profiles.items():
        for p in ranks:
            print(f"{name:32s} {p['rank']:4d} " + " ".join(
                f"{p[k] * 1e3:6.1f}" for k in ("step_s", *(f"{c}_s" for c in CATEGORIES), "idle_s"))
                + (f" ({p['idle_in_step_s'] * 1e3:.1f})" if "idle_in_step_s" in p else ""))
    for key, value in estimates.items():
        print(f"estimate {key}: {value * 1e3:.1f} ms")
    _write({
        "model": (f"mlp([{WIDTH}] * {BLOCKS + 1}), tanh-GELU" if MODEL == "dense"
                  else f"residual_mlp({WIDTH}, {HIDDEN}, {BLOCKS}), tanh") + ", MSE, SGD(1e-4), float32",
        "processes": 2, "threads_per_process": 1, "rows_per_microbatch": ROWS, "M": M,
        "warmup_steps": WARMUP, "timed_steps": STEPS, "repeats": REPEATS, "profiled_steps": PROFILE_STEPS,
        "versions": {"torch": torch_version, "jax": jax_version, "python": sys.version.split()[0],
                     "jaxpipe_git": _git_state()},
        "mkl_avx512_override": bool(mkl_env),
        "floor_s": floor, "ideal_step_s": ideal, "over_ideal": over_ideal,
        "median_step_s": medians, "ratios": ratios, "fastest_step_s": best, "fastest_step_ratios": best_ratios,
        "micro_benchmark_s": micro,
        "compute_estimates_s": estimates, "profile_s": profiles, "runs": repeats,
    })


if __name__ == "__main__":
    mode = sys.argv[1:2]
    if mode == ["--torch-worker"]:
        torch_worker(tuple(int(n) for n in sys.argv[2].split(",")), json.loads(sys.argv[3]), "--profile" in sys.argv)
    elif mode == ["--jax-worker"]:
        jax_worker(sys.argv[2], "--profile" in sys.argv)
    elif mode == ["--torch-micro"]:
        torch_micro(json.loads(sys.argv[2]))
    elif mode == ["--jax-floor"]:
        jax_floor(json.loads(sys.argv[2]))
    elif mode == ["--jax-micro"]:
        jax_micro(json.loads(sys.argv[2]))
    else:
        main()
