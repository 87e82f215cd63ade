"""No weight-sized data movement inside the tick loop (checked on XLA's optimized HLO).

A model whose weights (256 x 256 float32, 256 KiB per layer) are far larger
than its messages (2 rows x 256 float32, 2 KiB) is compiled; every
data-movement operation (copy, concatenate, pad, broadcast, slice,
dynamic-slice, dynamic-update-slice, transpose; a fusion counts as its root)
reachable from a ``while`` body must move at most 16 messages' worth of
bytes. On the first, flat-row layout the loop held the stage's weight
slices, the flattened gradient's concatenation and its padding (each 256 KiB
or more), so this test failed there. ``zb_h1`` runs W in a third lane of
per-stage conditionals that add into the accumulators; a W lane that updated
the accumulators inside one multi-branch switch would copy them every tick.

The same compiled loops must send a tick's messages together, after the
forward and backward lanes ran: in the loop body no ``conditional`` (a
lane's stage branch) sits between the first and the last
``collective-permute``, and at least two precede them. When XLA sent the
forward lane's message between the lanes, two devices whose work sat in
different lanes ran them one after the other (``executor._after_both_lanes``);
this check failed on that order.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpipe
from jaxpipe.hlo import loop_bodies, movement_in, opcodes_in_order

WIDTH, ROWS = 256, 2


class Dense(nnx.Module):
    def __init__(self, *, rngs):
        self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


def _model(rngs):
    return [Dense(rngs=rngs) for _ in range(4)]


def _loss(out, y):
    return jnp.mean((out - y) ** 2)


def _compiled_text(mesh, m, **options):
    rows = mesh[0] * m * ROWS
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(rows, WIDTH)).astype(np.float32), rng.normal(size=(rows, WIDTH)).astype(np.float32))
    pipe = jaxpipe.Pipeline(_model, mesh, _loss, optax.sgd(0.1), m, batch, **options)
    state = pipe.init()
    placed = pipe.shard_batch(batch)
    return pipe._loss_and_grad.lower(state.params, *placed).compile().as_text()


@pytest.mark.parametrize("mesh, m, options", [
    ((1, 2), 4, dict(schedule="1f1b")),
    ((1, 2), 4, dict(schedule="balanced")),
    ((1, 2), 4, dict(schedule="interleaved", virtual_stages=2)),
    ((1, 4), 4, dict(schedule="gpipe", remat=True)),
    ((1, 2), 4, dict(schedule="zb_h1")),
])
def test_tick_loop_moves_no_weights(mesh, m, options):
    text = _compiled_text(mesh, m, **options)
    message = ROWS * WIDTH * 4
    weight = WIDTH * WIDTH * 4
    bodies = loop_bodies(text)
    assert bodies, "the tick loop must compile to a while loop"
    moved = [op for body in bodies for op in movement_in(text, body)]
    assert moved, "the HLO reader found no data movement at all (messages must move): reader broken"
    too_big = [op for op in moved if op[2] > 16 * message]
    assert not too_big, f"weight-sized ({weight} B) data movement in the tick loop: {too_big}"

    tick_loops = [body for body in bodies if "collective-permute" in opcodes_in_order(text, body)]
    assert tick_loops, "no loop sends messages: the tick loop was not found"
    for body in tick_loops:
        order = opcodes_in_order(text, body)
        sends = [i for i, op in enumerate(order) if op == "collective-permute"]
        between = order[sends[0]:sends[-1]]
        assert "conditional" not in between, f"a lane runs between the sends of one tick: {order}"
        first_lane = order.index("conditional")
        assert first_lane < sends[0] and order[first_lane + 1:sends[0]].count("conditional") >= 1, (
            f"a message is sent before both lanes ran: {order}")
