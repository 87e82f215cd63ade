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


def layer_flops(spec: LayerSpec, params: Any, x: Any, input_grad: bool = True) -> float | None:
    """XLA's flop estimate of one layer's forward + backward on one micro-batch.

    Args:
      spec: the layer.
      params: its parameter tree (arrays or shape structs).
      x: its input for one micro-batch (arrays or shape structs).
      input_grad: whether the backward also computes the input's gradient.
        The first layer's input is the model's input, whose gradient no
        executor computes: its backward is the parameter gradient only (a
        dense layer's backward is then half as costly).

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
        argnums = (0, 1) if input_grad else 0
        lowered = jax.jit(jax.value_and_grad(scalar, argnums=argnums)).lower(params, floats)
        analysis = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - any failure means "no estimate"
        return None
    if isinstance(analysis, Sequence):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def estimate_layer_costs(
    specs: Sequence[LayerSpec], params: Sequence[Any], inputs: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer ``(forward [L], backward [L])`` costs: XLA flops, else parameter counts.

    A layer's forward is a third of its forward + backward flops with the
    input gradient, its backward the rest. The first layer's backward leaves
    out the input gradient (``layer_flops``' ``input_grad``), which no
    executor computes; counting it made the first stage look heavier than it
    runs (experiment 01 (a): a 3-layer MLP's first layer was profiled at 0.77x
    of a middle one, flops with the input gradient said 1x). If XLA gives no
    estimate for some layer, every layer falls back to its parameter count
    (plus one), split a third forward, so costs stay comparable.

    Args:
      specs: the layer specs.
      params: per-layer parameter trees.
      inputs: per-layer input shape structs for one micro-batch.

    Returns:
      ``([L], [L])`` float64 forward and backward costs.
    """
    cache: dict[Any, float | None] = {}
    totals = []
    for spec, p, x in zip(specs, params, inputs):
        key = (spec.name, spec.shapes, str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), x)), repr(spec.graphdef))
        if key not in cache:
            cache[key] = layer_flops(spec, p, x)
        totals.append(cache[key])
    firsts = layer_flops(specs[0], params[0], inputs[0], input_grad=False)
    if all(f is not None for f in totals) and firsts is not None:
        total = np.asarray(totals, dtype=np.float64)
        forward = total / 3
        backward = total - forward
        backward[0] = max(firsts - forward[0], 0.0)
        return forward, backward
    counts = np.asarray([spec.size + 1 for spec in specs], dtype=np.float64)
    return counts / 3, 2 * counts / 3


def estimate_costs(specs: Sequence[LayerSpec], params: Sequence[Any], inputs: Sequence[Any]) -> np.ndarray:
    """Per-layer forward + backward cost: the sum of ``estimate_layer_costs``.

    Args:
      specs: the layer specs.
      params: per-layer parameter trees.
      inputs: per-layer input shape structs for one micro-batch.

    Returns:
      ``[L]`` float64 costs.
    """
    forward, backward = estimate_layer_costs(specs, params, inputs)
    return forward + backward


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
    estimate (``estimate_layer_costs``). Given totals are split one third
    forward, two thirds backward.
    """
    if hasattr(costs, "forward") and hasattr(costs, "backward"):
        forward = check_costs(costs.forward(), len(specs))
        return forward, check_costs(costs.backward(), len(specs)), "s"
    if costs is None:
        return (*estimate_layer_costs(specs, params, structs[:-1]), "flop")
    total = check_costs(costs, len(specs))
    return total / 3, 2 * total / 3, "cost"
