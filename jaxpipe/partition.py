"""The cut: the layer line divided into stages, whole layers or rows of a layer.

Pure Python over a cost vector (``docs/design.md``, "Pure planning" and
"Fractional (row-split) cuts"): exact integer cuts (``partition_layers``),
fractional cuts by rows (``fractional_partition``), both as ``Piece`` tuples
per stage. The costs come from ``costs.py``; which layers may be split by
rows from ``row_mixing.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np


def check_partition(
    partition: Sequence[int], num_layers: int, num_devices: int, virtual_stages: int = 1
) -> tuple[int, ...]:
    """Validates an explicit partition: layers per stage.

    With ``V = virtual_stages`` chunks per device there are ``S = V * P`` stages;
    stage ``s = c * P + p`` is chunk ``c`` of pipe device ``p``. With V = 1 a
    stage is a pipe device.

    Args:
      partition: ``[S]`` layer counts, e.g. ``(2, 1, 1, 2)``.
      num_layers: L.
      num_devices: P.
      virtual_stages: V.

    Returns:
      The partition as a tuple of ints.

    Raises:
      TypeError: if ``partition`` is not a sequence of ints.
      ValueError: if its length is not S, an entry is below 1, or it does not
        sum to L.
    """
    if isinstance(partition, (str, bytes)) or not isinstance(partition, Sequence) or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in partition
    ):
        raise TypeError(f"partition must be a sequence of ints (layers per pipe device), got {partition!r}")
    partition = tuple(int(n) for n in partition)
    num_stages = num_devices * virtual_stages
    where = (
        f"{num_devices} pipe devices" if virtual_stages == 1
        else f"{num_stages} stages ({virtual_stages} virtual stages x {num_devices} pipe devices)"
    )
    if len(partition) != num_stages:
        raise ValueError(
            f"partition={partition} has {len(partition)} entries but there are "
            f"{where}; give one layer count per {'pipe device' if virtual_stages == 1 else 'stage'}"
        )
    if min(partition) < 1:
        raise ValueError(f"partition={partition}: every {'pipe device' if virtual_stages == 1 else 'stage'} needs at least one layer")
    if sum(partition) != num_layers:
        raise ValueError(
            f"partition={partition} sums to {sum(partition)} but the model has "
            f"{num_layers} layers; the counts must sum to {num_layers}"
        )
    return partition


def partition_layers(costs: Sequence[float], num_devices: int) -> tuple[int, ...]:
    """Contiguous cut of L layers into P runs minimising the largest run's cost.

    Exact dynamic programme, O(P L^2). Among optimal cuts the earliest-first
    one is returned, so the result is deterministic.

    Args:
      costs: ``[L]`` non-negative per-layer costs.
      num_devices: P.

    Returns:
      ``[P]`` layer counts, each >= 1, summing to L.

    Raises:
      ValueError: if there are fewer layers than devices or a cost is negative
        or not finite.
    """
    costs = np.asarray(costs, dtype=np.float64)
    num_layers = costs.shape[0]
    if num_layers < num_devices:
        raise ValueError(
            f"the model has {num_layers} layers but the mesh has {num_devices} pipe "
            f"devices; every pipe device needs at least one layer, so use pipe <= {num_layers}"
        )
    if not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError(f"layer costs must be finite and >= 0, got {costs.tolist()}")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    # best[p][j]: least max-load putting the first j layers on p devices.
    best = np.full((num_devices + 1, num_layers + 1), inf)
    cut = np.zeros((num_devices + 1, num_layers + 1), dtype=np.int64)
    best[0][0] = 0.0
    for p in range(1, num_devices + 1):
        for j in range(p, num_layers - (num_devices - p) + 1):
            for i in range(p - 1, j):
                load = max(best[p - 1][i], prefix[j] - prefix[i])
                if load < best[p][j] - 1e-12 * max(1.0, prefix[-1]):
                    best[p][j], cut[p][j] = load, i
    counts, j = [], num_layers
    for p in range(num_devices, 0, -1):
        i = int(cut[p][j])
        counts.append(j - i)
        j = i
    return tuple(reversed(counts))


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one micro-batch through layer ``layer``.

    A stage is a sequence of pieces. A layer inside one stage is the piece
    ``(layer, 0, B)``; a layer split between stages appears in each of them
    with consecutive row ranges.
    """

    layer: int
    start: int
    stop: int


def pieces_from_counts(counts: Sequence[int], rows: int) -> tuple[tuple[Piece, ...], ...]:
    """Integer cuts as pieces: stage ``s`` gets ``counts[s]`` whole layers."""
    cuts = np.cumsum((0,) + tuple(counts))
    return tuple(
        tuple(Piece(li, 0, rows) for li in range(cuts[s], cuts[s + 1])) for s in range(len(counts))
    )


def _fractional_cuts(costs: np.ndarray, num_stages: int, rows: int, splittable: Sequence[bool],
                     shares: Sequence[float] | None = None) -> list:
    """``S + 1`` cut positions ``(layer, k)``: layer ``layer`` has finished rows ``[0, k)``."""
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    total = prefix[-1]
    cuts = [(0, 0)]
    for s in range(1, num_stages):
        target = total * (s / num_stages if shares is None else shares[s - 1])
        li = int(np.clip(np.searchsorted(prefix, target, side="right") - 1, 0, len(costs) - 1))
        if costs[li] > 0 and splittable[li]:
            # Half rows round up (not to even), so cuts at least a row apart
            # stay distinct.
            k = int(np.floor((target - prefix[li]) / costs[li] * rows + 0.5))
        else:
            k = 0 if target - prefix[li] <= prefix[li + 1] - target else rows
        cuts.append((li + 1, 0) if k >= rows else (li, k))
    cuts.append((len(costs), 0))
    return cuts


def _empty_stage(cuts: list) -> int | None:
    return next((s for s in range(len(cuts) - 1) if cuts[s + 1] <= cuts[s]), None)


def fractional_partition(
    costs: Sequence[float], num_stages: int, rows: int, splittable: Sequence[bool],
    shares: Sequence[float] | None = None,
) -> tuple[tuple[Piece, ...], ...]:
    """Cuts the cumulative cost line into ``S`` equal parts, splitting layers by rows.

    Stage ``s`` owns the cost interval ``[s T / S, (s + 1) T / S]``. A cut that
    falls inside a splittable layer splits it by micro-batch rows (granularity
    one row: the left stage computes rows ``[0, k)``, the right stage the rest;
    a layer heavier than ``T / S`` spans several stages, and a stage inside
    it gets only rows ``[k0, k1)`` of it, so there may be fewer layers than
    stages). A cut inside an unsplittable layer moves to the nearer end of
    that layer. Assumes a layer's cost is proportional to its rows.

    Args:
      costs: ``[L]`` per-layer costs for a whole micro-batch.
      num_stages: S.
      rows: B, rows per micro-batch.
      splittable: ``[L]`` whether each layer treats rows independently.
      shares: ``[S - 1]`` increasing fractions of the total cost at which
        the cuts fall (default ``s / S``: equal costs); the planner moves
        them to balance predicted time rather than cost
        (``planner.balanced_stages``).

    Returns:
      ``[S]`` tuples of pieces, covering every row of every layer once; every
      stage gets at least one row of some layer.

    Raises:
      ValueError: if costs are negative or not finite, ``rows < 1``, B is
        too small to give every stage at least one row (the message names
        the fewest rows that would), or the cuts leave a stage with no work
        for any B (unsplittable layers too heavy to cut around for this many
        stages).
    """
    costs = np.asarray(costs, dtype=np.float64)
    if not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError(f"layer costs must be finite and >= 0, got {costs.tolist()}")
    if rows < 1:
        raise ValueError(f"rows per micro-batch must be >= 1, got {rows}")
    if shares is not None:
        shares = np.asarray(shares, np.float64)
        if shares.shape != (num_stages - 1,) or np.any(np.diff(shares) < 0) or np.any((shares <= 0) | (shares >= 1)):
            raise ValueError(f"shares must be {num_stages - 1} increasing fractions in (0, 1), got {shares.tolist()}")
    cuts = _fractional_cuts(costs, num_stages, rows, splittable, shares)
    empty = _empty_stage(cuts)
    if empty is not None:
        # Cuts T / S apart inside a splittable layer fall at least B / S rows
        # apart, so with B >= S only an unsplittable layer leaves a stage empty.
        enough = next(
            (b for b in range(rows + 1, num_stages + 1)
             if _empty_stage(_fractional_cuts(costs, num_stages, b, splittable)) is None),
            None,
        )
        if enough is not None:
            raise ValueError(
                f"micro-batches of B={rows} rows are too few to give each of {num_stages} "
                f"stages at least one row (the balanced cut leaves stage {empty} without "
                f"work, cuts {cuts}); use micro-batches of at least {enough} rows "
                "(fewer micro-batches or a larger batch), or fewer pipe devices"
            )
        raise ValueError(
            f"the balanced cut leaves stage {empty} without work (cuts {cuts}); "
            "unsplittable layers are too heavy to cut around for "
            f"{num_stages} stages: use fewer pipe devices"
            + (" or integer cuts" if len(costs) >= num_stages else "")
        )
    stages = []
    for (l0, k0), (l1, k1) in zip(cuts[:-1], cuts[1:]):
        pieces = []
        for li in range(l0, min(l1, len(costs) - 1) + 1):
            start = k0 if li == l0 else 0
            stop = k1 if li == l1 else rows
            if stop > start:
                pieces.append(Piece(li, start, stop))
        stages.append(tuple(pieces))
    return tuple(stages)


def stage_loads(
    costs: Sequence[float], stages: Sequence[Sequence[Piece]], rows: int, scale: np.ndarray | None = None
) -> np.ndarray:
    """``[S]`` cost of each stage: its pieces' layer costs times their row fraction.

    ``scale``: ``[L, rows + 1]`` measured fraction of a layer's cost that a
    piece of ``r`` rows costs (``Profile.piece_scale``), instead of ``r / rows``.
    """
    costs = np.asarray(costs, dtype=np.float64)
    if scale is None:
        return np.asarray([sum(costs[p.layer] * (p.stop - p.start) / rows for p in stage) for stage in stages])
    return np.asarray([sum(costs[p.layer] * scale[p.layer, p.stop - p.start] for p in stage) for stage in stages])


def check_layer_ids(ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Validates ``unsplittable`` layer indices."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"unsplittable must be a sequence of layer indices, e.g. ({ids!r},) or [1, 3], got {ids!r}"
        )
    ids = tuple(ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"unsplittable={ids}: {bad} are not layer indices in [0, {num_layers})")
    return tuple(int(i) for i in ids)
