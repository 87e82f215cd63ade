"""The planner: predict each candidate schedule (``prediction.py``), pick the fastest.

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

from .calibrate import Calibration
from .partition import Piece, fractional_partition, partition_layers, pieces_from_counts
from .prediction import Candidate, crossing_bytes, predict

__all__ = ["AUTO_ORDERS", "FRACTIONAL_MARGIN", "ORDER_MARGIN", "Candidate", "Plan", "balanced_stages",
           "crossing_bytes", "departure_margin", "describe_plan", "make_plan", "predict"]


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


def balanced_stages(total, num_stages: int, rows: int, splittable, step_time=None) -> tuple:
    """Fractional stages: equal costs, then (given ``step_time``) cuts moved to the least predicted step.

    With a calibration or measured piece costs the prediction prices what
    equal costs leave out (a piece runs fewer rows less efficiently; a split
    layer's pieces each add a full-size weight gradient; the last stage's
    folded forward; messages and ticks), so the best cut is not always at
    equal costs. Each cut's share of the cost line moves by
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


def describe_plan(
    stages, schedule: str, virtual_stages: int, cut: str, *, layer_names, unsplittable=(), unit="flop", **common
) -> Plan:
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
    piece_scale: tuple | None = None,
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
      piece_scale: measured cost of a split layer's pieces at their rows
        (``Profile.piece_scale``; ``None``: their share of rows); with it
        or a calibration, fractional cuts move to the least predicted step
        (``balanced_stages``).

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
                  residual_bytes=residual_bytes, calibration=calibration, boundary_bytes=boundary_bytes,
                  piece_scale=piece_scale)
    descend = calibration is not None or piece_scale is not None
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
                                                 step_time if descend else None)
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
