"""Placing stages on pipe devices: parameter slots and split-layer copies.

A stage (a run of pieces, ``partition.Piece``) lives on device ``s % P``. A
layer cut by rows between stages has a parameter copy on each device that
runs part of it; the packed layout holds one *slot* per copy. Their partial
gradients are summed into the owner slot before the optimizer and the copies
are refreshed from the owner after it, so every copy stays identical and
the optimizer sees each parameter once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .mesh import PIPE_AXIS
from .partition import Piece
from .stages import (
    Boundary,
    Carrier,
    LayerSpec,
    ParamLayout,
    check_rows_follow,
    trace_at_rows,
)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Everything static the executors need, derived before tracing.

    Stage ``s = c * P + p`` (chunk ``c`` of device ``p``) runs the pieces
    ``stage_pieces[s]``: rows of a micro-batch through consecutive layers
    (``partition.Piece``). A layer split by rows between stages has a copy of
    its parameters on each of their devices: the packed layout holds
    parameter *slots*, slot ``i < L`` is layer ``i`` (its owner copy) and
    slots ``L, L + 1, ...`` are the extra copies (``slot_layer`` maps back).

    Attributes:
      layout: the packed parameter layout over slots.
      stage_pieces: ``[S]`` tuples of pieces.
      stage_slots: ``[S]`` tuples, the parameter slot of each piece.
      boundaries: ``L + 1`` entries: entry ``i`` is the structure of layer
        ``i``'s input for one micro-batch (``i = L``: the model output) where
        a stage message carries it, else ``None``.
      carrier: the wire format shared by all messages.
      num_microbatches: M.
      slot_layer: the layer of each parameter slot.
    """

    layout: ParamLayout
    stage_pieces: tuple[tuple[Piece, ...], ...]
    stage_slots: tuple[tuple[int, ...], ...]
    boundaries: tuple[Boundary | None, ...]
    carrier: Carrier
    num_microbatches: int
    slot_layer: tuple[int, ...]

    @property
    def num_devices(self) -> int:
        """P."""
        return len(self.layout.device_layers)

    @property
    def num_stages(self) -> int:
        """S = V * P."""
        return len(self.stage_pieces)

    @property
    def num_layers(self) -> int:
        """L; parameter slots ``>= L`` are copies of split layers."""
        return len(set(self.slot_layer))

    @property
    def window(self) -> int:
        """G, the largest stage's parameter count (>= 1)."""
        return max([1] + [self.layout.segment(slots)[1] for slots in self.stage_slots])

    @property
    def sends_ints(self) -> bool:
        """Whether an integer leaf crosses a stage boundary."""
        return any(b is not None and "int" in b.kinds for b in self.boundaries)

    def entry(self, s: int) -> tuple[int, int]:
        """``(layer, k)``: stage ``s`` receives layer ``layer`` done for rows ``[0, k)``."""
        first = self.stage_pieces[s][0]
        return first.layer, first.start


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


def merge_copies_local(plan: StagePlan, row: jax.Array, p: jax.Array) -> jax.Array:
    """Inside ``shard_map``: adds each split layer's copy gradient into its owner, zeroing the copy.

    One ``ppermute`` of just that layer's gradient per copy. Global-norm
    clipping and the optimizer then see every parameter once.

    Args:
      plan: the stage plan.
      row: this device's ``[N]`` gradient row.
      p: this device's pipe index (traced).

    Returns:
      The merged ``[N]`` row.
    """
    for po, so, pc, sc, n in split_copies(plan):
        at_copy = jnp.where(p == pc, sc, 0)
        sent = lax.ppermute(lax.dynamic_slice_in_dim(row, at_copy, n), PIPE_AXIS, [(pc, po)])
        at_owner = jnp.where(p == po, so, 0)
        row = lax.dynamic_update_slice_in_dim(row, lax.dynamic_slice_in_dim(row, at_owner, n) + sent, at_owner, 0)
        kept = lax.dynamic_slice_in_dim(row, at_copy, n)
        row = lax.dynamic_update_slice_in_dim(row, jnp.where(p == pc, jnp.zeros_like(kept), kept), at_copy, 0)
    return row


def sync_copies(plan: StagePlan, mesh: Mesh):
    """``params [P, N] -> params``: each copy of a split layer overwritten by its owner.

    A ``shard_map`` with one ``ppermute`` of that layer's parameters per copy;
    the identity when nothing is split.
    """
    copies = split_copies(plan)
    if not copies:
        return lambda params: params

    def body(params):
        row, p = params[0], lax.axis_index(PIPE_AXIS)
        for po, so, pc, sc, n in copies:
            sent = lax.ppermute(lax.dynamic_slice_in_dim(row, jnp.where(p == po, so, 0), n), PIPE_AXIS, [(po, pc)])
            at_copy = jnp.where(p == pc, sc, 0)
            kept = lax.dynamic_slice_in_dim(row, at_copy, n)
            row = lax.dynamic_update_slice_in_dim(row, jnp.where(p == pc, sent, kept), at_copy, 0)
        return row[None]

    spec = PartitionSpec(PIPE_AXIS)
    return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
