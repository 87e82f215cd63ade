"""ZB-H1 against 1F1B and balanced on 2 real processes (mesh (1, 2)), issue 12 item 4.

Same method as experiment 01: each configuration is trained by 2 processes
joined by ``jax.distributed`` (one CPU device each, own core, gloo). In one
run all plans are built in the same two processes, warmed up, then timed
alternately step by step; per plan the median step time over ``STEPS``
steps, ratios against plain 1F1B taken within the run, ``REPEATS`` fresh
runs. Plans:

* ``1f1b``: integer cut, 1F1B (the baseline);
* ``balanced``: fractional cut, 1F1B;
* ``zb_h1``: integer cut, ZB-H1 (backward split into B and W);
* ``zb_h1 balanced``: fractional cut, ZB-H1.

Beside each measured ratio the planner's predicted one (XLA flop costs; the
planner assumes W is half of each stage's backward), and per plan the peak
temporary memory of the compiled loss-and-gradient on each process
(``memory_analysis().temp_size_in_bytes``), as a ratio to 1F1B's (issue
target: at most 1.1x). Configurations: experiment 01's (a), (b), (c), each
with M in {4, 8, 16}. Writes ``experiments/results/zero_bubble.{json,csv}``.

Run on a quiet machine: ``python experiments/08_zero_bubble.py`` (about an hour on 2 cores;
``EXP08_CONFIGS=a EXP08_M=4 EXP08_REPEATS=1`` and ``EXP08_STEPS``/``EXP08_WARMUP`` select a part).
"""

import csv
import io
import json
import os
import pathlib
import statistics
import sys

ROWS = 256
STEPS = int(os.environ.get("EXP08_STEPS", 10))
WARMUP = int(os.environ.get("EXP08_WARMUP", 3))
REPEATS = int(os.environ.get("EXP08_REPEATS", 3))
MICROBATCHES = tuple(int(m) for m in os.environ.get("EXP08_M", "4,8,16").split(","))
RESULTS = pathlib.Path(__file__).parent / "results"
CONFIGS = {key: title for key, title in {
    "a": "(a) 3 equal blocks, 2 devices",
    "b": "(b) LM with a heavy output layer",
    "c": "(c) 4 equal blocks (balanced already)",
}.items() if key in os.environ.get("EXP08_CONFIGS", "abc")}
PLANS = {"1f1b": {"schedule": "1f1b"}, "balanced": {"schedule": "balanced"}, "zb_h1": {"schedule": "zb_h1"},
         "zb_h1 balanced": {"schedule": "zb_h1", "cut": "fractional"}}


def _model(config: str, m: int):
    """``(model_fn, loss_fn, batch)``: experiment 01's configuration with ``m`` micro-batches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("balance_speedup", pathlib.Path(__file__).with_name(
        "01_balance_speedup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._model(config, m)


def worker(config: str, m: int) -> None:
    import jaxpipe

    jaxpipe.distributed.initialize()
    import time

    import jax
    import optax

    model_fn, loss_fn, batch = _model(config, m)
    pipes = {name: jaxpipe.Pipeline(model_fn, (1, 2), loss_fn, optax.sgd(1e-4), m, batch, **options)
             for name, options in PLANS.items()}
    states = {name: pipe.init() for name, pipe in pipes.items()}
    placed = {name: pipe.shard_batch(batch) for name, pipe in pipes.items()}
    memory = {}
    for name, pipe in pipes.items():
        compiled = pipe._loss_and_grad.lower(states[name].params, *placed[name]).compile()
        memory[name] = compiled.memory_analysis().temp_size_in_bytes
    times = {name: [] for name in pipes}
    for step in range(WARMUP + STEPS):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            states[name], loss = pipe.train_step(states[name], placed[name])
            jax.block_until_ready((states[name], loss))
            if step >= WARMUP:
                times[name].append(time.perf_counter() - start)
    print(f"RESULT{jax.process_index()} " + json.dumps({
        name: {"step_s": statistics.median(times[name]), "predicted": pipe.plan.chosen.step_time,
               "temp_bytes": memory[name], "partition": pipe.partition}
        for name, pipe in pipes.items()
    }), flush=True)


def run(config: str, m: int) -> list[dict]:
    """One fresh 2-process run: each process's results."""
    from jaxpipe.launch import launch

    out = io.StringIO()
    code = launch([sys.executable, __file__, "--worker", config, str(m)], nproc=2, timeout=1800, out=out)
    if code:
        raise RuntimeError(out.getvalue())
    found = {}
    for line in out.getvalue().splitlines():
        for rank in (0, 1):
            if f"RESULT{rank} " in line:
                found[rank] = json.loads(line.split(f"RESULT{rank} ", 1)[1])
    return [found[0], found[1]]


def main() -> None:
    rows = []
    for config, title in CONFIGS.items():
        for m in MICROBATCHES:
            runs = [run(config, m) for _ in range(REPEATS)]
            first = runs[0][0]
            for name in PLANS:
                ratios = [r[0]["1f1b"]["step_s"] / r[0][name]["step_s"] for r in runs]
                memory = [r[rank][name]["temp_bytes"] / r[rank]["1f1b"]["temp_bytes"] for r in runs[:1] for rank in (0, 1)]
                predicted = first["1f1b"]["predicted"] / first[name]["predicted"]
                rows.append({
                    "config": title, "M": m, "plan": name, "partition": first[name]["partition"],
                    "step_ms": [1e3 * r[0][name]["step_s"] for r in runs],
                    "speedup_vs_1f1b": statistics.median(ratios), "speedups": ratios,
                    "predicted_speedup": predicted, "temp_bytes": [first[name]["temp_bytes"],
                                                                   runs[0][1][name]["temp_bytes"]],
                    "temp_vs_1f1b": memory,
                })
                print(f"{title} M={m} {name}: {statistics.median(rows[-1]['step_ms']):.1f} ms, "
                      f"{rows[-1]['speedup_vs_1f1b']:.3f}x vs 1f1b (runs {', '.join(f'{x:.3f}' for x in ratios)}), "
                      f"predicted {predicted:.3f}x, temp memory {', '.join(f'{x:.2f}' for x in memory)}x",
                      flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"mesh": [1, 2], "processes": 2, "microbatches": MICROBATCHES, "mlp_rows_per_microbatch": ROWS,
            "steps": STEPS, "warmup": WARMUP, "repeats": REPEATS}
    (RESULTS / "zero_bubble.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    with open(RESULTS / "zero_bubble.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "M", "plan", "partition", "step_ms_median", "speedup_vs_1f1b",
                         "predicted_speedup", "temp_vs_1f1b_rank0", "temp_vs_1f1b_rank1"])
        for r in rows:
            writer.writerow([r["config"], r["M"], r["plan"], r["partition"], round(statistics.median(r["step_ms"]), 2),
                             round(r["speedup_vs_1f1b"], 4), round(r["predicted_speedup"], 4),
                             round(r["temp_vs_1f1b"][0], 3), round(r["temp_vs_1f1b"][1], 3)])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
