"""Schedule tables: generators, validator, buffer slots, text rendering."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slot_replay import replay_schedule

from jaxpipe.schedule import (
    BACKWARD,
    FORWARD,
    IDLE,
    ScheduleError,
    _orders_to_table,
    assign_buffers,
    gpipe,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    validate,
)

CASES = [(1, 1, 1), (1, 3, 2), (2, 1, 1), (2, 2, 3), (3, 2, 1), (3, 6, 2), (4, 4, 2), (4, 8, 1), (4, 8, 2),
         (4, 8, 3), (5, 10, 2), (8, 8, 2)]


def _build(name, P, M, V):
    if name == "interleaved":
        return make_schedule(name, P, P * max(1, M // P), V)
    return make_schedule(name, P, M)


def _edit(schedule, t, p, op, m, c):
    arrays = {f: np.array(getattr(schedule, f)) for f in ("op", "microbatch", "chunk")}
    arrays["op"][t, p], arrays["microbatch"][t, p], arrays["chunk"][t, p] = op, m, c
    return dataclasses.replace(schedule, **arrays)


@pytest.mark.parametrize("P,M,V", CASES)
@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved"])
def test_generators_are_valid_and_tight(name, P, M, V):
    schedule = _build(name, P, M, V)
    validate(schedule)
    V = schedule.num_chunks
    M = schedule.num_microbatches
    assert schedule.num_ticks == 2 * (V * M + P - 1)
    assert schedule.op.dtype == np.int8 and schedule.microbatch.dtype == np.int32
    assert (schedule.op != IDLE).sum() == 2 * M * V * P
    buffers = assign_buffers(schedule)
    assert np.array_equal(replay_schedule(schedule, buffers), buffers.peak_stash)
    assert buffers.num_act_slots == max(1, buffers.peak_stash.max())


@pytest.mark.parametrize("P,M", [(1, 1), (1, 5), (3, 1), (4, 2), (4, 4), (4, 9), (6, 13)])
def test_gpipe_ticks_and_memory(P, M):
    schedule = gpipe(P, M)
    for p in range(P):
        for m in range(M):
            assert schedule.op[p + m, p] == FORWARD and schedule.microbatch[p + m, p] == m
            t = (M + P - 1) + (P - 1 - p) + m
            assert schedule.op[t, p] == BACKWARD and schedule.microbatch[t, p] == m
    assert np.array_equal(assign_buffers(schedule).peak_in_flight, np.full(P, M))


@pytest.mark.parametrize("P,M", [(1, 1), (1, 5), (3, 1), (4, 2), (4, 4), (4, 9), (6, 13)])
def test_one_f_one_b_memory(P, M):
    schedule = one_f_one_b(P, M)
    assert schedule.num_ticks == 2 * (M + P - 1)
    expected = np.minimum(P - np.arange(P), M)
    assert np.array_equal(assign_buffers(schedule).peak_in_flight, expected)


@pytest.mark.parametrize("P,M", [(1, 3), (2, 4), (4, 8)])
def test_interleaved_with_one_chunk_is_1f1b(P, M):
    a, b = interleaved_1f1b(P, M, 1), one_f_one_b(P, M)
    for field in ("op", "microbatch", "chunk"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_interleaved_uses_every_chunk_in_megatron_order():
    schedule = interleaved_1f1b(2, 4, 2)
    assert list(schedule.chunk[:4, 0]) == [0, 0, 1, 1]
    assert list(schedule.microbatch[:4, 0]) == [0, 1, 0, 1]
    assert schedule.stage.max() == 3


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 6), groups=st.integers(1, 3), V=st.integers(1, 3))
def test_interleaved_property(P, groups, V):
    schedule = interleaved_1f1b(P, P * groups, V)
    assert schedule.num_ticks == 2 * (V * P * groups + P - 1)
    buffers = assign_buffers(schedule)
    assert np.array_equal(replay_schedule(schedule, buffers), buffers.peak_stash)


@pytest.mark.parametrize("call, message", [
    (lambda: gpipe(0, 4), "P must be an int >= 1, got P=0"),
    (lambda: one_f_one_b(2, 0), "M must be an int >= 1, got M=0"),
    (lambda: interleaved_1f1b(2, 4, 0), "V must be an int >= 1, got V=0"),
    (lambda: interleaved_1f1b(4, 6, 2), "M to be a multiple of P, got M=6, P=4"),
    (lambda: make_schedule("zigzag", 2, 2), "valid names are gpipe, 1f1b, interleaved"),
    (lambda: make_schedule("gpipe", 2, 2, V=2), "one chunk per device, got V=2"),
    (lambda: one_f_one_b(2.0, 2), "P must be an int"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_schedule_dataclass_checks_and_freezes():
    schedule = one_f_one_b(2, 2)
    with pytest.raises(ValueError, match="shape"):
        dataclasses.replace(schedule, op=schedule.op[:, :1])
    with pytest.raises(TypeError, match="integer"):
        dataclasses.replace(schedule, chunk=schedule.chunk.astype(float))
    with pytest.raises(ValueError):
        schedule.op[0, 0] = IDLE
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.name = "x"


# 1f1b, P=4, M=8:
# dev 0 | F0 F1 F2 F3 .  .  .  B0 F4 B1 ...
# dev 1 | .  F0 F1 F2 .  .  B0 F3 B1 F4 ...
# dev 2 | .  .  F0 F1 .  B0 F2 B1 F3 B2 ...
# dev 3 | .  .  .  F0 B0 F1 B1 F2 B2 F3 ...
BROKEN = {
    "swap": ([(3, 3, BACKWARD, 0, 0), (4, 3, FORWARD, 0, 0)],
             r"^tick 3, device 3: BACKWARD of micro-batch 0 stage 3 before its own FORWARD \(at tick 4\)"),
    "drop": ([(2, 2, IDLE, -1, -1)],
             r"^tick 3, device 3: FORWARD of micro-batch 0 stage 3 before its input arrives from stage 2 "
             r"\(FORWARD of stage 2 never runs\)"),
    "duplicate": ([(4, 0, FORWARD, 1, 0)],
                  r"^tick 4, device 0: second FORWARD of micro-batch 1 stage 0 \(first at tick 1\)"),
    "backward before forward": ([(0, 1, BACKWARD, 0, 0), (6, 1, IDLE, -1, -1)],
                                r"^tick 0, device 1: BACKWARD of micro-batch 0 stage 1 before its own FORWARD"),
    "same tick as sender": ([(0, 1, FORWARD, 0, 0), (1, 1, IDLE, -1, -1)],
                            r"^tick 0, device 1: FORWARD of micro-batch 0 stage 1 before its input arrives "
                            r"from stage 0 \(sent at tick 0, arrives tick 1\)"),
    "gradient not arrived": ([(4, 2, BACKWARD, 0, 0), (5, 2, IDLE, -1, -1)],
                             r"^tick 4, device 2: BACKWARD of micro-batch 0 stage 2 before its gradient arrives "
                             r"from stage 3 \(sent at tick 4, arrives tick 5\)"),
    "chunk out of range": ([(5, 2, BACKWARD, 0, 1)], r"^tick 5, device 2: chunk 1 out of range \[0, 1\)"),
    "micro-batch out of range": ([(9, 3, FORWARD, 8, 0)],
                                 r"^tick 9, device 3: micro-batch 8 out of range \[0, 8\)"),
    "idle with payload": ([(4, 0, IDLE, 2, -1)], r"^tick 4, device 0: IDLE cell must have"),
    "unknown op": ([(4, 0, 7, 2, 0)], r"^tick 4, device 0: unknown op 7"),
    "missing last backward": ([(21, 0, IDLE, -1, -1)],
                              r"^BACKWARD of micro-batch 7 stage 0 never runs \(belongs on device 0, chunk 0\)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validate_rejects_broken_tables(case):
    edits, message = BROKEN[case]
    schedule = one_f_one_b(4, 8)
    for edit in edits:
        schedule = _edit(schedule, *edit)
    with pytest.raises(ScheduleError, match=message):
        validate(schedule)
    with pytest.raises(ValueError):
        assign_buffers(schedule)


def test_validate_rejects_chunk_out_of_range_interleaved():
    schedule = interleaved_1f1b(2, 2, 2)
    t = int(np.argmax(schedule.op[:, 1] != IDLE))
    broken = _edit(schedule, t, 1, FORWARD, 0, 2)
    with pytest.raises(ScheduleError, match=rf"^tick {t}, device 1: chunk 2 out of range \[0, 2\)"):
        validate(broken)


def test_validate_slot_limits():
    schedule = one_f_one_b(4, 8)
    validate(schedule, max_act_slots=4, max_grad_slots=1)
    with pytest.raises(ScheduleError, match=r"^tick 4, device 1: 4 activations stashed at once, more than "
                                            r"max_act_slots=3"):
        validate(schedule, max_act_slots=3)
    with pytest.raises(ScheduleError, match="max_grad_slots=0"):
        validate(schedule, max_grad_slots=0)


def test_orders_deadlock_is_reported():
    with pytest.raises(ScheduleError, match="deadlock at tick 0: device 0 waits to run BACKWARD of micro-batch 0 chunk 0"):
        _orders_to_table(1, 1, 1, [[(BACKWARD, 0, 0), (FORWARD, 0, 0)]], "bad")


def test_buffers_single_device_has_nonzero_slots():
    buffers = assign_buffers(gpipe(1, 3))
    assert buffers.num_act_slots == 1 and buffers.num_grad_slots == 1
    assert (buffers.recv_act_slot == -1).all() and (buffers.act_slot == -1).all()
    assert buffers.peak_stash.tolist() == [0] and buffers.peak_in_flight.tolist() == [3]


def test_str_renders_grid():
    text = str(one_f_one_b(4, 8))
    lines = text.splitlines()
    assert lines[0] == "1f1b: P=4 M=8 V=1 ticks=22"
    assert lines[4].split("|")[1].split()[:5] == ["."] * 3 + ["F0", "B0"]
    schedule = interleaved_1f1b(2, 2, 2)
    text = str(schedule)
    assert "V=2" in text and "F0.1" in text and "B1.0" in text
    assert all(len(line.split("|")[1].split()) == schedule.num_ticks for line in text.splitlines()[1:])
