"""The balanced schedule: fractional cuts, split layers, and the planner's choice.

Equivalence against the single-device reference (losses, parameters after 3
SGD momentum steps) uses ``reference.assert_matches_reference``'s float32
tolerances. Split-layer copies must stay bitwise identical.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models_for_tests import CASES, mse
from reference import assert_matches_reference, reference_run

import jaxpipe
from jaxpipe import models
from jaxpipe.partition import Piece, fractional_partition, stage_loads
from jaxpipe.planner import AUTO_ORDERS, FRACTIONAL_MARGIN, departure_margin, make_plan

OPTIMIZER = optax.sgd(0.05, momentum=0.9)
SIX = models.mlp([8] * 7)  # 6 equal blocks


def _mlp_batch(rng, rows):
    return rng.normal(size=(rows, 8)).astype(np.float32), rng.normal(size=(rows, 8)).astype(np.float32)


def _check(model_fn, loss_fn, make_batch, mesh, m, rows_per_mb, optimizer=OPTIMIZER, reference_microbatches=1,
           **options):
    rng = np.random.default_rng(0)
    data = [make_batch(rng, mesh[0] * m * rows_per_mb) for _ in range(3)]
    ref_losses, _, ref_params = reference_run(
        model_fn, data, loss_fn, optimizer, microbatches=reference_microbatches
    )
    result = jaxpipe.train(
        model_fn, mesh, data=data, loss_fn=loss_fn, optimizer=optimizer, steps=3,
        num_microbatches=m, progress=False, **options,
    )
    pipe = result.pipeline
    assert_matches_reference(result.losses, ref_losses, pipe.from_stacks(result.state.params), ref_params)
    _assert_copies_identical(pipe, result.state.params)
    return pipe


def _assert_copies_identical(pipe, stacks):
    plan, host = pipe.placement, [np.asarray(a) for a in stacks]
    for copy, layer in enumerate(plan.copy_layer):
        for a, b in zip(plan.stacks.from_stacks(host, copy), plan.stacks.from_stacks(host, layer)):
            np.testing.assert_array_equal(a, b, err_msg=f"parameter copy {copy} of layer {layer}")


def _split_layers(pipe):
    return sorted({p.layer for stage in pipe.stages for p in stage if p.stop - p.start < pipe.microbatch_rows})


# Six equal blocks on (4, 2) cut into whole layers (3, 3): plain 1F1B, which test_pipeline.py's MATCHES runs.
def test_six_equal_blocks_on_four_devices():
    pipe = _check(SIX, mse, _mlp_batch, (1, 4), 4, 4, schedule="balanced", costs=[1.0] * 6)
    assert pipe.partition == (1.5, 1.5, 1.5, 1.5)
    assert _split_layers(pipe) == [1, 4]
    assert np.allclose(pipe.plan.chosen.loads, 1.5)
    assert pipe.plan.plain.step_time / pipe.plan.chosen.step_time > 1.1


def test_layer_heavier_than_a_device_spans_three_devices():
    pipe = _check(SIX, mse, _mlp_batch, (1, 4), 4, 6, schedule="balanced", costs=[1, 1, 8, 1, 1, 1])
    holders = [s for s, stage in enumerate(pipe.stages) if any(p.layer == 2 for p in stage)]
    assert holders == [0, 1, 2]


@pytest.mark.parametrize("mesh, remat", [((1, 4), False)])
def test_transformer_with_heavy_output_layer(mesh, remat):
    """The head is split: each of its devices takes the loss of its rows, so logits never cross devices.

    The messages then carry hidden states only: the carrier is as wide as a
    hidden state (seq x dim = 48 floats), not as the logits (seq x vocab = 66).
    """
    case = CASES["lm"]
    costs = [0.2] + [1.0] * 6 + [3.0]  # the head costs about three blocks
    pipe = _check(case.model_fn, case.loss_fn, case.make_batch, mesh, 4, 4, schedule="balanced", costs=costs,
                  remat=remat)
    assert 7 in _split_layers(pipe)  # the head is split between the last devices
    assert pipe.split_loss and pipe.placement.carrier.float_width == 6 * 8
    loads = pipe.plan.chosen.loads
    assert loads.max() / loads.mean() < pipe.plan.plain.loads.max() / pipe.plan.plain.loads.mean()


def test_a_loss_that_is_not_a_row_mean_keeps_the_whole_output_together():
    """A summed loss cannot be split by rows: the split head ships its rows and the last device takes the loss."""
    case = CASES["lm"]

    def summed(logits, targets):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()

    costs = [0.2] + [1.0] * 6 + [3.0]
    pipe = _check(case.model_fn, summed, case.make_batch, (1, 4), 4, 4, reference_microbatches=4,
                  schedule="balanced", costs=costs)
    assert 7 in _split_layers(pipe) and not pipe.split_loss
    assert pipe.placement.carrier.float_width == 6 * 11


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("interleaved", 2)])
def test_fractional_cut_with_other_orders(schedule, v):
    # A heavier last layer puts the cuts inside layers (equal costs would cut GPipe's 2 stages whole).
    pipe = _check(SIX, mse, _mlp_batch, (2, 2), 4, 3, schedule=schedule, virtual_stages=v, cut="fractional",
                  costs=[1.0] * 5 + [2.0])
    assert _split_layers(pipe)


def test_marked_unsplittable_layer_is_cut_around():
    pipe = _check(SIX, mse, _mlp_batch, (1, 4), 4, 4, schedule="balanced", costs=[1.0] * 6, unsplittable=(1,))
    assert 1 not in _split_layers(pipe)
    assert pipe.unsplittable == (1,)
    assert "never split" in str(pipe.plan) and "1 (Dense)" in str(pipe.plan)


class Center(nnx.Module):
    """Subtracts the micro-batch mean: mixes rows, so it must not be split."""

    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        y = self.linear(x)
        return y - y.mean(axis=0, keepdims=True)


def _mixing_model(rngs):
    return [models.Dense(8, 8, rngs=rngs), Center(8, rngs=rngs)] + [models.Dense(8, 8, rngs=rngs) for _ in range(4)]


def test_layer_that_mixes_rows_is_detected_and_not_split():
    # Row-mixing output depends on the micro-batch grouping: the reference
    # uses the same 4 micro-batches of 4 rows.
    pipe = _check(_mixing_model, mse, _mlp_batch, (1, 4), 4, 4, schedule="balanced", costs=[1.0] * 6,
                  reference_microbatches=4)
    assert pipe.unsplittable == (1,)
    assert 1 not in _split_layers(pipe)


def test_global_norm_clipping_counts_split_parameters_once():
    optimizer = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.5))
    pipe = _check(SIX, mse, _mlp_batch, (1, 4), 4, 4, optimizer=optimizer, schedule="balanced", costs=[1.0] * 6)
    assert _split_layers(pipe)


def test_auto_trains_to_the_reference_and_explains_its_choice():
    case = CASES["lm"]
    costs = [0.2] + [1.0] * 6 + [3.0]
    pipe = _check(case.model_fn, case.loss_fn, case.make_batch, (2, 4), 4, 2, schedule="auto", costs=costs)
    text = str(pipe.plan)
    assert pipe.plan.chosen.step_time <= pipe.plan.plain.step_time
    eligible = [c for c in pipe.plan.candidates if c.fits and c.schedule in AUTO_ORDERS]
    assert pipe.plan.chosen is min(eligible, key=lambda c: c.step_time * departure_margin(c, pipe.plan.plain))
    if any(c.schedule == "zb_h1" and c.step_time < pipe.plan.chosen.step_time for c in pipe.plan.candidates):
        assert "schedule='zb_h1'" in text
    for needle in ("plan:", "device 0:", "device 3:", "predicted step", "reason:", "candidates:"):
        assert needle in text


def test_a_memory_limit_below_the_fastest_plan_changes_the_choice():
    """Just below what the unconstrained choice needs, auto picks another plan that fits; far below, it refuses."""
    case = CASES["lm"]
    rng = np.random.default_rng(0)
    batch = case.make_batch(rng, 16)
    free = jaxpipe.Pipeline(case.model_fn, (1, 4), case.loss_fn, OPTIMIZER, 8, batch, schedule="auto").plan.chosen
    limit = float(free.memory.max()) * (1 - 1e-6)
    tight = jaxpipe.Pipeline(case.model_fn, (1, 4), case.loss_fn, OPTIMIZER, 8, batch, schedule="auto",
                             max_memory_per_device=limit).plan
    assert (tight.chosen.label, tight.chosen.cut) != (free.label, free.cut)
    assert tight.chosen.memory.max() <= limit and tight.chosen.step_time >= free.step_time
    assert [c.fits for c in tight.candidates if (c.label, c.cut) == (free.label, free.cut)] == [False]
    with pytest.raises(ValueError, match=r"no schedule fits max_memory_per_device=1 bytes; the smallest needs"):
        jaxpipe.Pipeline(case.model_fn, (1, 4), case.loss_fn, OPTIMIZER, 8, batch, schedule="auto",
                         max_memory_per_device=1.0)


def test_balanced_rejects_an_explicit_partition():
    with pytest.raises(ValueError, match="computes its own cut"):
        jaxpipe.Pipeline(SIX, (1, 2), mse, OPTIMIZER, 2, _mlp_batch(np.random.default_rng(0), 4),
                         schedule="balanced", partition=(3, 3))


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=12),
    num_stages=st.integers(1, 8),
    rows=st.integers(1, 16),
)
def test_fractional_partition_balances_to_one_row(costs, num_stages, rows):
    # A stage can only be empty when one row of a layer outweighs a stage.
    assume(max(costs) / rows < sum(costs) / num_stages)
    stages = fractional_partition(costs, num_stages, rows, [True] * len(costs))
    # Every row of every layer exactly once, in order.
    flat = [p for stage in stages for p in stage]
    for layer in range(len(costs)):
        pieces = [p for p in flat if p.layer == layer]
        assert pieces[0].start == 0 and pieces[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    assert [p.layer for p in flat] == sorted(p.layer for p in flat)
    # Each stage carries total/S up to one row of the layers split at its two cuts.
    loads = stage_loads(costs, stages, rows)
    row_cost = max(costs) / rows
    assert np.all(np.abs(loads - sum(costs) / num_stages) <= row_cost + 1e-9)


def test_fractional_partition_cuts_around_unsplittable_layers():
    stages = fractional_partition([1.0] * 6, 4, 8, [True, False, True, True, False, True])
    for stage in stages:
        for p in stage:
            if p.layer in (1, 4):
                assert (p.start, p.stop) == (0, 8)
    assert stages[0][0] == Piece(0, 0, 8)


def test_fractional_partition_reports_a_stage_without_work():
    with pytest.raises(ValueError, match="leaves stage .* without work"):
        fractional_partition([1.0, 10.0, 1.0], 4, 8, [True, False, True])


# The LM trains balanced and auto in the tests above, dict inputs in test_pipeline.py; the others here.
@pytest.mark.parametrize("case_name,schedule", [("mlp", "auto"), ("conv", "balanced")])
def test_every_test_model_trains_to_the_reference(case_name, schedule):
    case = CASES[case_name]
    pipe = _check(case.model_fn, case.loss_fn, case.make_batch, (2, 4), 4, 4, schedule=schedule)
    assert pipe.plan.chosen.step_time <= pipe.plan.plain.step_time * (1 + 1e-9) or schedule == "balanced"


class EmbedThen(nnx.Module):
    """Token embedding ``[B, T] -> [B, T, 8]`` followed by ``f``."""

    def __init__(self, f, *, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.f = f

    def __call__(self, ids):
        return self.f(self.embed(ids))


class LinearThen(nnx.Module):
    def __init__(self, f, *, rngs):
        self.linear = nnx.Linear(8, 8, rngs=rngs)
        self.f = f

    def __call__(self, h):
        return self.f(self.linear(h))


def _token_model(first, second):
    def model_fn(rngs):
        return [EmbedThen(first, rngs=rngs), LinearThen(second, rngs=rngs), LinearThen(jnp.tanh, rngs=rngs),
                nnx.Linear(8, 11, rngs=rngs)]

    return model_fn


def _gather_next_row(y):
    rows = y.shape[0]
    return jnp.take(y, (jnp.arange(rows) + 1) % rows, axis=0)


@pytest.mark.parametrize("first,second,costs,mixing", [
    (lambda h: h - h.mean(0), jnp.tanh, [4, 1, 1, 1], 0),  # an embedding, then the batch mean subtracted
    (lambda h: h, lambda y: y - y[:1], [1, 4, 1, 1], 1),
    (lambda h: h, lambda y: jnp.cumsum(y, 0), [1, 4, 1, 1], 1),
    (lambda h: h, _gather_next_row, [1, 4, 1, 1], 1),
], ids=["embedding minus batch mean", "minus first row", "cumulative sum over rows", "row gather"])
def test_balanced_matches_the_reference_with_layers_that_mix_rows(first, second, costs, mixing):
    """The costs put a cut inside the row-mixing layer; it must be found and kept whole."""
    case = CASES["lm"]
    pipe = _check(_token_model(first, second), case.loss_fn, case.make_batch, (1, 2), 2, 4, schedule="balanced",
                  costs=costs, reference_microbatches=2)
    assert pipe.unsplittable == (mixing,)
    assert _split_layers(pipe) == []


@pytest.mark.parametrize("costs, fractional", [([1.0, 1.0, 0.8, 1.0], False), ([1.0, 1.0, 1.0], True)])
def test_auto_takes_a_fractional_cut_only_past_the_margin(costs, fractional):
    """[1, 1, 0.8, 1] on 2 devices: the fractional cut is predicted a few percent faster, under the
    margin the unpriced cost of split layers needs, so 1F1B on the integer cut is chosen; three equal
    layers gain far more (2 -> 1.5 per device) and are split. M = 7 leaves interleaved 1F1B out."""
    total = np.asarray(costs)
    plan = make_plan(total / 3, 2 * total / 3, 2, 7, 8, layer_names=[str(i) for i in range(len(costs))],
                     param_bytes=[4] * len(costs), message_bytes=8)
    best = min((c for c in plan.candidates if c.schedule in AUTO_ORDERS), key=lambda c: c.step_time)
    assert best.cut == "fractional"
    gain = plan.plain.step_time / best.step_time
    assert (gain >= FRACTIONAL_MARGIN) == fractional and gain > 1.0
    assert plan.chosen.cut == ("fractional" if fractional else "integer")
    if not fractional:
        assert plan.chosen is plan.plain and f"under the {FRACTIONAL_MARGIN:.2f}x" in plan.reason
