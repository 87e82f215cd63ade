"""Placing stages on pipe devices: parameter slots and split-layer copies.

A stage (a run of pieces, ``partition.Piece``) lives on device ``s % P``. A
layer cut by rows between stages has a parameter copy on each device that
runs part of it; the packed layout holds one *slot* per copy. Their partial
gradients are summed into the owner slot before the optimizer and the copies
are refreshed from the owner after it, so every copy stays identical and
the optimizer sees each parameter once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from .executor import StagePlan
from .partition import Piece
from .stages import (
    Boundary,
    Carrier,
    LayerSpec,
    ParamLayout,
    check_rows_follow,
    trace_at_rows,
)


def place_stages(
    stages: Sequence[Sequence[Piece]],
    num_devices: int,
    num_microbatches: int,
    specs: Sequence[LayerSpec],
    params: Sequence[Any],
    dtype: Any,
    structs: Sequence[Any],
    x_mb: Any,
) -> StagePlan:
    """Places stages on devices: stage ``s = c * P + p`` on device ``p``.

    A layer in several stages gets one parameter slot per stage: slot ``i``
    (its first stage) is the owner, the others are copies. Only the
    activations that cross stages get a ``Boundary``; each is checked to
    follow the micro-batch rows.

    Args:
      stages: ``[S]`` tuples of pieces, ``S`` a multiple of P.
      num_devices: P.
      num_microbatches: M.
      specs: the layer specs.
      params: per-layer parameter trees.
      dtype: the parameter dtype.
      structs: ``L + 1`` activation structures (``trace_boundaries``).
      x_mb: one micro-batch of model input (shape structs).

    Returns:
      The ``StagePlan``.
    """
    num_layers, rows = len(specs), jax.tree.leaves(x_mb)[0].shape[0]
    num_chunks = len(stages) // num_devices
    slot_layer, stage_slots, seen = list(range(num_layers)), [], set()
    for stage in stages:
        slots = []
        for piece in stage:
            if piece.layer in seen:
                slots.append(len(slot_layer))
                slot_layer.append(piece.layer)
            else:
                seen.add(piece.layer)
                slots.append(piece.layer)
        stage_slots.append(tuple(slots))
    device_slots = [
        sum((stage_slots[c * num_devices + p] for c in range(num_chunks)), ())
        for p in range(num_devices)
    ]
    needed = set()
    for stage in stages[1:]:
        needed.add(stage[0].layer)
        if stage[0].start:
            needed.add(stage[0].layer + 1)
    boundaries = tuple(
        Boundary.from_struct(structs[i], rows, f"the output of layer {i - 1}") if i in needed else None
        for i in range(len(structs))
    )
    if needed:
        probe_rows = rows + 1
        probe = trace_at_rows(specs[: max(needed)], params, x_mb, probe_rows)
        for i in sorted(needed) if probe is not None else ():
            check_rows_follow(structs[i], probe[i], probe_rows, f"the output of layer {i - 1}")
    carrier = Carrier.for_boundaries([b for b in boundaries if b is not None], rows)
    slot_specs = [specs[layer] for layer in slot_layer]
    layout = ParamLayout.build(slot_specs, device_slots, dtype, groups=stage_slots)
    return StagePlan(
        layout, tuple(map(tuple, stages)), tuple(stage_slots), boundaries, carrier, num_microbatches, tuple(slot_layer)
    )


def split_copies(plan: StagePlan) -> list[tuple[int, int, int, int, int]]:
    """``(owner device, owner start, copy device, copy start, size)`` per extra copy."""
    layout = plan.layout
    device_of = {slot: p for p, slots in enumerate(layout.device_layers) for slot in slots}
    return [
        (device_of[layer], layout.starts[layer], device_of[slot], layout.starts[slot], layout.specs[slot].size)
        for slot, layer in enumerate(plan.slot_layer)
        if slot >= plan.num_layers and layout.specs[slot].size
    ]


def merge_copies(plan: StagePlan, grads: jax.Array) -> jax.Array:
    """Sums each split layer's partial gradients ``[P, N]`` into its owner slot, zeroing the copies.

    Global-norm clipping and the optimizer then see every parameter once.
    """
    for po, so, pc, sc, n in split_copies(plan):
        total = grads[po, so : so + n] + grads[pc, sc : sc + n]
        grads = grads.at[po, so : so + n].set(total).at[pc, sc : sc + n].set(0)
    return grads


def sync_copies(plan: StagePlan, params: jax.Array) -> jax.Array:
    """Overwrites each copy of a split layer in ``[P, N]`` with its owner's parameters."""
    for po, so, pc, sc, n in split_copies(plan):
        params = params.at[pc, sc : sc + n].set(params[po, so : so + n])
    return params
