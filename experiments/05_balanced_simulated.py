"""Simulated benefit of the balanced schedule, from per-layer costs measured here.

For two configurations where integer cuts leave devices unequally loaded, the
layers are profiled on this machine (``jaxpipe.profile``: median forward and
backward wall time per layer, one micro-batch), and the planner's simulator
predicts one training step of

* plain: integer min-max cuts, 1F1B order;
* balanced: fractional cuts (layers split by rows), 1F1B order;
* the planner's pick among all candidates (``schedule="auto"``).

Predictions use the lock-step model of the table executor (each tick lasts as
long as its slowest action) and, beside it, the event-driven model (each
device starts an action as soon as its inputs are there).

Configurations (P = 4 pipe devices):
  (a) 6 equal transformer blocks on 4 devices: integer cuts put 2 blocks on
      two devices and 1 on the others (max/mean load 1.33).
  (b) a transformer LM whose output layer (32k vocabulary) costs several
      blocks: embedding, 6 blocks, head.

Writes ``experiments/results/balanced_simulated.json`` and prints a table.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402
from jaxpipe.partition import fractional_partition, partition_layers, pieces_from_counts  # noqa: E402
from jaxpipe.planner import make_plan  # noqa: E402
from jaxpipe.prediction import _stage_costs  # noqa: E402
from jaxpipe.schedule import make_schedule  # noqa: E402
from jaxpipe.simulate import Costs, simulate  # noqa: E402

P, M, ROWS, SEQ, DIM, HEADS = 4, 16, 8, 64, 256, 4
RESULTS = pathlib.Path(__file__).parent / "results"


def _blocks(rngs):
    return [models.Block(DIM, HEADS, rngs=rngs) for _ in range(6)]


def _event_driven(stages, forward, backward):
    fwd, bwd = _stage_costs(stages, forward, backward, P, 1, ROWS)
    return simulate(make_schedule("1f1b", P, M), Costs(forward=fwd, backward=bwd)).makespan


def study(name, model_fn, sample):
    prof = jaxpipe.profile(model_fn(nnx.Rngs(0)), sample, ROWS, repeats=7)
    forward, backward = prof.forward(), prof.backward()
    total = forward + backward
    names = [c.name for c in prof.layers]
    plan = make_plan(
        forward, backward, P, M, ROWS, layer_names=names,
        param_bytes=[c.param_bytes for c in prof.layers],
        message_bytes=float(max(c.activation_bytes for c in prof.layers)), unit="s",
    )
    plain = plan.plain
    balanced = next(c for c in plan.candidates if c.label == "balanced")
    plain_stages = pieces_from_counts(partition_layers(total, P), ROWS)
    bal_stages = fractional_partition(total, P, ROWS, [True] * len(total))
    row = {
        "config": name,
        "layers": names,
        "forward_ms": (forward * 1e3).round(3).tolist(),
        "backward_ms": (backward * 1e3).round(3).tolist(),
        "plain_max_over_mean_load": float(plain.loads.max() / plain.loads.mean()),
        "balanced_max_over_mean_load": float(balanced.loads.max() / balanced.loads.mean()),
        "lockstep_plain_s": plain.step_time,
        "lockstep_balanced_s": balanced.step_time,
        "lockstep_speedup": plain.step_time / balanced.step_time,
        "event_plain_s": _event_driven(plain_stages, forward, backward),
        "event_balanced_s": _event_driven(bal_stages, forward, backward),
        "planner_pick": plan.chosen.label,
        "planner_pick_s": plan.chosen.step_time,
        "planner_speedup_over_plain": plain.step_time / plan.chosen.step_time,
    }
    row["event_speedup"] = row["event_plain_s"] / row["event_balanced_s"]
    print(prof)
    print(plan)
    print()
    return row


def main():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(ROWS, SEQ, DIM)).astype(np.float32)
    tokens = rng.integers(0, 32000, size=(ROWS, SEQ)).astype(np.int32)
    rows = [
        study("6 equal blocks on 4 devices", _blocks, hidden),
        study("LM with 32k-vocabulary head", models.transformer_lm(32000, SEQ, DIM, HEADS, 6), tokens),
    ]
    RESULTS.mkdir(exist_ok=True)
    out = {"P": P, "M": M, "rows_per_microbatch": ROWS, "jax": jax.__version__,
           "device": jax.devices()[0].device_kind, "results": rows}
    (RESULTS / "balanced_simulated.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'config':32s} {'max/mean plain':>14s} {'balanced':>9s} {'lock-step x':>12s} {'event x':>8s}  pick")
    for r in rows:
        print(f"{r['config']:32s} {r['plain_max_over_mean_load']:14.3f} {r['balanced_max_over_mean_load']:9.3f} "
              f"{r['lockstep_speedup']:12.3f} {r['event_speedup']:8.3f}  {r['planner_pick']} "
              f"({r['planner_speedup_over_plain']:.2f}x)")


if __name__ == "__main__":
    main()
