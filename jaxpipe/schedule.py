"""Pipeline schedules as static tables: generators, validator, what a table holds.

A schedule says, for every tick and every pipe device, what that device does:
the FORWARD or BACKWARD of one micro-batch on one of its chunks, or nothing.
A *split* table (zero-bubble schedules) also has a WEIGHT action for every
(micro-batch, stage): its BACKWARD then computes only the input gradient (B,
which the previous stage waits for) and WEIGHT the weight gradient (W, which
nothing waits for), after that BACKWARD on the same device.
Stage ``s = c * P + p`` lives on device ``p``, chunk ``c`` (Megatron's
interleaved mapping), so there are ``S = V * P`` stages and a boundary always
moves to the next device on the ring: forward outputs to ``(p + 1) % P``,
input-gradients to ``(p - 1) % P``. A boundary sent at tick ``t`` can be used
at tick ``t + 1`` or later. Pure NumPy: the executor, the simulator and the
plots all read the same table (``docs/design.md``, "Schedules are data").
What a table holds at once (activations, gradients, micro-batches in flight)
is counted here for ``validate`` and the simulator; the slots the executor
indexes belong to packed ticks (``ticks.tick_buffers``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IDLE, FORWARD, BACKWARD, WEIGHT = 0, 1, 2, 3
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb_h1")
_OP_NAMES = {FORWARD: "FORWARD", BACKWARD: "BACKWARD", WEIGHT: "WEIGHT"}


class ScheduleError(ValueError):
    """A schedule table breaks a rule; the message names the tick and device."""


def _readonly(array: np.ndarray, dtype, field: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != dtype and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{field} must be an integer array, got dtype {array.dtype}")
    array = np.array(array, dtype=dtype)
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A static table of pipeline actions.

    Attributes:
      name: schedule family, e.g. ``"1f1b"``.
      num_devices: P, pipe devices.
      num_microbatches: M.
      virtual_stages: V, virtual stages (chunks) per device; 1 for GPipe and 1F1B.
      op: ``[T, P]`` int8, IDLE / FORWARD / BACKWARD / WEIGHT (WEIGHT only
        in split tables, see the module docstring).
      microbatch: ``[T, P]`` int32, the micro-batch of each action, -1 if idle.
      chunk: ``[T, P]`` int32, the chunk of each action, -1 if idle.
    """

    name: str
    num_devices: int
    num_microbatches: int
    virtual_stages: int
    op: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray

    def __post_init__(self):
        for field in ("num_devices", "num_microbatches", "virtual_stages"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {value!r}")
            object.__setattr__(self, field, int(value))
        for field, dtype in (("op", np.int8), ("microbatch", np.int32), ("chunk", np.int32)):
            array = _readonly(getattr(self, field), dtype, field)
            if array.ndim != 2 or array.shape[1] != self.num_devices:
                raise ValueError(
                    f"{field} must have shape [T, P={self.num_devices}], got {array.shape}"
                )
            object.__setattr__(self, field, array)
        if not self.op.shape == self.microbatch.shape == self.chunk.shape:
            raise ValueError(
                f"op, microbatch and chunk must share one shape [T, P], got "
                f"{self.op.shape}, {self.microbatch.shape}, {self.chunk.shape}"
            )

    @property
    def num_ticks(self) -> int:
        """T, the number of ticks (rows of the table)."""
        return self.op.shape[0]

    @property
    def num_stages(self) -> int:
        """S = V * P."""
        return self.virtual_stages * self.num_devices

    @property
    def split(self) -> bool:
        """Whether backwards are split into B (BACKWARD) and W (WEIGHT) actions."""
        return bool((self.op == WEIGHT).any())

    @property
    def stage(self) -> np.ndarray:
        """``[T, P]`` int32 stage index ``chunk * P + device``, -1 where idle."""
        stage = self.chunk * self.num_devices + np.arange(self.num_devices, dtype=np.int32)
        return np.where(self.op == IDLE, -1, stage).astype(np.int32)

    def __str__(self) -> str:
        labels = [[_cell(self, t, p) for t in range(self.num_ticks)] for p in range(self.num_devices)]
        width = max([len(cell) for row in labels for cell in row] + [1])
        head = (
            f"{self.name}: P={self.num_devices} M={self.num_microbatches} "
            f"V={self.virtual_stages} ticks={self.num_ticks}"
        )
        tag = len(f"dev {self.num_devices - 1}")
        rows = [f"dev {p}".ljust(tag) + " | " + " ".join(c.ljust(width) for c in row).rstrip()
                for p, row in enumerate(labels)]
        return "\n".join([head] + rows)


def _cell(schedule: Schedule, t: int, p: int) -> str:
    op = int(schedule.op[t, p])
    if op == IDLE:
        return "."
    text = {FORWARD: "F", BACKWARD: "B", WEIGHT: "W"}.get(op, "?") + str(schedule.microbatch[t, p])
    return text + (f".{schedule.chunk[t, p]}" if schedule.virtual_stages > 1 else "")


def _check_sizes(P: int, M: int, V: int) -> None:
    for name, value in (("P", P), ("M", M), ("V", V)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")


def _orders_to_table(P: int, M: int, V: int, orders, name: str) -> Schedule:
    """Turns per-device action orders into a table by unit-time list scheduling.

    Each tick, each device runs the next action of its order if that action's
    dependencies finished at earlier ticks, and idles otherwise.

    Args:
      P, M, V: schedule sizes.
      orders: ``P`` lists of ``(op, microbatch, chunk)`` tuples.
      name: the schedule's name.

    Returns:
      The validated Schedule.

    Raises:
      ScheduleError: if the orders deadlock or the table is illegal.
    """
    S = V * P
    done = {}
    rows, cursor, remaining = [], [0] * P, sum(len(order) for order in orders)
    while remaining:
        t, row = len(rows), [(IDLE, -1, -1)] * P
        for p in range(P):
            if cursor[p] == len(orders[p]):
                continue
            op, m, c = orders[p][cursor[p]]
            s = c * P + p
            needs = [(FORWARD, m, s - 1)] if op == FORWARD and s > 0 else []
            if op == BACKWARD:
                needs = [(FORWARD, m, s)] + ([(BACKWARD, m, s + 1)] if s < S - 1 else [])
            if op == WEIGHT:
                needs = [(BACKWARD, m, s)]
            if all(done.get(need, t) < t for need in needs):
                row[p], cursor[p] = (op, m, c), cursor[p] + 1
                done[(op, m, s)] = t
        if all(cell[0] == IDLE for cell in row):
            stuck = [f"device {p} waits to run {_OP_NAMES.get(op, op)} of micro-batch {m} chunk {c}"
                     for p in range(P) if cursor[p] < len(orders[p]) for op, m, c in [orders[p][cursor[p]]]]
            raise ScheduleError(f"{name} orders deadlock at tick {t}: " + "; ".join(stuck))
        remaining -= sum(cell[0] != IDLE for cell in row)
        rows.append(row)
    table = np.array(rows, dtype=np.int32).reshape(len(rows), P, 3)
    schedule = Schedule(name, P, M, V, table[..., 0], table[..., 1], table[..., 2])
    validate(schedule)
    return schedule


def gpipe(P: int, M: int) -> Schedule:
    """GPipe: all forwards, then all backwards (Huang et al. 2019, "GPipe").

    Device ``p`` runs the forward of micro-batch ``m`` at tick ``p + m`` and its
    backward at tick ``(M + P - 1) + (P - 1 - p) + m``: ``2 (M + P - 1)`` ticks,
    and every device holds all M micro-batches at its peak. ``M < P`` is legal
    (just mostly bubble).

    Args:
      P: pipe devices.
      M: micro-batches.

    Returns:
      The validated Schedule (V = 1).

    Raises:
      ValueError: if P or M is not an int >= 1.
    """
    _check_sizes(P, M, 1)
    orders = [[(FORWARD, m, 0) for m in range(M)] + [(BACKWARD, m, 0) for m in range(M)] for _ in range(P)]
    return _orders_to_table(P, M, 1, orders, "gpipe")


def _one_f_one_b_orders(P: int, M: int, fused: bool = False) -> list[list[tuple[int, int, int]]]:
    orders = []
    for p in range(P):
        warmup = min(max(2 * (P - 1 - p) - 1, 0) if fused else P - 1 - p, M)
        order = [(FORWARD, m, 0) for m in range(warmup)]
        for m in range(M - warmup):
            order += [(FORWARD, m + warmup, 0), (BACKWARD, m, 0)]
        orders.append(order + [(BACKWARD, m, 0) for m in range(M - warmup, M)])
    return orders


def one_f_one_b(P: int, M: int, fused: bool = False) -> Schedule:
    """1F1B: PipeDream-Flush, Megatron-LM's non-interleaved schedule.

    Device ``p`` runs ``min(P - 1 - p, M)`` warm-up forwards, then alternates
    one forward and one backward, then drains the remaining backwards
    (Narayanan et al. 2019, "PipeDream"; Narayanan et al. 2021, "Memory-
    Efficient Pipeline-Parallel DNN Training"). Same ``2 (M + P - 1)`` ticks as
    GPipe, but device ``p`` holds at most ``min(P - p, M)`` micro-batches.
    ``M < P`` is legal.

    ``fused=True`` gives the order for an executor that runs a forward and a
    backward in one lock-step tick (``ticks.pack``): ``2 (P - 1 - p) - 1``
    warm-up forwards (device ``P - 1``: none), so that in the steady state
    every device's next forward and next backward are both ready at each
    tick. Packed, it takes the event-driven 1F1B time, where the standard
    order leaves devices waiting every other tick for ``P > 2``; device ``p``
    then holds up to ``min(2 (P - 1 - p), M)`` micro-batches (still bounded
    by P, not M).

    Args:
      P: pipe devices.
      M: micro-batches.
      fused: warm-up for packed ticks (see above).

    Returns:
      The validated Schedule (V = 1).

    Raises:
      ValueError: if P or M is not an int >= 1.
    """
    _check_sizes(P, M, 1)
    return _orders_to_table(P, M, 1, _one_f_one_b_orders(P, M, fused), "1f1b")


def interleaved_1f1b(P: int, M: int, V: int) -> Schedule:
    """Megatron-LM interleaved 1F1B over V chunks per device.

    Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
    GPU Clusters Using Megatron-LM". Micro-batches go through the chunks in
    groups of P; device ``p`` runs ``2 (P - 1 - p) + (V - 1) P`` warm-up
    forwards (capped at ``V M``), then alternates one forward and one
    backward, then drains. The bubble shrinks V-fold: with every chunk costing
    the same, ``(P - 1) / (V M + P - 1)`` of the time is idle. With ``V = 1``
    the table equals :func:`one_f_one_b`'s.

    Args:
      P: pipe devices.
      M: micro-batches, a multiple of P.
      V: chunks per device.

    Returns:
      The validated Schedule.

    Raises:
      ValueError: if P, M or V is not an int >= 1, or M is not a multiple of P.
    """
    _check_sizes(P, M, V)
    if M % P:
        raise ValueError(f"interleaved 1F1B needs M to be a multiple of P, got M={M}, P={P}")
    if V == 1:
        return _orders_to_table(P, M, 1, _one_f_one_b_orders(P, M), "interleaved")
    total, group = V * M, V * P

    def action(op: int, k: int) -> tuple[int, int, int]:
        chunk = (k % group) // P
        return op, (k // group) * P + k % P, chunk if op == FORWARD else V - 1 - chunk

    orders = []
    for p in range(P):
        warmup = min(2 * (P - 1 - p) + (V - 1) * P, total)
        order = [action(FORWARD, k) for k in range(warmup)]
        for k in range(total - warmup):
            order += [action(FORWARD, k + warmup), action(BACKWARD, k)]
        orders.append(order + [action(BACKWARD, k) for k in range(total - warmup, total)])
    return _orders_to_table(P, M, V, orders, "interleaved")


def _zb_h1_orders(P: int, M: int, fused: bool = False) -> list[list[tuple[int, int, int]]]:
    orders = []
    for p in range(P):
        warmup = min(max(2 * (P - 1 - p) - 1, 0) if fused else P - 1 - p, M)
        lag = p + 1 if fused else p  # the W of micro-batch i - lag follows B(i)
        order, weights = [(FORWARD, m, 0) for m in range(warmup)], 0
        for i in range(M):
            order += ([(FORWARD, warmup + i, 0)] if warmup + i < M else []) + [(BACKWARD, i, 0)]
            if i - lag >= weights:
                order.append((WEIGHT, weights, 0))
                weights += 1
        orders.append(order + [(WEIGHT, m, 0) for m in range(weights, M)])
    return orders


def zb_h1(P: int, M: int, fused: bool = False) -> Schedule:
    """ZB-H1: 1F1B with each backward split into B and W (Qi et al., ICLR 2024).

    "Zero Bubble Pipeline Parallelism": B (the input gradient) stays on the
    critical path where 1F1B's backward was; W (the weight gradient) is
    deferred into the cool-down bubble. Device ``p`` runs 1F1B's
    ``P - 1 - p`` warm-up forwards, then for each micro-batch ``i`` the
    next forward, ``B(i)`` and ``W(i - p)``; the ``p`` deferred Ws run last.
    With equal F, B and W every device is busy from its first B to the end:
    the makespan is ``3M + P - 1`` time units for ``M >= P`` (1F1B with
    ``B + W`` as one backward: ``3 (M + P - 1)``), so the bubble is
    ``(P - 1) / (3M + P - 1)``; for ``M < P`` it is ``2M + 2P - 1``. A device
    holds at most ``min(P, M)`` micro-batches between forward and W, 1F1B's
    peak (reached by its device 0).

    ``fused=True`` gives the order for packed ticks (``ticks.pack``, one F,
    one B and one W lane): 1F1B's fused warm-up and ``W(i - 1 - p)`` after
    ``B(i)``, so that the deferred Ws keep the warm-up ticks at ``F + B``.
    Packed with equal F, B and W it takes ``3M + 2P - 2`` units for large
    enough M (fused 1F1B: ``3M + 3P - 3``; property-tested in
    ``tests/test_zero_bubble.py``); device ``p`` then holds up to
    ``2P - 1 - p`` micro-batches between forward and W (fused 1F1B:
    ``2 (P - 1 - p)``).

    Args:
      P: pipe devices.
      M: micro-batches.
      fused: the order for packed ticks (see above).

    Returns:
      The validated, split Schedule (V = 1).

    Raises:
      ValueError: if P or M is not an int >= 1.
    """
    _check_sizes(P, M, 1)
    return _orders_to_table(P, M, 1, _zb_h1_orders(P, M, fused), "zb_h1")


def make_schedule(name: str, P: int, M: int, V: int = 1, fused: bool = False) -> Schedule:
    """Builds a schedule by name.

    Args:
      name: one of ``"gpipe"``, ``"1f1b"``, ``"interleaved"``, ``"zb_h1"``.
      P: pipe devices.
      M: micro-batches.
      V: chunks per device; must be 1 for ``"gpipe"`` and ``"1f1b"``.
      fused: for ``"1f1b"`` and ``"zb_h1"``, the order for packed ticks
        (see :func:`one_f_one_b`, :func:`zb_h1`); the table executor runs
        that one.

    Returns:
      The validated Schedule.

    Raises:
      ValueError: for an unknown name, bad sizes, or ``V != 1`` with a
        non-interleaved schedule.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; valid names are {', '.join(SCHEDULE_NAMES)}")
    _check_sizes(P, M, V)
    if name == "interleaved":
        return interleaved_1f1b(P, M, V)
    if V != 1:
        raise ValueError(f"schedule {name!r} has one chunk per device, got V={V}; use 'interleaved'")
    if name == "zb_h1":
        return zb_h1(P, M, fused)
    return gpipe(P, M) if name == "gpipe" else one_f_one_b(P, M, fused)


def _action_ticks(schedule: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[M, S]`` tick of the first FORWARD / BACKWARD / WEIGHT of each (m, s); -1 if none."""
    ticks = np.full((4, schedule.num_microbatches, schedule.num_stages), -1, np.int64)
    stage = schedule.stage
    for t, p in reversed(list(zip(*np.nonzero(schedule.op != IDLE)))):
        op, m, s = schedule.op[t, p], schedule.microbatch[t, p], stage[t, p]
        if op in _OP_NAMES and 0 <= m < schedule.num_microbatches and 0 <= s < schedule.num_stages:
            ticks[op, m, s] = t
    return ticks[FORWARD], ticks[BACKWARD], ticks[WEIGHT]


def _check_legal(schedule: Schedule) -> None:
    P, M, V, S = schedule.num_devices, schedule.num_microbatches, schedule.virtual_stages, schedule.num_stages
    fwd, bwd, wgt = _action_ticks(schedule)
    first_of = {FORWARD: fwd, BACKWARD: bwd, WEIGHT: wgt}

    def when(ticks, what, m, s):
        t = ticks[m, s]
        return f"({what} never runs)" if t < 0 else f"(sent at tick {t}, arrives tick {t + 1})"

    for t in range(schedule.num_ticks):
        for p in range(P):
            op, m, c = (int(a[t, p]) for a in (schedule.op, schedule.microbatch, schedule.chunk))
            where = f"tick {t}, device {p}: "
            if op == IDLE:
                if m != -1 or c != -1:
                    raise ScheduleError(
                        where + f"IDLE cell must have micro-batch and chunk -1, got {m} and {c}")
                continue
            if op not in _OP_NAMES:
                raise ScheduleError(
                    where + f"unknown op {op} (expected IDLE=0, FORWARD=1, BACKWARD=2, WEIGHT=3)")
            if not 0 <= c < V:
                raise ScheduleError(where + f"chunk {c} out of range [0, {V})")
            if not 0 <= m < M:
                raise ScheduleError(where + f"micro-batch {m} out of range [0, {M})")
            s = c * P + p
            what = f"{_OP_NAMES[op]} of micro-batch {m} stage {s}"
            first = first_of[op][m, s]
            if first != t:
                raise ScheduleError(where + f"second {what} (first at tick {first})")
            if op == FORWARD and s > 0 and not 0 <= fwd[m, s - 1] < t:
                raise ScheduleError(
                    where + f"{what} before its input arrives from stage {s - 1} "
                    + when(fwd, f"FORWARD of stage {s - 1}", m, s - 1))
            if op == BACKWARD and not 0 <= fwd[m, s] < t:
                own = "never runs" if fwd[m, s] < 0 else f"at tick {fwd[m, s]}"
                raise ScheduleError(where + f"{what} before its own FORWARD ({own})")
            if op == BACKWARD and s < S - 1 and not 0 <= bwd[m, s + 1] < t:
                raise ScheduleError(
                    where + f"{what} before its gradient arrives from stage {s + 1} "
                    + when(bwd, f"BACKWARD of stage {s + 1}", m, s + 1))
            if op == WEIGHT and not 0 <= bwd[m, s] < t:
                own = "never runs" if bwd[m, s] < 0 else f"at tick {bwd[m, s]}"
                raise ScheduleError(where + f"{what} before its own BACKWARD ({own})")
    ops = ((fwd, FORWARD), (bwd, BACKWARD)) + (((wgt, WEIGHT),) if (wgt >= 0).any() else ())
    for ticks, op in ops:
        missing = np.argwhere(ticks < 0)
        if len(missing):
            m, s = (int(i) for i in missing[0])
            split = " (a split table needs a WEIGHT for every micro-batch and stage)" if op == WEIGHT else ""
            raise ScheduleError(
                f"{_OP_NAMES[op]} of micro-batch {m} stage {s} never runs "
                f"(belongs on device {s % P}, chunk {s // P}){split}")


def _live(intervals, T: int, P: int) -> np.ndarray:
    """``[T, P]`` how many of the ``(p, start, end)`` intervals (ticks inclusive) each device holds per tick."""
    live = np.zeros((T + 1, P), np.int64)
    for p, start, end in intervals:
        live[start, p] += 1
        live[end + 1, p] -= 1
    return np.cumsum(live, axis=0)[:T]


def _held(schedule: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[T, P]`` activations held, gradients waiting and (m, s) in flight per tick and device.

    The input of (m, s), s > 0, is held from its arrival (the sender's forward
    tick + 1) through the tick of BACKWARD(m, s); the gradient for (m, s),
    s < S - 1, from the tick after BACKWARD(m, s + 1) through BACKWARD(m, s);
    (m, s) is in flight from its FORWARD through its BACKWARD (in a split
    table: its WEIGHT). These are properties of the table; the slots the
    executor indexes are ``ticks.tick_buffers``'s, for packed ticks.
    """
    P, S, T = schedule.num_devices, schedule.num_stages, schedule.num_ticks
    fwd, bwd, wgt = _action_ticks(schedule)
    done = wgt if schedule.split else bwd
    acts, grads, flight = [], [], []
    for m in range(schedule.num_microbatches):
        for s in range(S):
            flight.append((s % P, fwd[m, s], done[m, s]))
            if s > 0:
                acts.append((s % P, fwd[m, s - 1] + 1, bwd[m, s]))
            if s < S - 1:
                grads.append((s % P, bwd[m, s + 1] + 1, bwd[m, s]))
    return _live(acts, T, P), _live(grads, T, P), _live(flight, T, P)


def peak_in_flight(schedule: Schedule) -> np.ndarray:
    """``[P]`` the most (micro-batch, stage) pairs each device holds at once.

    A pair is in flight from its FORWARD until its BACKWARD (in a split
    table: its WEIGHT) has run: the activation memory a schedule needs.

    Raises:
      ScheduleError: if the schedule is not legal.
    """
    _check_legal(schedule)
    return _held(schedule)[2].max(axis=0, initial=0)


def validate(schedule: Schedule, max_act_slots: int | None = None, max_grad_slots: int | None = None,
             max_in_flight: int | None = None) -> None:
    """Proves a schedule table legal.

    Checks that every cell is well formed (op, micro-batch in ``[0, M)``, chunk
    in ``[0, V)``), that every (m, s) runs exactly one FORWARD and one
    BACKWARD (and, in a split table, exactly one WEIGHT, on the same device
    at a later tick than its BACKWARD), that each action's inputs have
    arrived (a boundary sent at tick t arrives at t + 1), and that the
    buffers fit the given slot counts and memory bound.

    Args:
      schedule: the table.
      max_act_slots: if given, the most activation slots a device may use.
      max_grad_slots: if given, the most gradient slots a device may use.
      max_in_flight: if given, the most (micro-batch, stage) pairs a device
        may hold between their FORWARD and their last backward action (the
        activation memory bound, e.g. 1F1B's peak for ZB-H1).

    Raises:
      ScheduleError: naming the first bad tick and device and what is wrong.
    """
    _check_legal(schedule)
    live_a, live_g, flight = _held(schedule)
    for live, limit, what, field in ((live_a, max_act_slots, "activations held", "max_act_slots"),
                                     (live_g, max_grad_slots, "gradients waiting", "max_grad_slots"),
                                     (flight, max_in_flight, "micro-batches in flight", "max_in_flight")):
        if limit is not None and (live > limit).any():
            t, p = (int(i) for i in np.argwhere(live > limit)[0])
            raise ScheduleError(
                f"tick {t}, device {p}: {live[t, p]} {what} at once, more than {field}={limit}")
