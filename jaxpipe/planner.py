"""The planner: predict each candidate schedule with the simulator, pick the fastest.

Pure NumPy over per-layer costs (``docs/design.md``, "Pure planning"). A
candidate is a partition (integer min-max cuts, or fractional cuts that split layers by
rows) with an order (GPipe, 1F1B, interleaved 1F1B with V chunks, ZB-H1). Each is
turned into per-stage forward and backward costs as the table executor pays
them and timed on the packed ticks the executor runs (``ticks.py``: up to one
forward and one backward per device per tick, each tick as long as its
slowest device). The plain plan
(integer cuts, 1F1B) is always predicted too, so the printout shows what the
choice gains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .partition import (
    Piece,
    fractional_partition,
    partition_layers,
    pieces_from_counts,
    stage_loads,
)
from .schedule import make_schedule
from .calibrate import Calibration
from .simulate import Costs
from .ticks import pack, tick_buffers, tick_time


# The orders ``make_plan`` may choose; it predicts ZB-H1 too (shown among the candidates) but
# does not pick it: experiment 08 measured it 4-5% slower than 1F1B at M = 4 on 2 processes
# (its W inputs add data movement, and the heavy stage of an uneven cut has little bubble to fill).
AUTO_ORDERS = ("1f1b", "gpipe", "interleaved")

# A fractional cut must be predicted at least this much faster than the fastest integer plan
# for ``make_plan`` to choose it. The prediction leaves out what a split layer costs beyond its
# share of flops (its pieces run fewer rows, less efficiently; its parameter copies are merged
# and synced every step); in experiment 01 fractional plans measured 4 % and 12 % slower than
# predicted relative to plain 1F1B (a 1.07x prediction measured 0.95x).
FRACTIONAL_MARGIN = 1.10

# Any other departure from plain 1F1B on integer cuts (GPipe, interleaved, remat) must be predicted
# at least this much faster than plain: a prediction within a few percent is a tie, and the
# extra ticks and slots of interleaving are priced only with a calibration (experiment 01 (c):
# interleaved V=2 predicted 1.00x plain with one).
ORDER_MARGIN = 1.03


def departure_margin(candidate: Candidate, plain: Candidate | None) -> float:
    """How much faster than plain ``candidate`` must be predicted for ``make_plan`` to choose it."""
    if plain is None or candidate is plain:
        return 1.0
    return FRACTIONAL_MARGIN if candidate.cut == "fractional" else ORDER_MARGIN


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen configuration, the plain one, and why.

    Attributes:
      chosen: the candidate picked.
      plain: integer cuts with the 1F1B order, for comparison; ``None``
        when the model has fewer layers than pipe devices (no integer cut
        exists, only fractional ones).
      candidates: every candidate predicted.
      layer_names: class name of each layer.
      unsplittable: layers that mix rows (or were marked) and are never split.
      num_microbatches: M.
      rows: B, rows per micro-batch.
      unit: what the costs measure (``"s"`` for profiled seconds, ``"flop"``).
      reason: why ``chosen`` won.
    """

    chosen: Candidate
    plain: Candidate | None
    candidates: tuple[Candidate, ...]
    layer_names: tuple[str, ...]
    unsplittable: tuple[int, ...]
    num_microbatches: int
    rows: int
    unit: str
    reason: str

    def __str__(self) -> str:
        c, num_devices = self.chosen, len(self.chosen.loads)
        lines = [
            f"plan: {c.label}, M={self.num_microbatches} micro-batches of B={self.rows} rows, "
            f"P={num_devices} pipe devices (costs in {self.unit})",
        ]
        for p in range(num_devices):
            stages = [c.stages[v * num_devices + p] for v in range(c.virtual_stages)]
            work = ", ".join(_piece_text(piece, self.layer_names, self.rows) for s in stages for piece in s)
            lines.append(
                f"  device {p}: load {c.loads[p]:.4g}  memory {c.memory[p] / 2**20:.1f} MiB  | {work}"
            )
        mean, plain = float(np.mean(c.loads)), self.plain
        if plain is None:
            lines.append(f"  max/mean load: chosen {float(np.max(c.loads)) / mean:.3f}")
            lines.append(
                f"  predicted step: chosen {c.step_time:.4g}, plain 1f1b impossible "
                f"({len(self.layer_names)} layers < {num_devices} pipe devices)"
            )
        else:
            lines.append(
                f"  max/mean load: chosen {float(np.max(c.loads)) / mean:.3f}, "
                f"plain {float(np.max(plain.loads)) / float(np.mean(plain.loads)):.3f}"
            )
            lines.append(
                f"  predicted step: chosen {c.step_time:.4g}, plain 1f1b {plain.step_time:.4g} "
                f"({plain.step_time / c.step_time:.2f}x)"
            )
        if self.unsplittable:
            names = ", ".join(f"{i} ({self.layer_names[i]})" for i in self.unsplittable)
            lines.append(f"  never split (rows mix or marked): {names}")
        lines.append("  candidates: " + "; ".join(
            f"{k.label} {k.step_time:.4g}{'' if k.fits else ' (over memory)'}" for k in self.candidates
        ))
        lines.append(f"  reason: {self.reason}")
        return "\n".join(lines)


def _piece_text(piece: Piece, names: Sequence[str], rows: int) -> str:
    text = f"{piece.layer}:{names[piece.layer]}"
    if piece.stop - piece.start < rows:
        text += f"[rows {piece.start}:{piece.stop}]"
    return text


def _stage_costs(stages, forward, backward, num_devices, virtual_stages, rows, remat=False):
    """``[P, V]`` forward and backward costs as the table executor pays them.

    The last stage's forward is folded into its backward; with ``remat`` every
    other backward recomputes its stage's forward too.
    """
    shape = (virtual_stages, num_devices)
    fwd = stage_loads(forward, stages, rows)
    bwd = stage_loads(backward, stages, rows) + (fwd if remat else 0.0)
    bwd[-1] += 0.0 if remat else fwd[-1]
    fwd[-1] = 0.0
    return fwd.reshape(shape).T, bwd.reshape(shape).T


def _split_costs(stages, forward, backward, num_devices, rows, remat=False):
    """``[P, 1]`` forward, B and W costs for a split (zero-bubble) table.

    Per-layer costs give no split of the backward, so half of each stage's
    backward is taken as W: a matmul's backward is one matmul for the input
    gradient and one for the weight gradient. Stage 0's input gradient is
    never needed, so all its backward (and, with ``remat``, its recompute)
    is W and its B is empty; the last stage's B holds its folded forward.
    """
    fwd = stage_loads(forward, stages, rows)
    bwd = stage_loads(backward, stages, rows)
    weight = bwd / 2
    own = bwd / 2 + (fwd if remat else 0.0)
    own[-1] = bwd[-1] / 2 + fwd[-1]
    if len(stages) > 1:
        weight[0], own[0] = weight[0] + own[0], 0.0
    else:
        weight[0], own[0] = bwd[0], fwd[0]
    fwd[-1] = 0.0
    return tuple(a.reshape(1, num_devices).T for a in (fwd, own, weight))


def balanced_stages(total, num_stages: int, rows: int, splittable, step_time=None) -> tuple:
    """Fractional stages: equal costs, then (given ``step_time``) cuts moved to the least predicted step.

    With a calibration the prediction prices what equal costs leave out (a
    split layer's pieces each add a full-size weight gradient; the last
    stage's folded forward; messages and ticks), so the best cut is not
    always at equal costs. Each cut's share of the cost line moves by
    steps of 8 % of a stage's share, halved down to 0.5 %, while the
    prediction improves (coordinate descent).

    Args:
      total: ``[L]`` forward + backward cost per layer.
      num_stages: S.
      rows: B.
      splittable: ``[L]`` whether each layer may be split by rows.
      step_time: ``stages -> predicted seconds``, or ``None`` for equal costs.

    Raises:
      ValueError: as ``fractional_partition``, for the equal-cost cut.
    """
    stages = fractional_partition(total, num_stages, rows, splittable)
    if step_time is None or num_stages < 2:
        return stages
    shares, best = np.arange(1, num_stages) / num_stages, step_time(stages)
    for delta in (0.08, 0.04, 0.02, 0.01, 0.005):
        for _ in range(4):
            moved = False
            for s in range(num_stages - 1):
                for sign in (-1.0, 1.0):
                    trial = shares.copy()
                    trial[s] += sign * delta / num_stages
                    try:
                        candidate = fractional_partition(total, num_stages, rows, splittable, trial)
                    except ValueError:
                        continue
                    if candidate == stages:
                        continue
                    time = step_time(candidate)
                    if time < best * (1 - 1e-9):
                        shares, stages, best, moved = trial, candidate, time, True
            if not moved:
                break
    return stages


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

    Returns:
      The ``Candidate``.
    """
    table = make_schedule(schedule, num_devices, num_microbatches, virtual_stages, fused=True)
    if table.split:
        fwd, bwd, weight = _split_costs(stages, forward, backward, num_devices, rows, remat)
    else:
        (fwd, bwd), weight = _stage_costs(stages, forward, backward, num_devices, virtual_stages, rows, remat), 0.0
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
        copies = sum(param_bytes[p.layer] for stage in stages for p in stage) - sum(
            param_bytes[layer] for layer in {p.layer for stage in stages for p in stage})
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
    loads = stage_loads(np.asarray(forward) + np.asarray(backward), stages, rows)
    loads = loads.reshape(virtual_stages, num_devices).sum(axis=0)
    fits = max_memory is None or bool(np.all(memory <= max_memory))
    return Candidate(schedule, virtual_stages, cut, tuple(stages), loads, float(step_time), memory, fits, costs,
                     bool(remat), float(message_bytes))


def describe_plan(stages, schedule: str, virtual_stages: int, cut: str, *, layer_names, unsplittable=(), unit="flop", **common) -> Plan:
    """A ``Plan`` for a configuration the caller chose, beside the plain one.

    With fewer layers than pipe devices there is no plain (integer) plan:
    ``Plan.plain`` is ``None``.

    Args:
      stages: ``[S]`` tuples of pieces.
      schedule: the order.
      virtual_stages: V.
      cut: ``"integer"`` or ``"fractional"``.
      layer_names: ``[L]`` names for the printout.
      unsplittable: layers never split.
      unit: what the costs measure.
      **common: ``predict``'s remaining keyword arguments.

    Returns:
      The ``Plan``.
    """
    total = np.asarray(common["forward"]) + np.asarray(common["backward"])
    chosen = predict(stages, schedule, virtual_stages, cut, **common)
    plain = None
    if len(total) >= common["num_devices"]:
        counts = partition_layers(total, common["num_devices"])
        plain = predict(pieces_from_counts(counts, common["rows"]), "1f1b", 1, "integer", **common)
    candidates = (chosen,) if plain is None else (chosen, plain)
    return Plan(chosen, plain, candidates, tuple(layer_names), tuple(unsplittable), common["num_microbatches"],
                common["rows"], unit, "schedule and cut given by the caller")


def make_plan(
    forward: Sequence[float],
    backward: Sequence[float],
    num_devices: int,
    num_microbatches: int,
    rows: int,
    *,
    layer_names: Sequence[str],
    param_bytes: Sequence[float],
    message_bytes: float,
    unsplittable: Sequence[int] = (),
    max_memory_per_device: float | None = None,
    unit: str = "flop",
    residual_bytes: Sequence[float] | None = None,
    remat: bool | None = None,
    calibration: Calibration | None = None,
    boundary_bytes: Sequence[float] | None = None,
) -> Plan:
    """Predicts every candidate and picks the fastest that fits in memory.

    Candidates: integer and fractional cuts, each with the 1F1B, GPipe and
    ZB-H1 orders and, when M is a multiple of P, interleaved 1F1B for each V
    with ``V * P <= L``; with ``remat=None`` and a memory limit, each also
    with recomputation (``remat``). Equal predictions go to the earlier candidate in that
    order (integer before fractional, 1F1B first, saved residuals before
    remat). Fractional cuts with ZB-H1 are "balanced + zero bubble". ZB-H1
    candidates are predicted and listed but chosen only when nothing else
    fits (``AUTO_ORDERS``). A candidate other than plain 1F1B is chosen
    only when predicted ``departure_margin`` faster than plain: 1.10x for a
    fractional cut (``FRACTIONAL_MARGIN``), 1.03x for another order or remat
    on integer cuts (``ORDER_MARGIN``).
    With fewer layers than pipe devices (``L < P``) only fractional cuts
    exist: each device gets rows of some layer, and ``Plan.plain`` is
    ``None``.

    Args:
      forward: ``[L]`` per-layer forward costs of one micro-batch.
      backward: ``[L]`` per-layer backward costs.
      num_devices: P.
      num_microbatches: M.
      rows: B.
      layer_names: ``[L]`` names for the printout.
      param_bytes: ``[L]`` parameter bytes per layer.
      message_bytes: bytes of one packed message between stages.
      unsplittable: layers the balanced cut must not split.
      max_memory_per_device: bytes, or ``None`` for no limit.
      unit: what the costs measure, for the printout.
      residual_bytes: ``[L]`` residual bytes per layer and micro-batch, for
        the memory prediction.
      remat: force recomputation on (True) or off (False); ``None`` tries
        both when ``max_memory_per_device`` is given, else off.
      calibration: the machine's executor overheads; with it the costs must
        be seconds and every prediction is a step time in seconds
        (``predict``).
      boundary_bytes: ``[L + 1]`` bytes of each layer boundary; each
        candidate's message is then the largest boundary it sends.

    Returns:
      The ``Plan``.

    Raises:
      ValueError: if the per-layer arguments differ in length, no candidate
        fits in ``max_memory_per_device``, or ``L < P`` and no fractional cut
        exists (too few rows per micro-batch or unsplittable layers; the
        message says which).
    """
    forward, backward = np.asarray(forward, float), np.asarray(backward, float)
    unit = "s" if calibration is not None else unit
    sizes = {"forward": len(forward), "backward": len(backward), "layer_names": len(layer_names),
             "param_bytes": len(param_bytes)}
    if residual_bytes is not None:
        sizes["residual_bytes"] = len(residual_bytes)
    if len(set(sizes.values())) != 1:
        raise ValueError(f"make_plan needs one entry per layer in each per-layer argument, got lengths {sizes}")
    # Balance forward + backward: each device's work per micro-batch (and, in
    # the packed steady state, per tick) when residuals are saved.
    num_layers, total = len(forward), forward + backward
    common = dict(forward=forward, backward=backward, num_devices=num_devices,
                  num_microbatches=num_microbatches, rows=rows, param_bytes=param_bytes,
                  message_bytes=message_bytes, max_memory=max_memory_per_device,
                  residual_bytes=residual_bytes, calibration=calibration, boundary_bytes=boundary_bytes)
    remats = [bool(remat)] if remat is not None else [False] + ([True] if max_memory_per_device else [])
    splittable = [i not in set(unsplittable) for i in range(num_layers)]
    orders = [("1f1b", 1), ("gpipe", 1), ("zb_h1", 1)]
    if num_microbatches % num_devices == 0:
        orders += [("interleaved", v) for v in range(2, num_layers // num_devices + 1)]
    integer = num_layers >= num_devices
    if not integer:
        try:
            fractional_partition(total, num_devices, rows, splittable)
        except ValueError as err:
            raise ValueError(
                f"{num_layers} layers on {num_devices} pipe devices have no integer cut, "
                f"and no fractional one: {err}"
            ) from err
    candidates = []
    for again in remats:
        for cut in ("integer", "fractional") if integer else ("fractional",):
            for order, v in orders:
                if cut == "integer":
                    stages = pieces_from_counts(partition_layers(total, v * num_devices), rows)
                else:
                    def step_time(st, order=order, v=v, again=again):
                        return predict(st, order, v, "fractional", **common, remat=again).step_time

                    try:
                        stages = balanced_stages(total, v * num_devices, rows, splittable,
                                                 step_time if calibration is not None else None)
                    except ValueError:
                        continue
                candidates.append(predict(stages, order, v, cut, **common, remat=again))
    plain = candidates[0] if integer else None
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise ValueError(
            f"no schedule fits max_memory_per_device={max_memory_per_device:.4g} bytes; the "
            f"smallest needs {min(float(np.max(c.memory)) for c in candidates):.4g}: raise the "
            "limit, use more pipe devices, or smaller micro-batches"
        )
    eligible = [c for c in fitting if c.schedule in AUTO_ORDERS] or fitting
    chosen = min(eligible, key=lambda c: c.step_time * departure_margin(c, plain))
    if plain is None:
        reason = (
            f"no integer cut exists ({num_layers} layers < {num_devices} pipe devices); "
            f"{chosen.label} is the fastest predicted fractional plan"
        )
    elif chosen is plain:
        reason = "integer cuts with 1F1B are already the fastest predicted plan"
        best = min(eligible, key=lambda c: c.step_time)
        if best.step_time < plain.step_time:
            why = ("a fractional cut must clear (split layers cost more than their share of flops)"
                   if best.cut == "fractional" else "another order must clear (closer predictions are ties)")
            reason = (f"integer cuts with 1F1B are chosen: {best.label} is predicted only "
                      f"{plain.step_time / best.step_time:.2f}x faster, under the "
                      f"{departure_margin(best, plain):.2f}x {why}")
    else:
        reason = (
            f"{chosen.label} is predicted {plain.step_time / chosen.step_time:.2f}x faster than plain 1F1B"
            + (f" (max/mean load {float(np.max(plain.loads) / np.mean(plain.loads)):.2f} -> "
               f"{float(np.max(chosen.loads) / np.mean(chosen.loads)):.2f})" if chosen.cut == "fractional" else "")
        )
    if any(c.schedule not in AUTO_ORDERS and c.step_time < chosen.step_time for c in fitting):
        reason += ("; zb_h1 is predicted faster but not chosen automatically: on 2 real processes it "
                   "measured 0.72-0.95x of 1F1B at M = 4 (experiment 08); ask for it with schedule='zb_h1'")
    if len(fitting) < len(candidates):
        reason += f"; {len(candidates) - len(fitting)} candidate(s) exceed the memory limit"
    return Plan(chosen, plain, tuple(candidates), tuple(layer_names), tuple(unsplittable),
                num_microbatches, rows, unit, reason)
