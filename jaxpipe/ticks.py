"""Schedules packed into executor ticks: a forward, a backward and a weight lane.

A lock-step SPMD executor exchanges boundaries with ``ppermute`` every tick,
so every tick lasts as long as its slowest device. With one action per tick
(the ``Schedule`` table), a 1F1B steady state alternates forward ticks and
backward ticks, and a device whose backward is cheap still waits for its
neighbour's expensive one. Here each tick holds up to one FORWARD (the
forward lane) and one BACKWARD (the backward lane) per device, run one after
the other: in the steady state every device does a forward and a backward
per tick, so the tick lasts ``max_p (f_p + b_p)`` and stages with equal
``f + b`` leave no device waiting — the property a balanced cut is made for.

``pack`` keeps each device's order of work from the schedule and moves every
action to the earliest tick where its inputs have arrived (unit-time list
scheduling, as ``schedule.py`` does for one lane). The last stage's forward is
folded into its backward (the executor computes both there), so it may share
that backward's tick. ``tick_buffers`` assigns the activation and gradient-inbox
slots the executor indexes; the activation slot of ``(m, s)`` also holds that
stage's saved residuals from its forward to its backward.

A split table (zero-bubble, ``Schedule.split``) gets a third lane, the
weight lane: each tick runs up to one FORWARD, one BACKWARD (B: the input
gradient only) and one WEIGHT (W: the weight gradient) per device. W gets
its own lane rather than sharing the backward lane because in the steady
state a device has one F, one B and one W to do per micro-batch: with a
shared lane a tick could hold F + B or F + W, and the steady state would
need 1.5 ticks per micro-batch, each as long as the slowest device's
``f + max(b, w)``. With three lanes the steady tick is ``f + b + w``, what a
1F1B tick costs with the whole backward, and the W lane is free to take the
deferred Ws where the B lane is empty (warm-up and cool-down). A W runs at
least one tick after its B: B's output for W is written into its weight
slot at the start of the next tick, like a forward's residuals.
``docs/design.md`` ("Two lanes per tick", "Buffer slots") shows how the
executor reads these tables.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from .schedule import (
    BACKWARD,
    FORWARD,
    IDLE,
    WEIGHT,
    Schedule,
    ScheduleError,
)


def _frozen(array) -> np.ndarray:
    array = np.array(array, dtype=np.int32)
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True)
class Ticks:
    """A schedule as executor ticks, ``T`` rows of two (split tables: three) lanes per device.

    Attributes:
      name: the schedule family it was packed from.
      num_devices: P.
      num_microbatches: M.
      virtual_stages: V.
      forward: ``[T, P]`` micro-batch of the forward lane, -1 if none.
      forward_chunk: ``[T, P]`` its chunk, -1 if none.
      backward: ``[T, P]`` micro-batch of the backward lane, -1 if none.
      backward_chunk: ``[T, P]`` its chunk, -1 if none.
      weight: ``[T, P]`` micro-batch of the weight lane (W of a split table),
        -1 if none; ``None``: no weight lane (all -1).
      weight_chunk: ``[T, P]`` its chunk, -1 if none.
    """

    name: str
    num_devices: int
    num_microbatches: int
    virtual_stages: int
    forward: np.ndarray
    forward_chunk: np.ndarray
    backward: np.ndarray
    backward_chunk: np.ndarray
    weight: np.ndarray | None = None
    weight_chunk: np.ndarray | None = None

    def __post_init__(self):
        shape = np.shape(self.forward)
        for field in ("weight", "weight_chunk"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, np.full(shape, -1, np.int32))
        for field in ("forward", "forward_chunk", "backward", "backward_chunk", "weight", "weight_chunk"):
            array = _frozen(getattr(self, field))
            if array.ndim != 2 or array.shape != shape or shape[1] != self.num_devices:
                raise ValueError(f"{field} must have shape [T, P={self.num_devices}], got {array.shape}")
            object.__setattr__(self, field, array)

    @property
    def num_ticks(self) -> int:
        """T."""
        return self.forward.shape[0]

    @property
    def num_stages(self) -> int:
        """S = V * P."""
        return self.virtual_stages * self.num_devices

    @property
    def split(self) -> bool:
        """Whether the backward lane runs B only and a weight lane runs W."""
        return bool((self.weight >= 0).any())

    def stage(self, chunk: np.ndarray) -> np.ndarray:
        """``[T, P]`` stage ``chunk * P + p`` of a lane's chunks, -1 where empty."""
        stage = chunk * self.num_devices + np.arange(self.num_devices, dtype=np.int32)
        return np.where(chunk < 0, -1, stage).astype(np.int32)

    def __str__(self) -> str:
        def cell(t, p):
            parts = []
            for op, mb, ch in (("F", self.forward, self.forward_chunk), ("B", self.backward, self.backward_chunk),
                               ("W", self.weight, self.weight_chunk)):
                if mb[t, p] >= 0:
                    parts.append(f"{op}{mb[t, p]}" + (f".{ch[t, p]}" if self.virtual_stages > 1 else ""))
            return "+".join(parts) or "."

        labels = [[cell(t, p) for t in range(self.num_ticks)] for p in range(self.num_devices)]
        width = max([len(c) for row in labels for c in row] + [1])
        rows = [f"dev {p} | " + " ".join(c.ljust(width) for c in row).rstrip() for p, row in enumerate(labels)]
        return "\n".join([f"{self.name} packed: P={self.num_devices} M={self.num_microbatches} "
                          f"V={self.virtual_stages} ticks={self.num_ticks}"] + rows)


def _orders(schedule: Schedule) -> list[list[tuple[int, int, int]]]:
    """Each device's ``(op, microbatch, stage)`` actions in tick order."""
    stage = schedule.stage
    return [
        [(int(schedule.op[t, p]), int(schedule.microbatch[t, p]), int(stage[t, p]))
         for t in range(schedule.num_ticks) if schedule.op[t, p] != IDLE]
        for p in range(schedule.num_devices)
    ]


def pack(schedule: Schedule, fuse: bool = True) -> Ticks:
    """Packs a schedule's per-device orders into ticks of lanes.

    Args:
      schedule: a legal table; its per-device order of actions is kept.
      fuse: if False, one action per tick, exactly the table's ticks.

    Returns:
      The ``Ticks``: every action at its earliest tick given that a boundary
      sent at tick t arrives at t + 1 (and a W runs after the tick of its B),
      each device running at most one FORWARD, one BACKWARD and one WEIGHT
      per tick, in its own order.

    Raises:
      ScheduleError: if the orders deadlock (an illegal table).
    """
    P, S, T0 = schedule.num_devices, schedule.num_stages, schedule.num_ticks
    lanes = np.full((6, T0, P), -1, np.int32)
    if not fuse:
        for lane, op in enumerate((FORWARD, BACKWARD, WEIGHT)):
            lanes[2 * lane] = np.where(schedule.op == op, schedule.microbatch, -1)
            lanes[2 * lane + 1] = np.where(schedule.op == op, schedule.chunk, -1)
        return Ticks(schedule.name, P, schedule.num_microbatches, schedule.virtual_stages, *lanes)
    orders, done, cursor, rows = _orders(schedule), {}, [0] * P, []

    def ready(op, m, s, t):
        if op == FORWARD:
            return s == 0 or done.get((FORWARD, m, s - 1), t) < t
        if op == WEIGHT:
            return done.get((BACKWARD, m, s), t) < t
        own = done.get((FORWARD, m, s), t + 1)
        return (own < t or (s == S - 1 and own == t)) and (
            s == S - 1 or done.get((BACKWARD, m, s + 1), t) < t)

    while any(cursor[p] < len(orders[p]) for p in range(P)):
        t, row, moved = len(rows), np.full((6, P), -1, np.int32), False
        for p in range(P):
            taken = set()
            while cursor[p] < len(orders[p]):
                op, m, s = orders[p][cursor[p]]
                if op in taken or not ready(op, m, s, t):
                    break
                lane = 2 * (op - FORWARD)
                row[lane, p], row[lane + 1, p] = m, s // P
                done[(op, m, s)] = t
                taken.add(op)
                cursor[p] += 1
                moved = True
        if not moved:
            raise ScheduleError(f"{schedule.name}: packing deadlocks at tick {t}; the table is not legal")
        rows.append(row)
    lanes = np.stack(rows, axis=1)
    return Ticks(schedule.name, P, schedule.num_microbatches, schedule.virtual_stages, *lanes)


@dataclasses.dataclass(frozen=True)
class TickBuffers:
    """Per-device slots for the packed ticks.

    Activation slot of ``(m, s)`` (input and, for non-last stages, the saved
    residuals): held from the input's arrival (or, for stage 0, its forward)
    through the tick of its backward (split ticks: of its W, which reads the
    stage's inputs and residuals again). Gradient slot of ``(m, s)``,
    s < S - 1: from the tick after BACKWARD(m, s + 1) through BACKWARD(m, s).
    Weight slot of ``(m, s)`` (split ticks: what B computed that W needs,
    ``split_backward.py``): from the tick after its B through its W. Arrivals
    and weight-slot writes happen before the lanes run.

    Attributes:
      num_act_slots: activation slots per device (>= 1).
      recv_act_slot: ``[T, P]`` slot written by the activation arriving, -1 if none.
      forward_slot: ``[T, P]`` activation slot of the forward lane, -1 if none.
      backward_slot: ``[T, P]`` activation slot of the backward lane, -1 if none.
      num_grad_slots: gradient slots per device (>= 1).
      recv_grad_slot: ``[T, P]`` slot written by the gradient arriving, -1 if none.
      grad_slot: ``[T, P]`` gradient slot read by the backward lane, -1 if none.
      weight_act_slot: ``[T, P]`` activation slot of the weight lane, -1 if none.
      num_weight_slots: weight slots per device (0 without a weight lane).
      weight_out_slot: ``[T, P]`` weight slot the backward lane's W input
        goes to (written at the start of the next tick), -1 if none.
      weight_slot: ``[T, P]`` weight slot read by the weight lane, -1 if none.
    """

    num_act_slots: int
    recv_act_slot: np.ndarray
    forward_slot: np.ndarray
    backward_slot: np.ndarray
    num_grad_slots: int
    recv_grad_slot: np.ndarray
    grad_slot: np.ndarray
    weight_act_slot: np.ndarray
    num_weight_slots: int
    weight_out_slot: np.ndarray
    weight_slot: np.ndarray


def _greedy_slots(intervals, T: int, P: int, readers: int = 1):
    """Smallest-free-slot assignment of ``(p, start, end, arrives, reads)`` intervals.

    An entry is held on device ``p`` from tick ``start`` through ``end``;
    ``arrives`` says whether it is written at ``start``; ``reads`` are
    ``(reader, tick)`` pairs: the slot goes into ``read[reader][tick, p]``.

    Returns ``recv [T, P]`` (-1 where nothing arrives), ``read [readers, T,
    P]`` and ``live [T, P]`` (entries held).
    """
    recv, read = np.full((T, P), -1, np.int32), np.full((readers, T, P), -1, np.int32)
    live = np.zeros((T + 1, P), np.int64)
    for p in range(P):
        free, used, held = [], 0, []
        for start, end, arrives, reads in sorted(i[1:] for i in intervals if i[0] == p):
            while held and held[0][0] < start:
                heapq.heappush(free, heapq.heappop(held)[1])
            slot = heapq.heappop(free) if free else used
            used = max(used, slot + 1)
            heapq.heappush(held, (end, slot))
            if arrives:
                recv[start, p] = slot
            for reader, tick in reads:
                read[reader, tick, p] = slot
            live[start, p] += 1
            live[end + 1, p] -= 1
    return recv, read, np.cumsum(live, axis=0)[:T]


def tick_buffers(ticks: Ticks) -> TickBuffers:
    """Assigns activation, gradient and weight slots to packed ticks.

    Args:
      ticks: from ``pack``.

    Returns:
      The ``TickBuffers``.
    """
    P, S, T, M = ticks.num_devices, ticks.num_stages, ticks.num_ticks, ticks.num_microbatches
    when = np.full((3, M, S), -1, np.int64)
    lanes = ((ticks.forward, ticks.forward_chunk), (ticks.backward, ticks.backward_chunk),
             (ticks.weight, ticks.weight_chunk))
    for lane, (mb, ch) in enumerate(lanes):
        stage = ticks.stage(ch)
        for t, p in zip(*np.nonzero(mb >= 0)):
            when[lane, mb[t, p], stage[t, p]] = t
    fwd, bwd, wgt = when
    split = ticks.split
    acts, grads, weights = [], [], []
    for m in range(M):
        for s in range(S):
            start = fwd[m, s - 1] + 1 if s > 0 else fwd[m, s]
            reads = [(0, fwd[m, s]), (1, bwd[m, s])] + ([(2, wgt[m, s])] if split else [])
            acts.append((s % P, start, wgt[m, s] if split else bwd[m, s], s > 0, reads))
            if s < S - 1:
                grads.append((s % P, bwd[m, s + 1] + 1, bwd[m, s], True, [(0, bwd[m, s])]))
            if split:
                weights.append((s % P, bwd[m, s] + 1, wgt[m, s], False, [(0, bwd[m, s]), (1, wgt[m, s])]))
    recv_a, (read_f, read_b, read_w), live_a = _greedy_slots(acts, T, P, readers=3)
    recv_g, (read_g,), live_g = _greedy_slots(grads, T, P)
    _, (out_w, read_ws), live_w = _greedy_slots(weights, T, P, readers=2)
    num_a, num_g = (max(1, int(live.max(initial=0))) for live in (live_a, live_g))
    num_w = int(live_w.max(initial=0))
    return TickBuffers(num_a, recv_a, read_f, read_b, num_g, recv_g, read_g, read_w, num_w, out_w, read_ws)


def tick_time(ticks: Ticks, forward: np.ndarray, backward: np.ndarray, comm: float = 0.0,
              weight: np.ndarray | float = 0.0) -> float:
    """Time of a lock-step run of packed ticks.

    Each tick lasts as long as its slowest device's forward-lane plus
    backward-lane (plus weight-lane) work, plus ``comm`` when a boundary
    crosses devices.

    Args:
      ticks: from ``pack``.
      forward: ``[P, V]`` forward cost of (device, chunk).
      backward: ``[P, V]`` backward cost of (device, chunk): for split ticks
        the B part, otherwise the whole backward.
      comm: time per tick with a cross-device boundary.
      weight: ``[P, V]`` cost of a W (split ticks; ignored otherwise).

    Returns:
      The summed tick durations.
    """
    shape = (ticks.num_devices, ticks.virtual_stages)
    devices = np.broadcast_to(np.arange(ticks.num_devices), ticks.forward.shape)
    work = np.zeros(ticks.forward.shape)
    for mb, chunk, cost in ((ticks.forward, ticks.forward_chunk, forward), (ticks.backward, ticks.backward_chunk, backward),
                            (ticks.weight, ticks.weight_chunk, weight)):
        cost = np.broadcast_to(np.asarray(cost, np.float64), shape)
        work = work + np.where(mb >= 0, cost[devices, np.maximum(chunk, 0)], 0.0)
    f_stage, b_stage = ticks.stage(ticks.forward_chunk), ticks.stage(ticks.backward_chunk)
    sends = ((f_stage >= 0) & (f_stage < ticks.num_stages - 1)) | (b_stage > 0)
    hop = comm * (sends.any(axis=1) & (ticks.num_devices > 1))
    return float(np.sum(work.max(axis=1, initial=0.0) + hop))
