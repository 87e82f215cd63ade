"""Event-driven timing of a schedule table under per-stage costs.

The table fixes each device's order of work; the simulator gives every action
real durations and starts it as soon as its device is free and its inputs are
there. It predicts the makespan and bubble of an asynchronous pipeline, and,
for comparison, the time of a lock-step run in which every tick lasts as long
as its slowest action (what a one-action-per-tick SPMD executor does), and
each device's peak of micro-batches in flight (``schedule.peak_in_flight``).
``docs/design.md``, "How performance is measured", says where these
predictions are used.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .schedule import BACKWARD, FORWARD, IDLE, WEIGHT, Schedule, peak_in_flight


def _cost_array(value, field: str) -> np.ndarray:
    array = np.array(value, dtype=np.float64)
    if array.ndim not in (0, 2):
        raise ValueError(f"Costs.{field} must be a scalar or a [P, V] array, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"Costs.{field} must be finite and >= 0, got {value!r}")
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True)
class Costs:
    """Durations of one micro-batch's work, in any time unit.

    A backward is B (the input gradient, ``backward``) plus W (the weight
    gradient, ``weight``). A split table (``Schedule.split``) runs them as
    separate BACKWARD and WEIGHT actions; any other table's BACKWARD costs
    ``backward + weight``, so with ``weight = 0`` (the default) ``backward``
    is the whole backward.

    Attributes:
      forward: ``[P, V]`` forward time of (device, chunk), or a scalar for all.
      backward: ``[P, V]`` backward time of (device, chunk), or a scalar: the
        input-gradient part when ``weight`` is given.
      comm: time added to every boundary that crosses devices.
      weight: ``[P, V]`` weight-gradient time of (device, chunk), or a scalar.
    """

    forward: np.ndarray
    backward: np.ndarray
    comm: float = 0.0
    weight: np.ndarray = 0.0

    def __post_init__(self):
        for field in ("forward", "backward", "weight"):
            object.__setattr__(self, field, _cost_array(getattr(self, field), field))
        comm = float(self.comm)
        if not np.isfinite(comm) or comm < 0:
            raise ValueError(f"Costs.comm must be finite and >= 0, got {self.comm!r}")
        object.__setattr__(self, "comm", comm)

    @classmethod
    def uniform(cls, P: int, V: int = 1, forward: float = 1.0, backward: float = 2.0,
                comm: float = 0.0, weight: float = 0.0) -> Costs:
        """Equal stages: the model is split evenly over P devices and V chunks.

        Args:
          P: pipe devices.
          V: chunks per device.
          forward: forward time of one micro-batch through ONE DEVICE's share
            of the model (all its V chunks); each chunk costs ``forward / V``,
            so schedules with different V do the same total work.
          backward: likewise for the backward (its input-gradient part
            when ``weight`` is given).
          comm: time per cross-device hop.
          weight: likewise for the weight-gradient part.

        Returns:
          Costs with ``[P, V]`` arrays.

        Raises:
          ValueError: if P or V is below 1, or a cost is negative or not finite.
        """
        if P < 1 or V < 1:
            raise ValueError(f"Costs.uniform needs P >= 1 and V >= 1, got P={P}, V={V}")
        return cls(np.full((P, V), forward / V), np.full((P, V), backward / V), comm,
                   np.full((P, V), weight / V))

    def per_stage(self, P: int, V: int, split: bool = False) -> tuple[np.ndarray, ...]:
        """Forward and backward costs broadcast to ``[P, V]``.

        Args:
          P, V: the schedule's sizes.
          split: return ``(forward, backward, weight)`` for a split table;
            otherwise ``(forward, backward + weight)``.

        Raises:
          ValueError: if the arrays do not have shape ``[P, V]`` (or are scalars).
        """
        out = []
        for field in ("forward", "backward", "weight"):
            array = getattr(self, field)
            if array.ndim == 2 and array.shape != (P, V):
                raise ValueError(
                    f"Costs.{field} has shape {array.shape}, the schedule needs [P, V] = {(P, V)}")
            out.append(np.broadcast_to(array, (P, V)))
        return tuple(out) if split else (out[0], out[1] + out[2])


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Timing of one schedule under one set of costs.

    Attributes:
      schedule: the simulated table.
      costs: the costs used.
      start: ``[T, P]`` start time of each action, nan where idle.
      end: ``[T, P]`` end time of each action, nan where idle.
      makespan: time at which the last action ends.
      busy: ``[P]`` total compute time of each device.
      bubble_fraction: ``1 - sum(busy) / (P * makespan)``.
      peak_in_flight: ``[P]`` the most (micro-batch, stage) pairs in flight
        per device (``schedule.peak_in_flight``).
      lockstep_makespan: time of a lock-step run, see :func:`lockstep_time`.
    """

    schedule: Schedule
    costs: Costs
    start: np.ndarray
    end: np.ndarray
    makespan: float
    busy: np.ndarray
    bubble_fraction: float
    peak_in_flight: np.ndarray
    lockstep_makespan: float


def _action_costs(schedule: Schedule, costs: Costs) -> np.ndarray:
    """``[T, P]`` duration of each table cell (0 where idle)."""
    fwd, bwd, wgt = costs.per_stage(schedule.num_devices, schedule.virtual_stages, split=True)
    if not schedule.split:
        bwd = bwd + wgt
    devices = np.broadcast_to(np.arange(schedule.num_devices), schedule.op.shape)
    chunk = np.maximum(schedule.chunk, 0)
    by_op = {FORWARD: fwd, BACKWARD: bwd, WEIGHT: wgt}
    return sum(np.where(schedule.op == op, cost[devices, chunk], 0.0) for op, cost in by_op.items())


def _check_types(schedule, costs) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a jaxpipe.Schedule (e.g. make_schedule('1f1b', P, M)), got {type(schedule).__name__}")
    if not isinstance(costs, Costs):
        raise TypeError(f"costs must be a jaxpipe.Costs (e.g. Costs.uniform(P)), got {type(costs).__name__}")


def lockstep_time(schedule: Schedule, costs: Costs) -> float:
    """Time of a lock-step run: each tick lasts as long as its slowest action.

    A tick in which some boundary crosses devices also pays ``costs.comm``.

    Args:
      schedule: the table.
      costs: per-stage costs.

    Returns:
      The summed tick durations.
    """
    _check_types(schedule, costs)
    duration = _action_costs(schedule, costs)
    stage, S = schedule.stage, schedule.num_stages
    sends = ((schedule.op == FORWARD) & (stage < S - 1)) | ((schedule.op == BACKWARD) & (stage > 0))
    hop = costs.comm * (sends.any(axis=1) & (schedule.num_devices > 1))
    return float(np.sum(duration.max(axis=1, initial=0.0) + hop))


def simulate(schedule: Schedule, costs: Costs) -> SimResult:
    """Runs the table event by event.

    Each device runs its actions in tick order. An action starts at the latest
    of: its device becoming free, and the end of each dependency (FORWARD of
    the previous stage; for a BACKWARD, its own FORWARD and the BACKWARD of
    the next stage; for a WEIGHT, its own BACKWARD), plus ``costs.comm`` when
    the dependency ran on another device.

    Args:
      schedule: a legal table.
      costs: per-stage costs; arrays must be ``[P, V]`` or scalars.

    Returns:
      The SimResult.

    Raises:
      ValueError: if the costs do not fit the schedule.
      ScheduleError: if the schedule is not legal.
      TypeError: if ``schedule`` is not a Schedule or ``costs`` not Costs.
    """
    _check_types(schedule, costs)
    in_flight = peak_in_flight(schedule)
    P, S = schedule.num_devices, schedule.num_stages
    duration = _action_costs(schedule, costs)
    start = np.full(schedule.op.shape, np.nan)
    end = np.full(schedule.op.shape, np.nan)
    finished = {}
    free = np.zeros(P)
    stage = schedule.stage
    for t in range(schedule.num_ticks):
        for p in range(P):
            op = schedule.op[t, p]
            if op == IDLE:
                continue
            m, s = int(schedule.microbatch[t, p]), int(stage[t, p])
            needs = [(FORWARD, s - 1)] if op == FORWARD and s > 0 else []
            if op == BACKWARD:
                needs = [(FORWARD, s)] + ([(BACKWARD, s + 1)] if s < S - 1 else [])
            if op == WEIGHT:
                needs = [(BACKWARD, s)]
            ready = free[p]
            for need_op, need_s in needs:
                hop = costs.comm if need_s % P != p else 0.0
                ready = max(ready, finished[(need_op, m, need_s)] + hop)
            start[t, p], end[t, p] = ready, ready + duration[t, p]
            free[p] = end[t, p]
            finished[(int(op), m, s)] = end[t, p]
    makespan = float(np.nanmax(end, initial=0.0))
    busy = duration.sum(axis=0)
    bubble = 1.0 - float(busy.sum()) / (P * makespan) if makespan > 0 else 0.0
    for array in (start, end, busy):
        array.flags.writeable = False
    return SimResult(schedule=schedule, costs=costs, start=start, end=end, makespan=makespan,
                     busy=busy, bubble_fraction=bubble, peak_in_flight=in_flight,
                     lockstep_makespan=lockstep_time(schedule, costs))
