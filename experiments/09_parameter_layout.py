"""What the natural-shape parameter layout costs and saves: overhead, bytes moved per tick, memory.

Three measurements, one run (``python experiments/09_parameter_layout.py``):

1. **Overhead on one device.** ``Pipeline.loss_and_grad`` on mesh (1, 1)
   against a plain ``jax.jit`` of ``value_and_grad`` scanned over the same
   micro-batches (gradients accumulated in their own shapes), for issue 10's
   configuration: 3 residual MLP blocks, width 512, 4x hidden layer, tanh,
   M = 8 micro-batches of 128 rows, float32. One process pinned to one core,
   fastest of ``REPS`` calls each, alternating, ratio within the run.
2. **Bytes a tick moves.** From the optimized HLO of ``loss_and_grad`` on
   mesh (1, 2) (1F1B and balanced): the data-movement operations reachable
   from the tick loop (``jaxpipe.hlo.movement_in``: copies, slices,
   concatenations, pads, broadcasts, dynamic (update) slices, transposes),
   their summed bytes and the largest one, against the largest message.
   Static: the same on any machine with this XLA.
3. **Memory per device.** Parameters, gradients and optimizer state (Adam)
   each pipe device holds in stacks, against what its own layers need
   (split-layer copies count as needed), and XLA's memory analysis of the
   compiled train step (arguments, temporaries), for the test LM on (1, 4)
   and a GPT-2-small-shaped LM (12 blocks, width 768, 12 heads, vocabulary
   50257, 64 tokens) on (1, 4), plain (1F1B) and balanced. The flat layout
   of 29b4f8b held every device's parameters in one row as wide as the
   largest device's (``max need``), so its holding per device is ``max_p
   need_p``.

Writes ``experiments/results/parameter_layout.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"
DIM, HIDDEN, BLOCKS, M, ROWS, REPS = 512, 2048, 3, 8, 128, 15


def _setup(devices: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _batch(rows: int, dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, dim)).astype(np.float32), rng.normal(size=(rows, dim)).astype(np.float32)


def _mse(o, t):
    import jax.numpy as jnp

    return jnp.mean((o - t) ** 2)


def overhead() -> dict:
    """Pipeline (1, 1) ``loss_and_grad`` time over a plain jitted scan, same micro-batches."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax import lax

    import jaxpipe
    from jaxpipe import models

    model_fn = models.residual_mlp(DIM, HIDDEN, BLOCKS)
    batch = _batch(M * ROWS, DIM)
    pipe = jaxpipe.Pipeline(model_fn, (1, 1), _mse, optax.sgd(1e-3), M, batch, schedule="1f1b")
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    params = [nnx.split(layer, nnx.Param, ...)[1] for layer in model_fn(nnx.Rngs(0))]
    parts = [nnx.split(layer, nnx.Param, ...) for layer in model_fn(nnx.Rngs(0))]

    def loss(ps, x, y):
        h = x
        for (graphdef, _, rest), p in zip(parts, ps):
            h = nnx.merge(graphdef, p, rest)(h)
        return _mse(h, y)

    @jax.jit
    def plain(ps, xs, ys):
        def body(carry, xy):
            total, acc = carry
            value, grads = jax.value_and_grad(loss)(ps, *xy)
            return (total + value, jax.tree.map(jnp.add, acc, grads)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, ps))
        (total, acc), _ = lax.scan(body, zero, (xs, ys))
        return total / M, jax.tree.map(lambda g: g / M, acc)

    xs, ys = (a.reshape(M, ROWS, DIM) for a in batch)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)

    def timed(fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    runs = {"pipeline": lambda: pipe.loss_and_grad(state.params, placed), "plain": lambda: plain(params, xs, ys)}
    for fn in runs.values():
        timed(fn)
    times = {name: [] for name in runs}
    for _ in range(REPS):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    best = {name: min(t) for name, t in times.items()}
    pipe_loss, _ = pipe.loss_and_grad(state.params, placed)
    plain_loss, _ = plain(params, xs, ys)
    return {
        "pipeline_s": best["pipeline"], "plain_s": best["plain"], "ratio": best["pipeline"] / best["plain"],
        "losses_agree": bool(abs(float(pipe_loss) - float(plain_loss)) <= 1e-5 * abs(float(plain_loss))),
    }


def tick_bytes() -> list[dict]:
    """Data movement in the tick loop's optimized HLO, mesh (1, 2)."""
    import optax

    import jaxpipe
    from jaxpipe import models
    from jaxpipe.hlo import loop_bodies, movement_in

    out = []
    batch = _batch(M * ROWS, DIM)
    for schedule in ("1f1b", "balanced"):
        pipe = jaxpipe.Pipeline(models.residual_mlp(DIM, HIDDEN, BLOCKS), (1, 2), _mse, optax.sgd(1e-3), M, batch,
                                schedule=schedule)
        state = pipe.init()
        text = pipe._loss_and_grad.lower(state.params, *pipe.shard_batch(batch)).compile().as_text()
        moved = [op for body in loop_bodies(text) for op in movement_in(text, body)]
        message = ROWS * DIM * 4
        out.append({
            "schedule": schedule, "partition": list(pipe.partition), "ops": len(moved),
            "bytes": sum(b for _, _, b in moved), "largest_bytes": max((b for _, _, b in moved), default=0),
            "message_bytes": message, "weight_bytes": DIM * HIDDEN * 4,
            "largest": sorted(moved, key=lambda op: -op[2])[:3],
        })
    return out


def memory() -> list[dict]:
    """Per-device bytes held in stacks vs needed, and XLA's memory analysis of the train step."""
    import numpy as np
    import optax

    import jaxpipe
    from jaxpipe import models

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tests"))
    from models_for_tests import CASES, batches

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=(8, 65)).astype(np.int32)
    test_lm = CASES["lm"]
    configs = {
        "test LM": (test_lm.model_fn, test_lm.loss_fn, batches(test_lm, 8)[0]),
        "GPT-2-small shape": (models.transformer_lm(50257, 64, 768, 12, 12), models.lm_loss,
                              (tokens[:, :-1], tokens[:, 1:])),
    }
    out = []
    for name, (model_fn, loss_fn, batch) in configs.items():
        for schedule in ("1f1b", "balanced"):
            pipe = jaxpipe.Pipeline(model_fn, (1, 4), loss_fn, optax.adam(1e-3), 4, batch, schedule=schedule)
            plan = pipe.placement
            stacks, state_stacks = plan.stacks, pipe._layer_opt.layout
            need = [a + a + b for a, b in zip(stacks.needed_bytes(), state_stacks.needed_bytes())]
            held = 2 * stacks.held_bytes() + state_stacks.held_bytes()
            state = pipe.init()
            analysis = pipe._step.lower(state, *pipe.shard_batch(batch)).compile().memory_analysis()
            out.append({
                "model": name, "schedule": schedule, "partition": list(pipe.partition),
                "need_bytes": need, "held_bytes": held, "held_over_need": [held / n for n in need],
                "flat_layout_held_over_need": [max(need) / n for n in need],
                "xla_argument_bytes": int(analysis.argument_size_in_bytes),
                "xla_temp_bytes": int(analysis.temp_size_in_bytes),
            })
            del state
    return out


def _table(result: dict) -> str:
    lines = ["## Overhead on one device (mesh (1, 1))", "",
             f"pipeline {result['overhead']['pipeline_s'] * 1e3:.1f} ms, plain jitted scan "
             f"{result['overhead']['plain_s'] * 1e3:.1f} ms: **{result['overhead']['ratio']:.3f}x**", "",
             "## Data movement in the tick loop (mesh (1, 2), optimized HLO)", "",
             "| schedule | partition | ops | bytes | largest | largest message | one weight |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in result["tick_bytes"]:
        lines.append(f"| {row['schedule']} | {row['partition']} | {row['ops']} | {row['bytes']:,} | "
                     f"{row['largest_bytes']:,} | {row['message_bytes']:,} | {row['weight_bytes']:,} |")
    lines += ["", "## Memory per device (mesh (1, 4), Adam): parameters + gradients + optimizer state", "",
              "| model | schedule | need per device (MB) | held (MB) | held / need | flat layout: held / need "
              "| XLA arguments (MB) | XLA temporaries (MB) |", "|---|---|---|---:|---|---|---:|---:|"]
    for row in result["memory"]:
        mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
        lines.append(
            f"| {row['model']} | {row['schedule']} | {', '.join(mb(b) for b in row['need_bytes'])} | "
            f"{mb(row['held_bytes'])} | {', '.join(f'{r:.2f}' for r in row['held_over_need'])} | "
            f"{', '.join(f'{r:.2f}' for r in row['flat_layout_held_over_need'])} | "
            f"{mb(row['xla_argument_bytes'])} | {mb(row['xla_temp_bytes'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    part = sys.argv[1] if len(sys.argv) > 1 else None
    if part == "overhead":
        _setup(1)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {0})
        print(json.dumps(overhead()))
        return
    if part == "rest":
        _setup(4)
        print(json.dumps({"tick_bytes": tick_bytes(), "memory": memory()}))
        return
    import subprocess

    def run(which):
        proc = subprocess.run([sys.executable, __file__, which], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = {"overhead": run("overhead"), **run("rest")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parameter_layout.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "parameter_layout.md").write_text(_table(result))
    print(_table(result))


if __name__ == "__main__":
    main()
