"""Cutting the layer list into contiguous runs, one per pipe device.

The partitioner is pure Python over a cost vector (DESIGN.md rule 4); the
cost estimate comes from XLA's cost analysis of each layer's forward and
backward pass on one micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .stages import LayerSpec, apply_layer


def check_partition(
    partition: Sequence[int], num_layers: int, num_devices: int, num_chunks: int = 1
) -> tuple[int, ...]:
    """Validates an explicit partition: layers per stage.

    With ``V = num_chunks`` chunks per device there are ``S = V * P`` stages;
    stage ``s = c * P + p`` is chunk ``c`` of pipe device ``p``. With V = 1 a
    stage is a pipe device.

    Args:
      partition: ``[S]`` layer counts, e.g. ``(2, 1, 1, 2)``.
      num_layers: L.
      num_devices: P.
      num_chunks: V.

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
    num_stages = num_devices * num_chunks
    where = (
        f"{num_devices} pipe devices" if num_chunks == 1
        else f"{num_stages} stages ({num_chunks} virtual stages x {num_devices} pipe devices)"
    )
    if len(partition) != num_stages:
        raise ValueError(
            f"partition={partition} has {len(partition)} entries but there are "
            f"{where}; give one layer count per {'pipe device' if num_chunks == 1 else 'stage'}"
        )
    if min(partition) < 1:
        raise ValueError(f"partition={partition}: every {'pipe device' if num_chunks == 1 else 'stage'} needs at least one layer")
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


def layer_flops(spec: LayerSpec, params: Any, x: Any) -> float | None:
    """XLA's flop estimate of one layer's forward + backward on one micro-batch.

    Args:
      spec: the layer.
      params: its parameter tree (arrays or shape structs).
      x: its input for one micro-batch (arrays or shape structs).

    Returns:
      The flop count, or ``None`` where XLA gives no estimate.
    """
    leaves, treedef = jax.tree.flatten(x)
    is_float = [jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves]
    # Integer inputs (token ids) get no gradient: they are zeros held constant.
    consts = [None if f else jnp.zeros(leaf.shape, leaf.dtype) for leaf, f in zip(leaves, is_float)]
    floats = [leaf for leaf, f in zip(leaves, is_float) if f]

    def scalar(p, float_leaves):
        it = iter(float_leaves)
        merged = [next(it) if c is None else c for c in consts]
        out = apply_layer(spec, p, jax.tree.unflatten(treedef, merged))
        return sum(
            jnp.sum(o.astype(jnp.float32))
            for o in jax.tree.leaves(out)
            if jnp.issubdtype(o.dtype, jnp.floating)
        )

    try:
        analysis = jax.jit(jax.grad(scalar, argnums=(0, 1))).lower(params, floats).cost_analysis()
    except Exception:  # noqa: BLE001 - any failure means "no estimate"
        return None
    if isinstance(analysis, Sequence):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def estimate_costs(specs: Sequence[LayerSpec], params: Sequence[Any], inputs: Sequence[Any]) -> np.ndarray:
    """Per-layer cost for partitioning: XLA flops, else parameter count.

    If XLA gives no estimate for some layer, every layer falls back to its
    parameter count (plus one), so costs stay comparable.

    Args:
      specs: the layer specs.
      params: per-layer parameter trees.
      inputs: per-layer input shape structs for one micro-batch.

    Returns:
      ``[L]`` float64 costs.
    """
    cache: dict[Any, float | None] = {}
    flops = []
    for spec, p, x in zip(specs, params, inputs):
        key = (spec.name, spec.shapes, str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), x)), repr(spec.graphdef))
        if key not in cache:
            cache[key] = layer_flops(spec, p, x)
        flops.append(cache[key])
    if all(f is not None for f in flops):
        return np.asarray(flops, dtype=np.float64)
    return np.asarray([spec.size + 1 for spec in specs], dtype=np.float64)
