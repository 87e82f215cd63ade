"""Event-driven simulator: bubble formulas, dependencies, memory, cost checks.

The bubble formulas hold for ANY forward and backward costs f, b > 0 as long
as every stage costs the same (every chunk costs f / V and b / V) and comm is
0: GPipe and 1F1B idle (P - 1) / (M + P - 1) of the time, interleaved 1F1B
(with M a multiple of P) idles (P - 1) / (V M + P - 1).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpipe.schedule import BACKWARD, FORWARD, IDLE, make_schedule
from jaxpipe.simulate import Costs, lockstep_time, simulate

costs_st = st.floats(0.05, 5.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b"]), P=st.integers(1, 6), M=st.integers(1, 12), f=costs_st, b=costs_st)
def test_bubble_formula_gpipe_1f1b(name, P, M, f, b):
    result = simulate(make_schedule(name, P, M), Costs.uniform(P, 1, f, b))
    assert result.makespan == pytest.approx((M + P - 1) * (f + b))
    assert result.bubble_fraction == pytest.approx((P - 1) / (M + P - 1), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 5), groups=st.integers(1, 3), V=st.integers(1, 4), f=costs_st, b=costs_st)
def test_bubble_formula_interleaved(P, groups, V, f, b):
    M = P * groups
    result = simulate(make_schedule("interleaved", P, M, V), Costs.uniform(P, V, f, b))
    assert result.makespan == pytest.approx((V * M + P - 1) * (f + b) / V)
    assert result.bubble_fraction == pytest.approx((P - 1) / (V * M + P - 1), abs=1e-9)


@pytest.mark.parametrize("P,M", [(1, 4), (4, 2), (4, 8), (6, 7)])
def test_peak_memory(P, M):
    assert np.array_equal(simulate(make_schedule("1f1b", P, M), Costs.uniform(P)).peak_in_flight,
                          np.minimum(P - np.arange(P), M))
    assert np.array_equal(simulate(make_schedule("gpipe", P, M), Costs.uniform(P)).peak_in_flight, np.full(P, M))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "interleaved"]), P=st.integers(1, 4), groups=st.integers(1, 3),
       V=st.integers(1, 3), comm=st.floats(0, 2), seed=st.integers(0, 2**16))
def test_starts_respect_dependencies(name, P, groups, V, comm, seed):
    V = V if name == "interleaved" else 1
    schedule = make_schedule(name, P, P * groups, V)
    rng = np.random.default_rng(seed)
    costs = Costs(rng.uniform(0.1, 3, (P, V)), rng.uniform(0.1, 3, (P, V)), comm)
    result = simulate(schedule, costs)
    S, stage = schedule.num_stages, schedule.stage
    where = {(int(schedule.op[t, p]), int(schedule.microbatch[t, p]), int(stage[t, p])): (t, p)
             for t, p in zip(*np.nonzero(schedule.op != IDLE))}
    for (op, m, s), (t, p) in where.items():
        cost = (costs.forward if op == FORWARD else costs.backward)[p, s // P]
        assert result.end[t, p] == pytest.approx(result.start[t, p] + cost)
        needs = [(FORWARD, m, s - 1)] if op == FORWARD and s > 0 else []
        if op == BACKWARD:
            needs = [(FORWARD, m, s)] + ([(BACKWARD, m, s + 1)] if s < S - 1 else [])
        for need in needs:
            tn, pn = where[need]
            assert result.start[t, p] >= result.end[tn, pn] + (comm if pn != p else 0) - 1e-9
    for p in range(P):
        ends, starts = result.end[:, p], result.start[:, p]
        busy = ~np.isnan(starts)
        assert np.all(starts[busy][1:] >= ends[busy][:-1] - 1e-9)
    assert np.all(np.isnan(result.start[schedule.op == IDLE]))
    assert result.makespan <= result.lockstep_makespan + 1e-9
    assert result.busy.sum() <= P * result.makespan + 1e-9


def test_comm_adds_per_hop():
    result = simulate(make_schedule("1f1b", 2, 1), Costs.uniform(2, 1, 1.0, 2.0, comm=0.5))
    assert result.makespan == pytest.approx(2 * 1.0 + 2 * 2.0 + 2 * 0.5)
    single = simulate(make_schedule("interleaved", 1, 2, 2), Costs.uniform(1, 2, 1.0, 2.0, comm=0.5))
    assert single.makespan == pytest.approx(6.0)
    assert single.bubble_fraction == pytest.approx(0.0)


def test_heterogeneous_slowest_device_dominates():
    schedule = make_schedule("gpipe", 2, 4)
    result = simulate(schedule, Costs(np.array([[1.0], [3.0]]), np.array([[2.0], [6.0]])))
    assert result.makespan == pytest.approx(1 + 4 * 3 + 4 * 6 + 2)
    assert result.busy.tolist() == [12.0, 36.0]


def test_lockstep_time():
    schedule = make_schedule("1f1b", 4, 8)
    assert lockstep_time(schedule, Costs.uniform(4, 1, 1.0, 1.0)) == pytest.approx(schedule.num_ticks)
    has_backward = (schedule.op == BACKWARD).any(axis=1)
    expected = np.where(has_backward, 2.0, 1.0).sum()
    assert lockstep_time(schedule, Costs.uniform(4)) == pytest.approx(expected)
    with_comm = lockstep_time(schedule, Costs.uniform(4, comm=0.25))
    assert with_comm == pytest.approx(expected + 0.25 * (schedule.num_ticks - 1))
    assert simulate(schedule, Costs.uniform(4)).lockstep_makespan == pytest.approx(expected)


def test_uniform_costs_split_over_chunks():
    costs = Costs.uniform(3, 2, forward=1.0, backward=3.0, comm=0.1)
    assert costs.forward.shape == (3, 2) and np.allclose(costs.forward, 0.5) and np.allclose(costs.backward, 1.5)
    scalar = Costs(1.0, 2.0)
    a = simulate(make_schedule("1f1b", 3, 3), scalar)
    b = simulate(make_schedule("1f1b", 3, 3), Costs.uniform(3))
    assert a.makespan == b.makespan


@pytest.mark.parametrize("kwargs, message", [
    (dict(forward=-1.0, backward=1.0), "forward must be finite and >= 0"),
    (dict(forward=1.0, backward=np.nan), "backward must be finite and >= 0"),
    (dict(forward=np.ones(3), backward=1.0), r"scalar or a \[P, V\] array, got shape \(3,\)"),
    (dict(forward=1.0, backward=1.0, comm=-0.5), "comm must be finite and >= 0"),
])
def test_bad_costs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Costs(**kwargs)


def test_cost_shape_must_match_schedule():
    with pytest.raises(ValueError, match=r"shape \(2, 1\), the schedule needs \[P, V\] = \(4, 1\)"):
        simulate(make_schedule("gpipe", 4, 4), Costs(np.ones((2, 1)), 1.0))
    with pytest.raises(ValueError, match="P >= 1 and V >= 1"):
        Costs.uniform(0)
