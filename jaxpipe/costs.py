"""Per-layer costs for the cut and the planner: XLA's flop estimate, or given numbers.

``docs/design.md`` ("Pure planning") explains the choice: each layer's cost is
XLA's flop estimate of its ``value_and_grad`` on one micro-batch
(``layer_flops``, ``estimate_costs``), split one third forward, two thirds
backward, unless the caller gives numbers or a measured ``Profile``
(``profile.py``); ``layer_costs`` turns any of these into the forward and
backward vectors the partitioner and planner read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .layers import LayerSpec, apply_layer


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
        # value_and_grad, not grad: a linear layer's backward does not need its
        # output, so under grad alone XLA drops the forward matmul from the
        # count (a Linear without activation came out at 2/3 of one with).
        lowered = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1))).lower(params, floats)
        analysis = lowered.cost_analysis()
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


def check_costs(costs: Sequence[float], num_layers: int) -> np.ndarray:
    """``[L]`` finite non-negative costs as float64, or a ValueError naming them."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (num_layers,) or not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError(
            f"costs must be {num_layers} finite non-negative numbers (one per layer), got {costs.tolist()}"
        )
    return costs


def layer_costs(costs: Any, specs, params, structs) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-layer ``(forward [L], backward [L], unit)`` for the partitioner and planner.

    ``costs`` may be a ``Profile`` (measured forward and backward seconds), a
    sequence of ``L`` forward+backward costs, or ``None`` for XLA's flop
    estimate. Totals are split one third forward, two thirds backward.
    """
    if hasattr(costs, "forward") and hasattr(costs, "backward"):
        forward = check_costs(costs.forward(), len(specs))
        return forward, check_costs(costs.backward(), len(specs)), "s"
    unit = "flop" if costs is None else "cost"
    total = estimate_costs(specs, params, structs[:-1]) if costs is None else check_costs(costs, len(specs))
    return total / 3, 2 * total / 3, unit
