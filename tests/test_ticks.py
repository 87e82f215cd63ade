"""Packed ticks: order kept, dependencies met, slots replayed, lock-step time."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slot_replay import replay_ticks

from jaxpipe.schedule import BACKWARD, FORWARD, IDLE, make_schedule
from jaxpipe.simulate import Costs, lockstep_time, simulate
from jaxpipe.ticks import pack, tick_buffers, tick_time

CASES = [(1, 1, 1), (1, 3, 1), (2, 1, 1), (2, 5, 1), (3, 6, 1), (4, 8, 1), (4, 8, 2), (2, 4, 3), (4, 4, 2),
         (5, 10, 2)]


def _schedules():
    for P, M, V in CASES:
        if V > 1:
            yield make_schedule("interleaved", P, M, V)
        else:
            yield make_schedule("gpipe", P, M)
            yield make_schedule("1f1b", P, M)


def _events(ticks):
    """``{(op, m, s): tick}`` and per-device ``[(tick, op, m, s)]`` of packed ticks."""
    when, per_device = {}, [[] for _ in range(ticks.num_devices)]
    for op, mb, ch in ((FORWARD, ticks.forward, ticks.forward_chunk), (BACKWARD, ticks.backward, ticks.backward_chunk)):
        stage = ticks.stage(ch)
        for t, p in zip(*np.nonzero(mb >= 0)):
            key = (op, int(mb[t, p]), int(stage[t, p]))
            assert key not in when, f"{key} runs twice"
            when[key] = int(t)
            per_device[p].append((int(t), 0 if op == FORWARD else 1, key))
    return when, per_device


@pytest.mark.parametrize("schedule", list(_schedules()), ids=lambda s: f"{s.name}-P{s.num_devices}-M{s.num_microbatches}-V{s.virtual_stages}")
def test_pack_keeps_order_and_dependencies(schedule):
    ticks = pack(schedule)
    P, M, S = schedule.num_devices, schedule.num_microbatches, schedule.num_stages
    when, per_device = _events(ticks)
    assert len(when) == 2 * M * S
    for m in range(M):
        for s in range(S):
            f, b = when[(FORWARD, m, s)], when[(BACKWARD, m, s)]
            if s > 0:
                assert when[(FORWARD, m, s - 1)] < f
            if s < S - 1:
                assert when[(BACKWARD, m, s + 1)] < b and f < b
            else:
                assert f <= b
    stage = schedule.stage
    for p in range(P):
        table_order = [(int(schedule.op[t, p]), int(schedule.microbatch[t, p]), int(stage[t, p]))
                       for t in range(schedule.num_ticks) if schedule.op[t, p] != IDLE]
        tick_of = {key: t for t, _, key in per_device[p]}
        assert sorted(tick_of) == sorted(table_order)
        for before, after in zip(table_order, table_order[1:]):
            assert tick_of[before] < tick_of[after] or (
                tick_of[before] == tick_of[after] and before[0] != after[0]), (before, after)
    assert ticks.num_ticks <= schedule.num_ticks


@pytest.mark.parametrize("schedule", list(_schedules()), ids=lambda s: f"{s.name}-P{s.num_devices}-M{s.num_microbatches}-V{s.virtual_stages}")
@pytest.mark.parametrize("fuse", [True, False])
def test_buffers_replay(schedule, fuse):
    """Runs the slot plan like the executor: every read finds its own entry."""
    ticks = pack(schedule, fuse=fuse)
    replay_ticks(ticks, tick_buffers(ticks))


@settings(max_examples=30, deadline=None)
@given(P=st.integers(1, 5), M=st.integers(1, 9), name=st.sampled_from(["gpipe", "1f1b"]),
       seed=st.integers(0, 2**16))
def test_unfused_time_is_the_lockstep_time(P, M, name, seed):
    schedule = make_schedule(name, P, M)
    rng = np.random.default_rng(seed)
    fwd, bwd = rng.uniform(0.1, 2.0, (P, 1)), rng.uniform(0.1, 4.0, (P, 1))
    assert tick_time(pack(schedule, fuse=False), fwd, bwd) == pytest.approx(lockstep_time(schedule, Costs(fwd, bwd)))


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 12), f0=st.floats(0.1, 3.0), b0=st.floats(0.1, 6.0), b1=st.floats(0.1, 9.0))
def test_two_device_1f1b_packs_to_the_asynchronous_time(M, f0, b0, b1):
    """On 2 devices packed 1F1B runs as fast as an event-driven executor.

    The last stage's forward is folded into its backward (forward cost 0).
    """
    schedule = make_schedule("1f1b", 2, M)
    fwd, bwd = np.array([[f0], [0.0]]), np.array([[b0], [b1]])
    assert tick_time(pack(schedule), fwd, bwd) == pytest.approx(simulate(schedule, Costs(fwd, bwd)).makespan)


@pytest.mark.parametrize("P,M", [(2, 5), (4, 16), (4, 2), (8, 8), (8, 20)])
def test_fused_1f1b_steady_state_pairs_a_forward_with_a_backward(P, M):
    ticks = pack(make_schedule("1f1b", P, M, fused=True))
    both = (ticks.forward >= 0) & (ticks.backward >= 0)
    # After device p's 2 (P - 1 - p) - 1 warm-up forwards and the first
    # backward's round trip, each tick runs a forward and a backward.
    assert both.sum(axis=0).tolist() == [max(M - 2 * (P - 1 - p), 0) for p in range(P)]


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 8), M=st.integers(1, 24), f=st.floats(0.1, 3.0), b=st.floats(0.1, 6.0))
def test_fused_1f1b_packs_to_the_asynchronous_time_on_equal_stages(P, M, f, b):
    """Equal stages: packed fused 1F1B is as fast as an event-driven 1F1B.

    The standard order packs slower for P > 2 (devices wait every other tick).
    The last stage's forward is folded into its backward.
    """
    fwd, bwd = np.full((P, 1), f), np.full((P, 1), b)
    bwd[-1] += fwd[-1]
    fwd[-1] = 0.0
    event = simulate(make_schedule("1f1b", P, M), Costs(fwd, bwd)).makespan
    assert tick_time(pack(make_schedule("1f1b", P, M, fused=True)), fwd, bwd) == pytest.approx(event)
    if P > 2 and M >= 2 * P:
        assert tick_time(pack(make_schedule("1f1b", P, M)), fwd, bwd) > 1.05 * event


def test_str_shows_fused_cells():
    text = str(pack(make_schedule("1f1b", 2, 3)))
    assert "F0+B0" in text and text.startswith("1f1b packed: P=2 M=3 V=1")
