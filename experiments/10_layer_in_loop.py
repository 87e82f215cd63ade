"""Does a layer run slower inside the executor's loop than jitted alone? (one CPU core)

``jaxpipe.profile`` times each layer's forward and backward jitted alone;
the table executor runs them inside a ``lax.scan`` over ticks, in a branch
of a ``lax.switch``, adding the weight gradient into an accumulator. If
the loop made compute slower, the calibrated planner would need a compute
scale (``jaxpipe.calibrate`` has none). This times one ``Dense(2048 ->
2048)`` + GELU layer's forward and backward on 256 rows, the layer of
experiment 01 (a):

* alone: one jitted call;
* scan: 8 iterations of a ``lax.scan``, each the forward and backward;
* scan + switch: each iteration inside a ``lax.switch`` branch;
* scan + switch + accumulate: also adding the 16 MB weight gradient into a
  carried accumulator (what a backward lane does).

Per iteration, median of ``REPEATS`` calls. Run it pinned to one core
(``taskset -c 0 python experiments/10_layer_in_loop.py``); writes
``experiments/results/layer_in_loop.json``.
"""

import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

WIDTH, ROWS, LOOPS, REPEATS = 2048, 256, 8, 5
RESULTS = pathlib.Path(__file__).parent / "results"


def _layer(w, x):
    return jax.nn.gelu(x @ w)


def _forward_backward(w, x):
    y, vjp = jax.vjp(_layer, w, x)
    return vjp(jnp.ones_like(y))


def _seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _scan(w, x):
    def body(c, _):
        gw, gx = _forward_backward(w, c)
        return gx * 1e-3 + c, jnp.sum(gw)

    return lax.scan(body, x, None, length=LOOPS)


def _scan_switch(w, x):
    def body(c, i):
        def work(c):
            gw, gx = _forward_backward(w, c)
            return gx * 1e-3 + c, jnp.sum(gw)

        return lax.switch(jnp.minimum(i, 1), [lambda c: (c, jnp.float32(0)), work], c)

    return lax.scan(body, x, jnp.ones(LOOPS, jnp.int32))


def _scan_switch_accumulate(w, x):
    def body(carry, i):
        def work(c, acc):
            gw, gx = _forward_backward(w, c)
            return gx * 1e-3 + c, acc + gw

        return lax.switch(jnp.minimum(i, 1), [lambda c, acc: (c, acc), work], *carry), None

    return lax.scan(body, (x, jnp.zeros_like(w)), jnp.ones(LOOPS, jnp.int32))


def main() -> None:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) * 0.02)
    x = jnp.asarray(rng.normal(size=(ROWS, WIDTH)).astype(np.float32))
    alone = _seconds(jax.jit(_forward_backward), w, x)
    rows = {"alone": alone}
    for name, fn in (("scan", _scan), ("scan + switch", _scan_switch),
                     ("scan + switch + accumulate", _scan_switch_accumulate)):
        rows[name] = _seconds(jax.jit(fn), w, x) / LOOPS
    for name, seconds in rows.items():
        print(f"{name:28s} {seconds * 1e3:7.1f} ms  ({seconds / alone:.2f}x alone)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer_in_loop.json").write_text(json.dumps(
        {"width": WIDTH, "rows": ROWS, "loops": LOOPS, "repeats": REPEATS,
         "ms_per_iteration": {k: 1e3 * v for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
