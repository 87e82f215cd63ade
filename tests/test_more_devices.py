"""More pipe devices than layers: fractional cuts give every device rows of some layer.

Equivalence against the single-device reference (gradients of the first
batch, losses, parameters after 3 SGD momentum steps) uses
``reference.assert_matches_reference``'s float32 tolerances. The losses of
steps 2 and 3 run on the split layers' parameter copies, so a copy that
missed an update shows there.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from flax import nnx
from hypothesis import strategies as st
from models_for_tests import _lm_batch, mse
from reference import assert_trains_like_reference, reference_run

import jaxpipe
from jaxpipe import models
from jaxpipe.partition import Piece, fractional_partition
from jaxpipe.planner import AUTO_ORDERS, make_plan

OPTIMIZER = optax.sgd(0.05, momentum=0.9)


class Mix(nnx.Module):
    """A residual token-wise block ``x + tanh(W x)``: quick to compile on 8 devices."""

    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.linear(x))


def LM7(rngs):
    """7 layers: embedding, 5 blocks, and a head that costs several blocks (vocabulary 32, width 8)."""
    return [models.Embed(32, 6, 8, rngs=rngs)] + [Mix(8, rngs=rngs) for _ in range(5)] + [models.Head(8, 32, rngs=rngs)]


LM7_COSTS = [0.2] + [1.0] * 5 + [4.0]
MLP3 = models.mlp([6, 16, 16, 5])  # 3 layers


def _mlp_batch(rng, rows):
    return rng.normal(size=(rows, 6)).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32)


def _check(model_fn, loss_fn, make_batch, mesh, m, rows_per_mb, grads=True, **options):
    """Gradients of the first batch (if ``grads``) and 3 training steps against the reference."""
    rng = np.random.default_rng(0)
    data = [make_batch(rng, mesh[0] * m * rows_per_mb) for _ in range(3)]
    ref_losses, ref_grads, ref_params = reference_run(model_fn, data, loss_fn, OPTIMIZER)
    pipe = jaxpipe.Pipeline(model_fn, mesh, loss_fn, OPTIMIZER, m, data[0], **options)
    # The gradient check is a second compilation: skipped where the 3 steps suffice.
    assert_trains_like_reference(pipe, data, ref_losses, ref_params, ref_grads if grads else None)
    return pipe


def _holders(pipe, layer):
    return [s for s, stage in enumerate(pipe.stages) if any(p.layer == layer for p in stage)]


def _middle_pieces(pipe):
    """Pieces that start and end inside one layer: rows ``[k0, k1)`` with ``0 < k0 < k1 < B``."""
    rows = pipe.microbatch_rows
    return [p for stage in pipe.stages for p in stage if 0 < p.start and p.stop < rows]


def test_seven_layer_lm_with_a_heavy_head_on_eight_devices():
    pipe = _check(LM7, models.lm_loss, _lm_batch, (1, 8), 8, 8, schedule="balanced", costs=LM7_COSTS)
    assert len(pipe.partition) == 8 and all(0 < n for n in pipe.partition)
    # The head (4 of 9.2 cost units, 1.15 per device) spans the last 4 devices;
    # two of them hold only rows [k0, k1) of it.
    assert _holders(pipe, 6) == [4, 5, 6, 7]
    assert pipe.stages[5] == (Piece(6, 1, 3),) and pipe.stages[6] == (Piece(6, 3, 6),)
    assert pipe.plan.plain is None
    assert "plain 1f1b impossible (7 layers < 8 pipe devices)" in str(pipe.plan)


def test_seven_layer_lm_on_eight_devices_with_estimated_costs():
    """The plan from flop estimates (training on that kind of plan is checked above)."""
    batch = _lm_batch(np.random.default_rng(0), 8 * 8)
    pipe = jaxpipe.Pipeline(LM7, (1, 8), models.lm_loss, OPTIMIZER, 8, batch, schedule="balanced")
    assert len(_holders(pipe, 6)) >= 3  # the head, heavy by flops, spans several devices
    assert _middle_pieces(pipe)


# Balanced on (2, 4) from estimated costs trains in test_balanced.py (the conv net); planning from
# estimates with more devices than layers is checked above.
def test_three_layers_on_two_by_four():
    pipe = _check(MLP3, mse, _mlp_batch, (2, 4), 4, 4, schedule="balanced", costs=[1.0, 6.0, 1.0])
    # Layer 1 (6 of 8 cost units, 2 per device) is on every device: the
    # two middle ones hold only rows of it.
    assert _holders(pipe, 1) == [0, 1, 2, 3]
    assert pipe.stages[1] == (Piece(1, 1, 2),) and pipe.stages[2] == (Piece(1, 2, 3),)
    assert pipe.partition == (1.25, 0.25, 0.25, 1.25)


def test_auto_picks_a_fractional_plan_for_three_layers_on_four_devices():
    pipe = _check(MLP3, mse, _mlp_batch, (1, 4), 4, 4, schedule="auto")
    plan = pipe.plan
    assert pipe.cut == "fractional" and plan.chosen.cut == "fractional"
    assert plan.plain is None
    assert plan.candidates and all(c.cut == "fractional" for c in plan.candidates)
    assert plan.chosen is min((c for c in plan.candidates if c.schedule in AUTO_ORDERS), key=lambda c: c.step_time)
    assert "no integer cut exists (3 layers < 4 pipe devices)" in plan.reason


def test_integer_cuts_still_refuse_fewer_layers_than_devices():
    batch = _mlp_batch(np.random.default_rng(0), 16)
    for schedule in ("gpipe", "1f1b"):
        with pytest.raises(ValueError, match=r"the model has 3 layers .* 4 pipe devices; every pipe device needs "
                                             r"at least one layer, so use pipe <= 3, or cut='fractional'"):
            jaxpipe.Pipeline(MLP3, (1, 4), mse, OPTIMIZER, 4, batch, schedule=schedule)
    with pytest.raises(ValueError, match=r"needs at least 4 layers \(V \* P, one per stage\)"):
        jaxpipe.Pipeline(MLP3, (1, 2), mse, OPTIMIZER, 4, batch, schedule="interleaved", virtual_stages=2,
                         cut="fractional")


@pytest.mark.parametrize("schedule", ["balanced", "auto"])
def test_too_few_rows_per_microbatch_names_the_minimum(schedule):
    # 1 row per micro-batch cannot give 4 devices a piece of 3 layers; 2 can.
    batch = _mlp_batch(np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match=r"micro-batches of B=1 rows are too few .* at least 2 rows"):
        jaxpipe.Pipeline(MLP3, (1, 4), mse, OPTIMIZER, 4, batch, schedule=schedule, costs=[1.0, 1.0, 1.0])


def test_make_plan_with_fewer_layers_than_devices_plans_only_fractional_cuts():
    plan = make_plan([1.0, 2.0], [2.0, 4.0], 3, 6, 6, layer_names=["a", "b"], param_bytes=[4, 4],
                     message_bytes=8, max_memory_per_device=1e9)
    assert plan.plain is None
    assert {c.cut for c in plan.candidates} == {"fractional"}
    assert {c.remat for c in plan.candidates} == {False, True}
    assert [len(stage) > 0 for stage in plan.chosen.stages] == [True] * 3
    text = str(plan)
    assert "plain 1f1b impossible (2 layers < 3 pipe devices)" in text and "device 2:" in text


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=8),
    num_stages=st.integers(1, 16),
    rows=st.integers(1, 40),
)
def test_fractional_partition_gives_every_stage_rows_or_names_the_fewest(costs, num_stages, rows):
    splittable = [True] * len(costs)
    try:
        stages = fractional_partition(costs, num_stages, rows, splittable)
    except ValueError as err:
        # Only too few rows can leave a stage empty, and B >= S always suffices.
        assert rows < num_stages
        fewest = int(re.search(r"at least (\d+) rows", str(err)).group(1))
        assert rows < fewest <= num_stages
        for b in range(rows, fewest):
            with pytest.raises(ValueError, match=rf"at least {fewest} rows"):
                fractional_partition(costs, num_stages, b, splittable)
        stages = fractional_partition(costs, num_stages, fewest, splittable)
        rows = fewest
    assert len(stages) == num_stages and all(stages)
    flat = [p for stage in stages for p in stage]
    for layer in range(len(costs)):  # every row of every layer once, in order
        pieces = [p for p in flat if p.layer == layer]
        assert pieces[0].start == 0 and pieces[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    assert [p.layer for p in flat] == sorted(p.layer for p in flat)


def test_fractional_partition_with_an_unsplittable_layer_still_blames_it():
    with pytest.raises(ValueError, match="unsplittable layers are too heavy"):
        fractional_partition([1.0, 10.0, 1.0], 4, 8, [True, False, True])


@pytest.mark.parametrize("schedule", ["balanced", "auto"])
def test_an_unsplittable_heavy_layer_on_more_devices_than_layers_is_refused(schedule):
    batch = _mlp_batch(np.random.default_rng(0), 32)
    with pytest.raises(ValueError, match=r"unsplittable layers are too heavy to cut around for 4 stages: use "
                                         r"fewer pipe devices$"):
        jaxpipe.Pipeline(MLP3, (1, 4), mse, OPTIMIZER, 4, batch, schedule=schedule, costs=[1.0, 6.0, 1.0],
                         unsplittable=(1,))
