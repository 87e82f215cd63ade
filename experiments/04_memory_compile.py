"""Per-device memory and compile time of one training step, as M grows.

Two claims of the design are checked here from XLA's own figures, without
running a step:

1. Memory. GPipe runs every forward before any backward, so each pipe device
   holds the boundary inputs of all M micro-batches at once: its stash grows
   with M. 1F1B starts a micro-batch's backward as soon as it can, so a device
   never holds more than about P micro-batches: its stash stays flat as M
   grows. GPipe by autodiff (``executor="autodiff"``) stores what JAX's
   differentiation of the forward scan keeps at every tick: every layer's
   residuals without remat, the boundary activations with ``remat=True``.
   The figure is ``temp_size_in_bytes`` of the compiled step's memory
   analysis (XLA's scratch buffers per device: stash, residuals, the scan's
   carries and every intermediate; arguments and outputs are counted apart).
   Beside it: the stash slots the table executor allocates
   (``TickBuffers.num_act_slots``, each also holding a stage's saved
   residuals unless ``remat=True``; gradient inbox ``num_grad_slots``) and
   the planner's memory prediction for the device that needs most
   (parameters, gradients and Adam state as 4x parameters, plus slots).
2. Compile time. Ticks run in ``lax.scan``, so the traced program has the
   same size for every M and lower + compile time must not grow with M:
   M=64 against M=8 should stay within 1.5x (median of 3, a fresh
   ``Pipeline`` each time so no cache is reused).

Model: a transformer LM (``models.transformer_lm``) on mesh (1, 4), 8 fake CPU
devices. Writes ``experiments/results/memory_compile.json`` and
``experiments/results/memory_compile.md`` and prints the Markdown.
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
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402

VOCAB, SEQ_LEN, DIM, HEADS, BLOCKS = 256, 64, 128, 4, 6
MESH = (1, 4)
ROWS_PER_MB = 8
MEMORY_MS = (4, 16, 64)
COMPILE_MS = (8, 64)
COMPILE_REPEATS = 3
COMPILE_RATIO_TARGET = 1.5
CONFIGS = (
    ("gpipe (table)", {"schedule": "gpipe"}),
    ("1f1b (table)", {"schedule": "1f1b"}),
    ("gpipe (table, remat)", {"schedule": "gpipe", "remat": True}),
    ("1f1b (table, remat)", {"schedule": "1f1b", "remat": True}),
    ("gpipe (autodiff)", {"executor": "autodiff"}),
    ("gpipe (autodiff, remat)", {"executor": "autodiff", "remat": True}),
)
RESULTS = pathlib.Path(__file__).parent / "results"
MIB = 2**20


def make_batch(m):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(MESH[0] * m * ROWS_PER_MB, SEQ_LEN + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def build(m, options):
    batch = make_batch(m)
    pipe = jaxpipe.Pipeline(
        models.transformer_lm(VOCAB, SEQ_LEN, DIM, HEADS, BLOCKS), MESH, models.lm_loss,
        optax.adam(1e-3), m, batch, **options,
    )
    return pipe, pipe.init(), pipe.shard_batch(batch)


def lower_and_compile(pipe, state, placed):
    """Returns the compiled step and the seconds spent lowering and compiling."""
    start = time.perf_counter()
    lowered = pipe._step.lower(state, *placed)
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


def carrier_bytes(pipe):
    """Bytes of one packed boundary activation (one stash slot)."""
    c = pipe.placement.carrier
    return c.rows * (c.float_width * np.dtype(c.float_dtype).itemsize + c.int_width * 4)


def memory_row(label, m, options):
    pipe, state, placed = build(m, options)
    stats = lower_and_compile(pipe, state, placed)[0].memory_analysis()
    row = {
        "config": label,
        "M": m,
        "temp_bytes": stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "peak_memory_bytes": getattr(stats, "peak_memory_in_bytes", None),
        "slot_bytes": carrier_bytes(pipe),
        "partition": list(pipe.partition),
    }
    if pipe.executor == "table":
        buffers = pipe.buffers
        row.update(
            ticks=int(pipe.ticks.num_ticks),
            act_slots=buffers.num_act_slots,
            grad_slots=buffers.num_grad_slots,
            plan_memory_bytes=float(max(pipe.plan.chosen.memory)),
            stash_bytes=(buffers.num_act_slots + buffers.num_grad_slots) * row["slot_bytes"],
        )
    else:
        row.update(ticks=m + MESH[1] - 1, act_slots=None, grad_slots=None,
                   plan_memory_bytes=None, stash_bytes=None)
    return row


def compile_times(schedule, m):
    lowers, compiles = [], []
    for _ in range(COMPILE_REPEATS):
        pipe, state, placed = build(m, {"schedule": schedule})
        _, lower_s, compile_s = lower_and_compile(pipe, state, placed)
        lowers.append(lower_s)
        compiles.append(compile_s)
    totals = [a + b for a, b in zip(lowers, compiles)]
    return {
        "schedule": schedule,
        "M": m,
        "lower_s": statistics.median(lowers),
        "compile_s": statistics.median(compiles),
        "total_s": statistics.median(totals),
        "total_runs_s": totals,
    }


def ratio(rows, config, key, m_hi, m_lo):
    value = {r["M"]: r[key] for r in rows if r.get("config", r.get("schedule")) == config}
    return value[m_hi] / value[m_lo]


def mib(size):
    return "-" if size is None else f"{size / MIB:.2f}"


def markdown(result):
    lines = [
        f"Model: {result['model']}. Mesh {tuple(MESH)}, {result['devices']}, jax {result['jax']}.",
        "",
        "Per-device memory of one compiled training step (XLA memory analysis, MiB).",
        (
            "Stash = (activation + gradient slots) x one packed boundary "
            f"({result['memory'][0]['slot_bytes'] / MIB:.2f} MiB per slot)."
        ),
        "",
        (
            "| config | M | ticks | temp | args | output | act slots | grad slots "
            "| stash | temp - stash | planner's prediction (max device) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["memory"]:
        rest = None if r["stash_bytes"] is None else r["temp_bytes"] - r["stash_bytes"]
        lines.append(
            f"| {r['config']} | {r['M']} | {r['ticks']} | {mib(r['temp_bytes'])} "
            f"| {mib(r['argument_bytes'])} | {mib(r['output_bytes'])} "
            f"| {r['act_slots'] if r['act_slots'] is not None else '-'} "
            f"| {r['grad_slots'] if r['grad_slots'] is not None else '-'} "
            f"| {mib(r['stash_bytes'])} | {mib(rest)} | {mib(r['plan_memory_bytes'])} |"
        )
    lo, hi = MEMORY_MS[0], MEMORY_MS[-1]
    slot = result["memory"][0]["slot_bytes"]
    lines += ["", f"Temp memory ratio M={hi} / M={lo}, and growth per extra micro-batch:", ""]
    lines += [
        f"- {k}: {v:.2f}x, {result['temp_per_microbatch_bytes'][k] / MIB:.2f} MiB "
        f"({result['temp_per_microbatch_bytes'][k] / slot:.1f} slots) per micro-batch"
        for k, v in result["temp_ratio"].items()
    ]
    lines += [
        "",
        f"Lower + compile time of the step, fresh Pipeline each time, median of {COMPILE_REPEATS} (s).",
        "",
        "| schedule | M | lower | compile | total | runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["compile"]:
        runs = ", ".join(f"{t:.2f}" for t in r["total_runs_s"])
        lines.append(
            f"| {r['schedule']} | {r['M']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} "
            f"| {r['total_s']:.2f} | {runs} |"
        )
    lo, hi = COMPILE_MS
    lines += ["", f"Compile time ratio M={hi} / M={lo} (target <= {COMPILE_RATIO_TARGET}x):", ""]
    lines += [f"- {k}: {v:.2f}x" for k, v in result["compile_ratio"].items()]
    return "\n".join(lines) + "\n"


def main():
    start = time.perf_counter()
    memory = [memory_row(label, m, options) for label, options in CONFIGS for m in MEMORY_MS]
    compiled = [compile_times(s, m) for s in ("gpipe", "1f1b") for m in COMPILE_MS]
    lo, hi = MEMORY_MS[0], MEMORY_MS[-1]
    by_m = {(r["config"], r["M"]): r["temp_bytes"] for r in memory}
    result = {
        "model": (
            f"transformer_lm(vocab={VOCAB}, seq_len={SEQ_LEN}, dim={DIM}, heads={HEADS}, "
            f"blocks={BLOCKS}): {BLOCKS + 2} layers, B={ROWS_PER_MB} rows per micro-batch, "
            "adam, float32"
        ),
        "mesh": list(MESH),
        "jax": jax.__version__,
        "devices": (
            f"{len(jax.devices())} fake {jax.devices()[0].platform} devices on "
            f"{os.cpu_count()} host cores"
        ),
        "memory": memory,
        "temp_ratio": {label: ratio(memory, label, "temp_bytes", hi, lo) for label, _ in CONFIGS},
        "temp_per_microbatch_bytes": {
            label: (by_m[label, hi] - by_m[label, lo]) / (hi - lo) for label, _ in CONFIGS
        },
        "compile": compiled,
        "compile_ratio": {
            s: ratio(compiled, s, "total_s", COMPILE_MS[1], COMPILE_MS[0]) for s in ("gpipe", "1f1b")
        },
    }
    result["wall_s"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_compile.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (RESULTS / "memory_compile.md").write_text(table)
    print(table)
    print(f"wall time {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
