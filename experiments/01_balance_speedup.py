"""Measured speed-up of the balanced schedule on 2 real processes (mesh (1, 2)).

Each configuration is trained by 2 processes joined by ``jax.distributed``
(``python -m jaxpipe.launch`` semantics: one CPU device per process, each on
its own core, gloo collectives). Both plans use the 1F1B order:

* plain: integer cut (the min-max cut of whole layers, ``schedule="1f1b"``);
* balanced: fractional cut (``schedule="balanced"``).

In one run both pipelines are built in the same two processes, warmed up,
then timed alternately step by step (so machine drift hits both alike);
per plan the median step time over ``STEPS`` steps, the ratio plain /
balanced taken within the run, ``REPEATS`` fresh runs. Beside it the
planner's prediction of the same ratio and of each step in seconds. Both
plans are made as a user would: from a ``jaxpipe.profile`` of the layers
(with the loss; each layer also timed at a quarter, half and three quarters
of the rows, so a split layer's pieces are priced at their rows), measured
in each run (process 0's profile serves both processes), and the machine's
executor overheads per tick, byte and piece, ``jaxpipe.calibrate``, cached
in ``results/calibration_cpu_p2.json`` and shared with experiments 06 and
07. The cuts can therefore differ slightly between runs.

Configurations: (a) 3 equal 2048-wide blocks on 2 devices (ideal 1.33x),
M = 8 micro-batches of ``ROWS = 256`` rows (a micro-batch of fewer rows than
the width makes a split layer's fixed cost, writing and accumulating its
full-size weight gradient on both devices, a large share of its work);
(b) a transformer LM whose output layer (vocab 16384) is heavy; (c) 4 equal
blocks on 2 devices, already balanced (the balanced plan must not be slower).
Writes ``experiments/results/balance_speedup.{json,csv,png}``.
"""

import csv
import io
import json
import pathlib
import statistics
import sys

M, ROWS, STEPS, WARMUP, REPEATS = 8, 256, 10, 3, 3
RESULTS = pathlib.Path(__file__).parent / "results"
CALIBRATION = RESULTS / "calibration_cpu_p2.json"  # shared with experiment 07
CONFIGS = {
    "a": "(a) 3 equal blocks, 2 devices",
    "b": "(b) LM with a heavy output layer",
    "c": "(c) 4 equal blocks (balanced already)",
}


def _model(config: str, m: int = M):
    """``(model_fn, loss_fn, batch)`` of a configuration with ``m`` micro-batches (also read by experiment 08)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxpipe import models

    rng = np.random.default_rng(0)
    if config in ("a", "c"):
        width, rows = 2048, m * ROWS
        batch = tuple(rng.normal(size=(rows, width)).astype(np.float32) for _ in range(2))
        return models.mlp([width] * (4 if config == "a" else 5)), lambda o, t: jnp.mean((o - t) ** 2), batch
    vocab, seq, dim, rows = 16384, 32, 256, m * 16
    tokens = rng.integers(0, vocab, size=(rows, seq + 1)).astype(np.int32)
    return models.transformer_lm(vocab, seq, dim, 4, 2), models.lm_loss, (tokens[:, :-1], tokens[:, 1:])


def worker(config: str) -> None:
    import jaxpipe

    jaxpipe.distributed.initialize()
    import time

    import jax
    import optax

    calibration = jaxpipe.calibrate((1, 2), cache=CALIBRATION)
    model_fn, loss_fn, batch = _model(config)
    rows = len(jax.tree.leaves(batch)[0]) // M
    profile = jaxpipe.profile(model_fn, batch[0], rows, loss_fn=loss_fn, sample_targets=batch[1])
    pipes = {name: jaxpipe.Pipeline(model_fn, (1, 2), loss_fn, optax.sgd(1e-4), M, batch, schedule=schedule,
                                    costs=profile, calibration=calibration)
             for name, schedule in (("plain", "1f1b"), ("balanced", "balanced"))}
    states = {name: pipe.init() for name, pipe in pipes.items()}
    placed = {name: pipe.shard_batch(batch) for name, pipe in pipes.items()}
    times = {name: [] for name in pipes}
    for step in range(WARMUP + STEPS):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            states[name], loss = pipe.train_step(states[name], placed[name])
            jax.block_until_ready((states[name], loss))
            if step >= WARMUP:
                times[name].append(time.perf_counter() - start)
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({
            name: {"step_s": statistics.median(times[name]), "predicted": pipe.plan.chosen.step_time,
                   "partition": pipe.partition, "loads": pipe.plan.chosen.loads.tolist()}
            for name, pipe in pipes.items()
        }))


def run(config: str) -> dict:
    from jaxpipe.launch import launch

    out = io.StringIO()
    code = launch([sys.executable, __file__, "--worker", config], nproc=2, timeout=900, out=out)
    if code:
        raise RuntimeError(out.getvalue())
    line = next(line for line in out.getvalue().splitlines() if "RESULT " in line)
    return json.loads(line.split("RESULT ", 1)[1])


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured_speedup"] for r in rows], 0.4, label="measured (median of runs)",
           yerr=[[r["measured_speedup"] - min(r["measured_speedups"]) for r in rows],
                 [max(r["measured_speedups"]) - r["measured_speedup"] for r in rows]], capsize=3)
    ax.bar([i + 0.2 for i in x], [r["predicted_speedup"] for r in rows], 0.4, label="predicted (planner)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), [r["config"] for r in rows], fontsize=8)
    ax.set_ylabel("step time plain / balanced")
    ax.set_title("Balanced vs plain 1F1B, 2 processes, mesh (1, 2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "balance_speedup.png", dpi=120)


def main() -> None:
    rows = []
    for config, name in CONFIGS.items():
        runs = [run(config) for _ in range(REPEATS)]
        ratios = [r["plain"]["step_s"] / r["balanced"]["step_s"] for r in runs]
        plain, balanced = runs[0]["plain"], runs[0]["balanced"]
        predicted = plain["predicted"] / balanced["predicted"]
        measured = statistics.median(ratios)
        rows.append({
            "config": name, "plain_partition": plain["partition"], "balanced_partition": balanced["partition"],
            "plain_step_ms": [1e3 * r["plain"]["step_s"] for r in runs],
            "balanced_step_ms": [1e3 * r["balanced"]["step_s"] for r in runs],
            "measured_speedups": ratios, "measured_speedup": measured, "predicted_speedup": predicted,
            "prediction_error": predicted / measured - 1.0,
            "plain_predicted_ms": 1e3 * plain["predicted"], "balanced_predicted_ms": 1e3 * balanced["predicted"],
        })
        print(f"{name}: plain {plain['partition']} {statistics.median(rows[-1]['plain_step_ms']):.1f} ms, "
              f"balanced {balanced['partition']} {statistics.median(rows[-1]['balanced_step_ms']):.1f} ms; "
              f"measured {measured:.3f}x (runs {', '.join(f'{x:.3f}' for x in ratios)}), "
              f"predicted {predicted:.3f}x ({100 * rows[-1]['prediction_error']:+.1f}%); step predicted "
              f"plain {rows[-1]['plain_predicted_ms']:.1f} ms "
              f"({rows[-1]['plain_predicted_ms'] / statistics.median(rows[-1]['plain_step_ms']) - 1:+.1%}), balanced "
              f"{rows[-1]['balanced_predicted_ms']:.1f} ms "
              f"({rows[-1]['balanced_predicted_ms'] / statistics.median(rows[-1]['balanced_step_ms']) - 1:+.1%})",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"mesh": [1, 2], "processes": 2, "M": M, "mlp_rows_per_microbatch": ROWS, "steps": STEPS,
            "warmup": WARMUP, "repeats": REPEATS}
    (RESULTS / "balance_speedup.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    with open(RESULTS / "balance_speedup.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "plain_partition", "balanced_partition", "plain_step_ms_median",
                         "balanced_step_ms_median", "measured_speedup", "predicted_speedup", "prediction_error"])
        for r in rows:
            writer.writerow([r["config"], r["plain_partition"], r["balanced_partition"],
                             round(statistics.median(r["plain_step_ms"]), 2),
                             round(statistics.median(r["balanced_step_ms"]), 2), round(r["measured_speedup"], 4),
                             round(r["predicted_speedup"], 4), round(r["prediction_error"], 4)])
    _plot(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
