"""Pricing one candidate: its step time and memory, predicted from per-layer costs.

A candidate is stages (pieces of layers) with an order and V. ``predict``
turns per-layer forward and backward costs into per-stage costs as the table
executor pays them (``_stage_costs``; split tables: ``_split_costs``), packs
the schedule into ticks (``ticks.pack``) and times them lock-step, each tick
as long as its slowest device. With a ``Calibration`` it adds the executor's
measured overheads and the result is seconds. Memory: parameters, optimizer
state and gradients, held messages (``crossing_bytes``: the message these
cuts send), saved residuals and W inputs. Pure NumPy; ``planner.py``
chooses among the candidates.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .calibrate import Calibration
from .partition import Piece, stage_loads
from .schedule import make_schedule
from .simulate import Costs
from .ticks import pack, tick_buffers, tick_time


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One predicted configuration.

    Attributes:
      schedule: the order: ``"gpipe"``, ``"1f1b"``, ``"interleaved"`` or ``"zb_h1"``.
      virtual_stages: V.
      cut: ``"integer"`` or ``"fractional"`` (layers split by rows).
      stages: ``[S]`` tuples of pieces.
      loads: ``[P]`` forward + backward cost of one micro-batch's share of the
        model on each device (what the cuts balance).
      step_time: predicted step time (cost units).
      memory: ``[P]`` predicted bytes per device (parameters, optimizer
        state and gradients as 4 x parameters, plus held messages).
      fits: whether every device's memory is within the limit.
      costs: ``[P, V]`` per-stage forward and backward costs as the table
        executor pays them (the last stage's forward is folded into its
        backward; with ``remat`` every backward includes its recompute;
        for ``"zb_h1"`` the backward split into B and W, see
        ``_split_costs``), from which ``step_time`` is predicted; ``simulate``
        them for a timeline.
      remat: whether backwards recompute their stage's forward instead of
        reading saved residuals.
      message_bytes: bytes of one message between its stages.
    """

    schedule: str
    virtual_stages: int
    cut: str
    stages: tuple[tuple[Piece, ...], ...]
    loads: np.ndarray
    step_time: float
    memory: np.ndarray
    fits: bool
    costs: Costs
    remat: bool = False
    message_bytes: float = 0.0

    @property
    def label(self) -> str:
        """e.g. ``interleaved V=2``, ``balanced`` (fractional 1F1B), ``gpipe fractional``."""
        if self.cut == "fractional" and self.schedule == "1f1b":
            return "balanced" + (" remat" if self.remat else "")
        return (
            self.schedule
            + (f" V={self.virtual_stages}" if self.virtual_stages > 1 else "")
            + (" fractional" if self.cut == "fractional" else "")
        ) + (" remat" if self.remat else "")


def _piece_loads(stages, forward, backward, rows, piece_scale=None):
    """``[S]`` forward and backward cost of each stage, pieces priced by ``piece_scale`` when measured."""
    fwd_scale, bwd_scale = piece_scale or (None, None)
    return stage_loads(forward, stages, rows, fwd_scale), stage_loads(backward, stages, rows, bwd_scale)


def _stage_costs(stages, forward, backward, num_devices, virtual_stages, rows, remat=False, piece_scale=None):
    """``[P, V]`` forward and backward costs as the table executor pays them.

    The last stage's forward is folded into its backward; with ``remat`` every
    other backward recomputes its stage's forward too.
    """
    shape = (virtual_stages, num_devices)
    fwd, bwd = _piece_loads(stages, forward, backward, rows, piece_scale)
    bwd = bwd + (fwd if remat else 0.0)
    bwd[-1] += 0.0 if remat else fwd[-1]
    fwd[-1] = 0.0
    return fwd.reshape(shape).T, bwd.reshape(shape).T


def _split_costs(stages, forward, backward, num_devices, rows, remat=False, piece_scale=None):
    """``[P, 1]`` forward, B and W costs for a split (zero-bubble) table.

    Per-layer costs give no split of the backward, so half of each stage's
    backward is taken as W: a matmul's backward is one matmul for the input
    gradient and one for the weight gradient. Stage 0's input gradient is
    never needed, so all its backward (and, with ``remat``, its recompute)
    is W and its B is empty; the last stage's B holds its folded forward.
    """
    fwd, bwd = _piece_loads(stages, forward, backward, rows, piece_scale)
    weight = bwd / 2
    own = bwd / 2 + (fwd if remat else 0.0)
    own[-1] = bwd[-1] / 2 + fwd[-1]
    if len(stages) > 1:
        weight[0], own[0] = weight[0] + own[0], 0.0
    else:
        weight[0], own[0] = bwd[0], fwd[0]
    fwd[-1] = 0.0
    return tuple(a.reshape(1, num_devices).T for a in (fwd, own, weight))


def crossing_bytes(stages, boundary_bytes) -> float:
    """Bytes of the message the executor sends for these stages: the largest boundary that crosses.

    As ``placement.place_stages`` decides: a stage's input crosses, and when
    the stage starts inside a layer (a split layer) that layer's output too,
    except the model output, whose pieces take their own rows' loss.
    """
    last = len(boundary_bytes) - 2
    needed = set()
    for stage in stages[1:]:
        first = stage[0]
        needed.add(first.layer)
        if first.start and first.layer != last:
            needed.add(first.layer + 1)
    return float(max((boundary_bytes[i] for i in needed), default=0.0))


def predict(
    stages, schedule: str, virtual_stages: int, cut: str, forward, backward, num_devices: int,
    num_microbatches: int, rows: int, param_bytes, message_bytes: float, max_memory: float | None,
    residual_bytes=None, remat: bool = False, calibration: Calibration | None = None, boundary_bytes=None,
    piece_scale=None,
) -> Candidate:
    """Predicts one configuration's step time and memory.

    The schedule is packed into executor ticks (``ticks.pack``: up to one
    forward and one backward per device per tick) and timed lock-step, each
    tick as long as its slowest device's work.

    Args:
      stages: ``[S]`` tuples of pieces.
      schedule: the order: ``"gpipe"``, ``"1f1b"``, ``"interleaved"`` or ``"zb_h1"``.
      virtual_stages: V.
      cut: ``"integer"`` or ``"fractional"``, for the label.
      forward: ``[L]`` per-layer forward cost of one micro-batch.
      backward: ``[L]`` per-layer backward cost.
      num_devices: P.
      num_microbatches: M.
      rows: B.
      param_bytes: ``[L]`` parameter bytes per layer.
      message_bytes: bytes of one encoded message (one activation slot).
      max_memory: bytes allowed per device, or ``None``.
      residual_bytes: ``[L]`` bytes of residuals a layer's forward saves for
        its backward, per micro-batch of B rows (``None``: not counted).
      remat: backwards recompute their forward instead (no residuals kept).
      calibration: the machine's executor overheads (``calibrate.py``), with
        ``forward`` and ``backward`` in seconds: each backward (W, split)
        also adds its pieces' weight gradients, and the step pays every tick's fixed time and
        data movement, the optimizer update and the merge and sync of
        split layers' parameter copies. The step time is then seconds on
        that machine. ``None``: compute only.
      boundary_bytes: ``[L + 1]`` bytes of each layer boundary (the model
        input, each layer's output) for one micro-batch; when given, the
        message is the largest boundary these stages send
        (``crossing_bytes``) instead of ``message_bytes``.
      piece_scale: ``([L, B + 1], [L, B + 1])`` measured forward and
        backward fraction of a layer's cost that a piece of ``r`` rows
        costs (``Profile.piece_scale``); ``None``: ``r / B``.

    Returns:
      The ``Candidate``.
    """
    table = make_schedule(schedule, num_devices, num_microbatches, virtual_stages, fused=True)
    if table.split:
        fwd, bwd, weight = _split_costs(stages, forward, backward, num_devices, rows, remat, piece_scale)
    else:
        (fwd, bwd), weight = _stage_costs(stages, forward, backward, num_devices, virtual_stages, rows, remat,
                                          piece_scale), 0.0
    if boundary_bytes is not None:
        message_bytes = crossing_bytes(stages, boundary_bytes)
    held = np.asarray([sum(param_bytes[p.layer] for p in stage) for stage in stages], np.float64)
    saved = np.zeros(len(stages))
    if residual_bytes is not None:
        saved = stage_loads(np.asarray(residual_bytes, float), stages, rows)
    overhead = 0.0
    ticks = pack(table)
    if calibration is not None:
        accumulate = calibration.accumulate(held).reshape(virtual_stages, num_devices).T
        if table.split:
            weight = weight + accumulate
        else:
            bwd = bwd + accumulate
        slot = 0.0 if remat else float(np.max(saved[:-1], initial=0.0))
        device_bytes = held.reshape(virtual_stages, num_devices).sum(axis=0)
        copies = float(held.sum()) - sum(param_bytes[layer] for layer in {p.layer for stage in stages for p in stage})
        overhead = calibration.step_overhead(ticks.num_ticks, message_bytes, slot, float(np.max(device_bytes)),
                                              num_devices, copies)
    costs = Costs(forward=fwd, backward=bwd, weight=weight)
    step_time = tick_time(ticks, fwd, bwd, weight=weight) + overhead
    buffers = tick_buffers(ticks)
    memory = np.zeros(num_devices)
    for s, stage_bytes in enumerate(held):
        memory[s % num_devices] += 4 * stage_bytes
    memory += (buffers.num_act_slots + buffers.num_grad_slots) * message_bytes
    if not remat:
        kept = saved.copy()
        kept[-1] = 0.0
        memory += buffers.num_act_slots * kept.reshape(virtual_stages, num_devices).max(axis=0)
    # A W input (what B computed for W) is estimated as one message plus the stage's residual bytes.
    memory += buffers.num_weight_slots * (message_bytes + saved.reshape(virtual_stages, num_devices).max(axis=0))
    loads = sum(_piece_loads(stages, forward, backward, rows, piece_scale))
    loads = loads.reshape(virtual_stages, num_devices).sum(axis=0)
    fits = max_memory is None or bool(np.all(memory <= max_memory))
    return Candidate(schedule, virtual_stages, cut, tuple(stages), loads, float(step_time), memory, fits, costs,
                     bool(remat), float(message_bytes))
