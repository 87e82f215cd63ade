"""Predicted against measured step time in seconds, on 2 real processes, for models of many shapes.

The planner predicts a step time in seconds from each layer's profiled
forward and backward time (``jaxpipe.profile``, at the micro-batch's rows
and at a quarter, half and three quarters of them for the pieces of split
layers, the last layer with the loss) and the executor's overheads measured once on this machine
(``jaxpipe.calibrate``: a fixed time per tick, a time per byte sent between
the two processes and per byte moved on a device). This experiment checks
that prediction, and what ``schedule="auto"`` chooses with it, on models
the calibration never saw:

* MLPs of widths 512 (4 equal layers: balanced by the integer cut), 1024
  and 2048 (3 layers) at 512, 64 and 256 rows per micro-batch;
* the residual MLP of issue 10 (width 512, hidden 2048, 128 rows);
* transformer LMs (dim 256, 2 blocks, 32 tokens per row) whose output layer
  costs about 1, 4 and 8 blocks (vocabularies 3072, 12288 and 24576), at 32,
  16 and 8 rows (sequences) per micro-batch.

For each model, in one pair of processes (mesh (1, 2), M = 8): the plain plan
(``"1f1b"``, integer cut), ``"balanced"``, and ``"auto"`` (when it chooses
something else) are built with the same profile and calibration, warmed up,
then timed alternately step by step; per plan the median of ``STEPS``
steps. Reported per plan: predicted and measured seconds and their error;
per model: auto's measured speed against plain (``auto`` must never be more
than 3 % slower).

The calibration is cached in ``experiments/results/calibration_cpu_p2.json``
(delete it to measure again); profiles are measured per run. Writes
``experiments/results/planner_calibration.{json,csv}``. ``EXP07_MODELS``
(comma-separated names) runs a subset. Run:
``python experiments/07_planner_calibration.py``.
"""

import csv
import io
import json
import os
import pathlib
import statistics
import sys

M, STEPS, WARMUP = 8, 5, 2
RESULTS = pathlib.Path(__file__).parent / "results"
CALIBRATION = RESULTS / "calibration_cpu_p2.json"
# name -> (kind, size, rows per micro-batch): an MLP's width, a residual MLP's width, an LM's vocabulary.
# mlp512 has 4 layers (its integer cut is balanced already), the other MLPs 3.
MODELS = {
    "mlp512": ("mlp", 512, 512),
    "mlp1024": ("mlp", 1024, 64),
    "mlp2048": ("mlp", 2048, 256),
    "resmlp512": ("resmlp", 512, 128),
    "lm-head1": ("lm", 3072, 32),
    "lm-head4": ("lm", 12288, 16),
    "lm-head8": ("lm", 24576, 8),
}


def _model(name: str):
    """``(model_fn, loss_fn, batch, rows)`` of a model, M micro-batches."""
    import jax.numpy as jnp
    import numpy as np

    from jaxpipe import models

    kind, size, rows = MODELS[name]
    rng = np.random.default_rng(0)
    mse = lambda o, t: jnp.mean((o - t) ** 2)  # noqa: E731
    if kind == "mlp":
        batch = tuple(rng.normal(size=(M * rows, size)).astype(np.float32) for _ in range(2))
        return models.mlp([size] * (5 if size == 512 else 4)), mse, batch, rows
    if kind == "resmlp":
        batch = tuple(rng.normal(size=(M * rows, size)).astype(np.float32) for _ in range(2))
        return models.residual_mlp(size, 4 * size, 3), mse, batch, rows
    seq = 32
    tokens = rng.integers(0, size, size=(M * rows, seq + 1)).astype(np.int32)
    return models.transformer_lm(size, seq, 256, 4, 2), models.lm_loss, (tokens[:, :-1], tokens[:, 1:]), rows


def worker(name: str) -> None:
    import jaxpipe

    jaxpipe.distributed.initialize()
    import time

    import jax
    import optax

    calibration = jaxpipe.calibrate((1, 2), cache=CALIBRATION)
    model_fn, loss_fn, batch, rows = _model(name)
    costs = jaxpipe.profile(model_fn, batch[0], rows, loss_fn=loss_fn, sample_targets=batch[1])
    common = dict(costs=costs, calibration=calibration)
    pipes = {label: jaxpipe.Pipeline(model_fn, (1, 2), loss_fn, optax.sgd(1e-4), M, batch, schedule=schedule, **common)
             for label, schedule in (("plain", "1f1b"), ("balanced", "balanced"), ("auto", "auto"))}
    auto = pipes["auto"].plan.chosen
    same = next((label for label in ("plain", "balanced")
                 if (pipes[label].stages, pipes[label].schedule, pipes[label].virtual_stages)
                 == (auto.stages, auto.schedule, auto.virtual_stages)), None)
    if same is not None:
        del pipes["auto"]
    states = {label: pipe.init() for label, pipe in pipes.items()}
    placed = {label: pipe.shard_batch(batch) for label, pipe in pipes.items()}
    times = {label: [] for label in pipes}
    for step in range(WARMUP + STEPS):
        for label, pipe in pipes.items():
            start = time.perf_counter()
            states[label], loss = pipe.train_step(states[label], placed[label])
            jax.block_until_ready((states[label], loss))
            if step >= WARMUP:
                times[label].append(time.perf_counter() - start)
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({
            "calibration": str(calibration), "auto_is": same or "auto", "auto_label": auto.label,
            "plans": {label: {"measured_s": statistics.median(times[label]), "predicted_s": pipe.plan.chosen.step_time,
                              "label": pipe.plan.chosen.label, "partition": pipe.partition}
                      for label, pipe in pipes.items()},
        }))


def run(name: str) -> dict:
    from jaxpipe.launch import launch

    out = io.StringIO()
    code = launch([sys.executable, __file__, "--worker", name], nproc=2, timeout=1200, out=out)
    if code:
        raise RuntimeError(out.getvalue())
    line = next(line for line in out.getvalue().splitlines() if "RESULT " in line)
    return json.loads(line.split("RESULT ", 1)[1])


def main() -> None:
    names = [n for n in os.environ.get("EXP07_MODELS", ",".join(MODELS)).split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"EXP07_MODELS: unknown {unknown}; choose from {sorted(MODELS)}")
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for name in names:
        result = run(name)
        plans = result["plans"]
        auto = plans[result["auto_is"]]
        for label, plan in plans.items():
            error = plan["predicted_s"] / plan["measured_s"] - 1.0
            rows.append({"model": name, "plan": label, "label": plan["label"], "partition": plan["partition"],
                         "measured_ms": 1e3 * plan["measured_s"], "predicted_ms": 1e3 * plan["predicted_s"],
                         "error": error, "auto_chose": result["auto_label"],
                         "auto_vs_plain": plans["plain"]["measured_s"] / auto["measured_s"]})
            print(f"{name:10s} {label:8s} {plan['label']:22s} measured {rows[-1]['measured_ms']:8.1f} ms  "
                  f"predicted {rows[-1]['predicted_ms']:8.1f} ms  ({100 * error:+.1f}%)", flush=True)
        print(f"{name:10s} auto chose {result['auto_label']} ({result['auto_is']}): "
              f"{rows[-1]['auto_vs_plain']:.3f}x plain", flush=True)
    calibration = json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else None
    meta = {"mesh": [1, 2], "processes": 2, "M": M, "steps": STEPS, "warmup": WARMUP, "calibration": calibration}
    (RESULTS / "planner_calibration.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    with open(RESULTS / "planner_calibration.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "plan", "label", "partition", "measured_ms", "predicted_ms", "error",
                         "auto_vs_plain"])
        for r in rows:
            writer.writerow([r["model"], r["plan"], r["label"], r["partition"], round(r["measured_ms"], 2),
                             round(r["predicted_ms"], 2), round(r["error"], 4), round(r["auto_vs_plain"], 4)])
    errors = [abs(r["error"]) for r in rows]
    print(f"prediction error: max {100 * max(errors):.1f}%, median {100 * statistics.median(errors):.1f}%; "
          f"auto vs plain: min {min(r['auto_vs_plain'] for r in rows):.3f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
