"""Zero-bubble schedules: split tables, their packing and slots, the B/W split, and training.

Bubble formulas (derived in ``schedule.zb_h1``'s docstring and BUILD_NOTES,
"Zero-bubble schedules"), with F = B = W = 1 time unit per stage:

* event-driven ZB-H1: makespan ``3M + P - 1 + max(0, P - M)``, so the
  bubble is ``(P - 1) / (3M + P - 1)`` for ``M >= P``;
* packed lock-step ticks (the last stage folds its forward into B):
  ``3M + 2P - 2`` for ``M >= 2P - 1``, never more than fused 1F1B's
  ``3 (M + P - 1)`` with the whole backward ``B + W`` in one action.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models_for_tests import CASES, batches
from reference import SAME_MATH, SAME_MATH_LOSS, assert_close, assert_trains_like_reference
from slot_replay import replay_ticks
from test_pipeline import OPTIMIZER, ROWS_PER_MICROBATCH, _reference

import jaxpipe
from jaxpipe.lanes import make_lanes
from jaxpipe.schedule import (
    BACKWARD,
    IDLE,
    WEIGHT,
    ScheduleError,
    make_schedule,
    validate,
    zb_h1,
)
from jaxpipe.simulate import Costs, simulate
from jaxpipe.split_backward import count, make_split_lanes, run_b, run_w
from jaxpipe.ticks import pack, tick_buffers, tick_time


def _edit(schedule, t, p, op, m, c):
    arrays = {f: np.array(getattr(schedule, f)) for f in ("op", "microbatch", "chunk")}
    arrays["op"][t, p], arrays["microbatch"][t, p], arrays["chunk"][t, p] = op, m, c
    return dataclasses.replace(schedule, **arrays)


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 8), M=st.integers(1, 24))
def test_event_driven_bubble_formula(P, M):
    sim = simulate(zb_h1(P, M), Costs.uniform(P, forward=1.0, backward=1.0, weight=1.0))
    makespan = 3 * M + P - 1 + max(0, P - M)
    assert sim.makespan == makespan
    assert np.isclose(sim.bubble_fraction, 1 - 3 * M / makespan)
    if M >= P:
        assert np.isclose(sim.bubble_fraction, (P - 1) / (3 * M + P - 1))
    # At 1F1B's peak activation memory: (m, s) held from forward to W.
    one_f_one_b = simulate(make_schedule("1f1b", P, M), Costs.uniform(P, forward=1.0, backward=1.0, weight=1.0))
    assert sim.peak_in_flight.max() == one_f_one_b.peak_in_flight.max() == min(P, M)
    assert sim.makespan <= one_f_one_b.makespan


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 8), M=st.integers(1, 24))
def test_packed_lockstep_time(P, M):
    last = [[0.0]] * (P - 1) + [[1.0]]  # the last stage's forward is folded into its B
    forward, own = 1.0 - np.array(last), 1.0 + np.array(last)
    zb = tick_time(pack(make_schedule("zb_h1", P, M, fused=True)), forward, own, weight=1.0)
    plain = tick_time(pack(make_schedule("1f1b", P, M, fused=True)), forward, own + 1.0)
    assert plain == 3 * (M + P - 1)
    assert zb <= plain
    if M >= 2 * P - 1:
        assert zb == 3 * M + 2 * P - 2


def test_split_costs_only_change_split_tables():
    whole, parts = Costs.uniform(3, backward=2.0), Costs.uniform(3, backward=1.5, weight=0.5)
    table = make_schedule("1f1b", 3, 5)
    assert simulate(table, whole).makespan == simulate(table, parts).makespan
    assert simulate(zb_h1(3, 5), parts).makespan < simulate(table, parts).makespan


def test_validate_rejects_broken_split_tables():
    good = zb_h1(3, 4)
    validate(good, max_in_flight=3)
    with pytest.raises(ScheduleError, match="micro-batches in flight at once, more than max_in_flight=2"):
        validate(good, max_in_flight=2)
    t, p = (int(i) for i in np.argwhere(good.op == WEIGHT)[0])
    m = int(good.microbatch[t, p])
    b_tick = int(np.argwhere((good.op[:, p] == BACKWARD) & (good.microbatch[:, p] == m))[0, 0])
    with pytest.raises(ScheduleError, match=r"WEIGHT of micro-batch 0 stage 0 never runs .*a split table needs"):
        validate(_edit(good, t, p, IDLE, -1, -1))
    with pytest.raises(ScheduleError, match="before its own BACKWARD"):
        validate(_edit(_edit(good, t, p, IDLE, -1, -1), b_tick, p, WEIGHT, m, 0))
    longer = dataclasses.replace(good, **{f: np.concatenate([getattr(good, f), np.full((1, 3), fill)])
                                          for f, fill in (("op", IDLE), ("microbatch", -1), ("chunk", -1))})
    with pytest.raises(ScheduleError, match="second WEIGHT"):
        validate(_edit(longer, good.num_ticks, p, WEIGHT, m, 0))
    with pytest.raises(ScheduleError, match="unknown op 4"):
        validate(_edit(good, t, p, 4, m, 0))


@pytest.mark.parametrize("P,M", [(1, 3), (2, 5), (3, 3), (4, 9), (5, 2)])
def test_split_ticks_replay(P, M):
    """W runs after its B on its device; its slots hold that (m, s)'s own entries."""
    ticks = pack(make_schedule("zb_h1", P, M, fused=True))
    buffers = tick_buffers(ticks)
    assert ticks.split and buffers.num_weight_slots >= 1
    replay_ticks(ticks, buffers)


def _split(pipe, case, data, remat):
    """The pipeline's stage backwards split into B and W, traced on random stage inputs."""
    plan, weights = pipe.placement, tuple(a[0] for a in pipe.init().params)
    zero_f, zero_i = plan.carrier.zeros()
    x, y = jax.tree.map(lambda a: a[: pipe.microbatch_rows], data[0])
    lanes = make_lanes(plan, case.loss_fn, 0.5, remat, pipe.compute_dtype, (weights, zero_f, zero_i, x, y, None))
    rng = np.random.default_rng(0)
    saved = tuple(jnp.asarray(rng.normal(size=(n,)), d) for d, n in zip(lanes.res_dtypes, lanes.res_sizes))
    in_f, cot_f = (jnp.asarray(rng.normal(size=zero_f.shape), zero_f.dtype) for _ in range(2))
    args = (weights, in_f, zero_i, cot_f, saved, x, y, None)
    return lanes, make_split_lanes(lanes, args), args


def _check_no_work_twice(split):
    """B and W together hold the whole backward's matmuls and convolutions once each."""
    for s, stage in enumerate(split.stages):
        for op in ("dot_general", "conv_general_dilated"):
            whole, b, w = (count(j.jaxpr, op) for j in (stage.whole, stage.b, stage.w))
            assert b + w == whole, (s, op, b, w, whole)
        mults = [sum(count(j.jaxpr, op) for op in ("dot_general", "conv_general_dilated"))
                 for j in (stage.whole, stage.b, stage.w)]
        # Stage 0's input gradient is never needed: its B is empty, its W is the whole backward.
        assert mults[2] > 0 and (mults[1] == 0 if s == 0 else 0 < mults[1] < mults[0]), (s, mults)


def test_b_then_w_computes_the_whole_backward():
    case = CASES["mlp"]
    data = batches(case, 4)
    pipe = jaxpipe.Pipeline(case.model_fn, (1, 2), case.loss_fn, optax.sgd(0.1), 2, data[0], schedule="zb_h1",
                            costs=[1.0] * 8)
    lanes, split, args = _split(pipe, case, data, False)
    _check_no_work_twice(split)

    @jax.jit
    def both(args):
        out = []
        for s, stage in enumerate(split.stages):
            (b_in, b_loss), vectors = run_b(stage, jax.tree.leaves(args), split.w_dtypes, split.w_sizes)
            # W reads the stage inputs again, but not the output cotangent (its inbox slot is free by then).
            freed = args[:3] + (jnp.zeros_like(args[3]),) + args[4:]
            w_leaves = run_w(stage, jax.tree.leaves(freed), split.w_dtypes, vectors)
            out.append((lanes.grads[s](*args), (b_in, b_loss, w_leaves)))
        return out

    for (g_trees, g_in, loss), (b_in, b_loss, w_leaves) in both(args):
        assert_close((b_in, w_leaves), (g_in, jax.tree.leaves(g_trees)), SAME_MATH, "B and W")
        assert_close(b_loss, loss, SAME_MATH_LOSS, "B's loss")


# A covering design within the test budget (each case compiles a pipeline):
# every listed mesh, M = P and M = 2P + 1 (on (1, 4)); the conv net and the
# LM meet fractional cuts, the MLP and the LM integer ones (the split is
# model-generic: it partitions whatever equations the backward has); remat
# once; gradients on three.
MATCHES = [
    # mesh, M, model, cut, remat, check gradients
    ((1, 2), 2, "mlp", "integer", False, True),
    ((1, 4), 9, "lm", "integer", False, False),
    ((1, 4), 4, "conv", "fractional", True, True),
    ((2, 4), 4, "mlp", "fractional", False, True),
]


@pytest.mark.parametrize("mesh,m,case_name,cut,remat,grads", MATCHES, ids=str)
def test_zb_h1_matches_reference(mesh, m, case_name, cut, remat, grads):
    case = CASES[case_name]
    rows = mesh[0] * m * ROWS_PER_MICROBATCH
    data = batches(case, rows)
    ref_losses, ref_grads, ref_params = _reference(case_name, rows)
    pipe = jaxpipe.Pipeline(case.model_fn, mesh, case.loss_fn, OPTIMIZER, m, data[0], schedule="zb_h1", cut=cut,
                            remat=remat)
    assert pipe.ticks.split and pipe.plan.chosen.schedule == "zb_h1"
    assert_trains_like_reference(pipe, data, ref_losses, ref_params, ref_grads if grads else None)
    _check_no_work_twice(_split(pipe, case, data, remat)[1])


def test_timeline_draws_b_and_w(tmp_path):
    sim = simulate(zb_h1(3, 5), Costs.uniform(3, forward=1.0, backward=1.0, weight=1.0))
    path = jaxpipe.plot_timeline(sim, tmp_path / "zb.png")
    assert pathlib.Path(path).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
