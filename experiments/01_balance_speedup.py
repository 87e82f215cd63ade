"""Measured speed-up of the balanced schedule on 2 real processes (mesh (1, 2)).

Each configuration is trained by 2 processes joined by ``jax.distributed``
(``python -m jaxpipe.launch`` semantics: one CPU device per process, each on
its own core, gloo collectives). Both plans use the 1F1B order:

* plain: integer cut (the min-max cut of whole layers);
* balanced: fractional cut (``schedule="balanced"``).

Per configuration and plan: median step time over ``STEPS`` timed steps after
warm-up, in ``REPEATS`` fresh runs; the ratio plain / balanced is taken
within one run. The simulator's lock-step prediction (per-layer costs
from XLA's flop estimate, which also sets the cuts: deterministic, so both
processes and every repeat cut the same way) is printed beside it.

Configurations: (a) 3 equal blocks on 2 devices (ideal 1.33x); (c) 4 equal
blocks on 2 devices, already balanced (the balanced plan must not be slower).
Writes ``experiments/results/balance_speedup.json``.
"""

import io
import json
import pathlib
import statistics
import sys

WIDTH, ROWS, M, STEPS, REPEATS = 2048, 64, 8, 8, 3
RESULTS = pathlib.Path(__file__).parent / "results"


def worker(blocks: int, schedule: str) -> None:
    import jaxpipe

    jaxpipe.distributed.initialize()
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxpipe import models

    rng = np.random.default_rng(0)
    rows = M * ROWS
    batch = (rng.normal(size=(rows, WIDTH)).astype(np.float32), rng.normal(size=(rows, WIDTH)).astype(np.float32))
    model_fn = models.mlp([WIDTH] * (blocks + 1))
    pipe = jaxpipe.Pipeline(model_fn, (1, 2), lambda o, t: jnp.mean((o - t) ** 2), optax.sgd(1e-4), M, batch,
                            schedule=schedule)
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    for _ in range(3):
        state, loss = pipe.train_step(state, placed)
    jax.block_until_ready((state, loss))
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        state, loss = pipe.train_step(state, placed)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - start)
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({
            "step_s": statistics.median(times), "predicted_s": pipe.plan.chosen.step,
            "partition": pipe.partition, "loads": pipe.plan.chosen.loads.tolist(),
        }))


def run(blocks: int, schedule: str) -> dict:
    from jaxpipe.launch import launch

    out = io.StringIO()
    code = launch([sys.executable, __file__, "--worker", str(blocks), schedule], nproc=2, timeout=600, out=out)
    if code:
        raise RuntimeError(out.getvalue())
    line = next(line for line in out.getvalue().splitlines() if "RESULT " in line)
    return json.loads(line.split("RESULT ", 1)[1])


def main() -> None:
    rows = []
    for name, blocks in (("(a) 3 equal blocks on 2 devices", 3), ("(c) 4 equal blocks on 2 devices", 4)):
        ratios = []
        for _ in range(REPEATS):
            plain, balanced = run(blocks, "1f1b"), run(blocks, "balanced")
            ratios.append(plain["step_s"] / balanced["step_s"])
        rows.append({
            "config": name, "plain": plain, "balanced": balanced,
            "measured_speedup_median": statistics.median(ratios), "measured_speedups": ratios,
            "predicted_speedup": plain["predicted_s"] / balanced["predicted_s"],
        })
        r = rows[-1]
        print(f"{name}: plain {plain['partition']} {plain['step_s'] * 1e3:.1f} ms, balanced {balanced['partition']} "
              f"{balanced['step_s'] * 1e3:.1f} ms; measured {r['measured_speedup_median']:.3f}x "
              f"(runs {', '.join(f'{x:.3f}' for x in ratios)}), predicted {r['predicted_speedup']:.3f}x", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"mesh": [1, 2], "processes": 2, "width": WIDTH, "rows_per_microbatch": ROWS, "M": M, "results": rows}
    (RESULTS / "balance_speedup.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
