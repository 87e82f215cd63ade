"""Placing stages on pipe devices: parameter copies, split-layer copies, stacks.

A stage (a run of pieces, ``partition.Piece``) lives on device ``s % P``. A
layer cut by rows between stages has a *parameter copy* on each device that
runs part of it: copy ``i < L`` is layer ``i`` itself (its owner copy), and
copies ``L, L + 1, ...`` are the extra copies of split layers. Every copy's
leaves live in natural-shape stacks (``stacks.py``). The partial gradients
of a split layer's copies are summed into the owner copy before the
optimizer and the copies are refreshed from the owner after it, so every
copy stays identical and the optimizer sees each parameter once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from .mesh import PIPE_AXIS
from .partition import Piece
from .stacks import Item, StackLayout
from .stages import (
    Boundary,
    Carrier,
    LayerSpec,
    check_rows_follow,
    trace_at_rows,
)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Everything static the executors need, derived before tracing.

    Stage ``s = c * P + p`` (chunk ``c`` of device ``p``) runs the pieces
    ``stage_pieces[s]``: rows of a micro-batch through consecutive layers
    (``partition.Piece``). A layer split by rows between stages has a
    parameter copy on each of their devices (``copy_layer`` maps a copy to
    its layer; copy ``i < L`` is layer ``i``'s owner copy).

    Attributes:
      specs: ``[C]`` the layer spec of each parameter copy.
      stacks: where every copy's leaves live (items are the copies).
      device_copies: ``[P]`` tuples, the copies each device holds.
      stage_pieces: ``[S]`` tuples of pieces.
      stage_copies: ``[S]`` tuples, the parameter copy of each piece.
      boundaries: ``L + 1`` entries: entry ``i`` is the structure of layer
        ``i``'s input for one micro-batch (``i = L``: the model output) where
        a stage message carries it, else ``None``.
      carrier: the wire format shared by all messages.
      num_microbatches: M.
      copy_layer: ``[C]`` the layer of each parameter copy.
      dtype: the parameters' dtype.
      split_loss: when the last layer is split by rows, each of its pieces'
        stages computes the loss of its own rows (weighted by its share of
        the rows), so only the last layer's inputs cross devices, never its
        outputs (logits); needs ``loss_fn`` to be a mean over rows.
    """

    specs: tuple[LayerSpec, ...]
    stacks: StackLayout
    device_copies: tuple[tuple[int, ...], ...]
    stage_pieces: tuple[tuple[Piece, ...], ...]
    stage_copies: tuple[tuple[int, ...], ...]
    boundaries: tuple[Boundary | None, ...]
    carrier: Carrier
    num_microbatches: int
    copy_layer: tuple[int, ...]
    dtype: Any
    split_loss: bool = False

    @property
    def num_devices(self) -> int:
        """P."""
        return len(self.device_copies)

    @property
    def num_stages(self) -> int:
        """S = V * P."""
        return len(self.stage_pieces)

    @property
    def num_layers(self) -> int:
        """L; parameter copies ``>= L`` are extra copies of split layers."""
        return len(set(self.copy_layer))

    @property
    def sends_ints(self) -> bool:
        """Whether an integer leaf crosses a stage boundary."""
        return any(b is not None and "int" in b.kinds for b in self.boundaries)

    def loss_rows(self, s: int) -> tuple[int, int] | None:
        """Rows ``[r0, r1)`` whose loss stage ``s`` computes, or ``None``.

        The last stage computes the loss of the rows of the last layer it
        runs; with ``split_loss`` so does every stage whose last piece is a
        piece of the last layer.
        """
        last = self.stage_pieces[s][-1]
        if last.layer != len(self.boundaries) - 2:
            return None
        if s == self.num_stages - 1 or self.split_loss:
            start = last.start if self.split_loss else 0
            return start, last.stop
        return None

    def entry(self, s: int) -> tuple[int, int]:
        """``(layer, k)``: stage ``s`` receives layer ``layer`` done for rows ``[0, k)``."""
        first = self.stage_pieces[s][0]
        return first.layer, first.start

    def copy_tree(self, entries: Sequence[jax.Array], copy: int) -> Any:
        """Inside ``shard_map``: copy ``copy``'s parameter tree from this device's stack entries."""
        return jax.tree.unflatten(self.specs[copy].treedef, self.stacks.read(entries, copy))

    def pack(self, layer_trees: Sequence[Any], dtype: Any = None) -> list[Any]:
        """Host stacks ``[P, *shape]`` from per-layer trees; every copy of a split layer filled.

        Raises:
          ValueError: if the number of layers or a leaf's shape differs.
        """
        if len(layer_trees) != self.num_layers:
            raise ValueError(f"pack needs {self.num_layers} per-layer trees, got {len(layer_trees)}")
        for layer, tree in enumerate(layer_trees):
            shapes = [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree)]
            if shapes != list(self.specs[layer].shapes):
                raise ValueError(
                    f"layer {layer} ({self.specs[layer].name}) has parameter shapes "
                    f"{list(self.specs[layer].shapes)}, got {shapes}"
                )
        return self.stacks.pack([layer_trees[layer] for layer in self.copy_layer], dtype)

    def unpack(self, stacks: Sequence[Any]) -> list[Any]:
        """Per-layer parameter trees (each layer's owner copy) from host stacks ``[P, *shape]``."""
        return [
            jax.tree.unflatten(self.specs[layer].treedef, self.stacks.unpack(stacks, layer))
            for layer in range(self.num_layers)
        ]


def place_stages(
    stages: Sequence[Sequence[Piece]],
    num_devices: int,
    num_microbatches: int,
    specs: Sequence[LayerSpec],
    params: Sequence[Any],
    dtype: Any,
    structs: Sequence[Any],
    x_mb: Any,
    split_loss: bool = False,
) -> StagePlan:
    """Places stages on devices: stage ``s = c * P + p`` on device ``p``.

    A layer in several stages gets one parameter copy per stage: copy ``i``
    (in its first stage) is the owner copy, the others are extra copies. Only the
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
      split_loss: compute the loss where the last layer's rows are
        (``StagePlan.split_loss``); the model output then crosses no device.

    Returns:
      The ``StagePlan``.
    """
    num_layers, rows = len(specs), jax.tree.leaves(x_mb)[0].shape[0]
    num_chunks = len(stages) // num_devices
    copy_layer, stage_copies, seen = list(range(num_layers)), [], set()
    for stage in stages:
        copies = []
        for piece in stage:
            if piece.layer in seen:
                copies.append(len(copy_layer))
                copy_layer.append(piece.layer)
            else:
                seen.add(piece.layer)
                copies.append(piece.layer)
        stage_copies.append(tuple(copies))
    device_copies = [
        sum((stage_copies[c * num_devices + p] for c in range(num_chunks)), ())
        for p in range(num_devices)
    ]
    needed = set()
    for stage in stages[1:]:
        needed.add(stage[0].layer)
        if stage[0].start and not (split_loss and stage[0].layer == num_layers - 1):
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
    device_of = {copy: p for p, copies in enumerate(device_copies) for copy in copies}
    copy_specs = tuple(specs[layer] for layer in copy_layer)
    items = [
        Item(device_of[copy], spec.shapes, (jnp.dtype(dtype),) * len(spec.shapes))
        for copy, spec in enumerate(copy_specs)
    ]
    return StagePlan(
        copy_specs, StackLayout.build(items, num_devices), tuple(device_copies), tuple(map(tuple, stages)),
        tuple(stage_copies), boundaries, carrier, num_microbatches, tuple(copy_layer), jnp.dtype(dtype),
        split_loss,
    )


def split_copies(plan: StagePlan) -> list[tuple[int, int, int, int]]:
    """``(owner device, owner stack, copy device, copy stack)`` per leaf of every extra copy."""
    stacks = plan.stacks
    out = []
    for copy, layer in enumerate(plan.copy_layer):
        if copy < plan.num_layers:
            continue
        for owner_stack, copy_stack in zip(stacks.places[layer], stacks.places[copy]):
            if owner_stack >= 0:
                out.append((stacks.items[layer].device, owner_stack, stacks.items[copy].device, copy_stack))
    return out


def merge_copies_local(plan: StagePlan, acc: Sequence[jax.Array], p: jax.Array) -> tuple[jax.Array, ...]:
    """Inside ``shard_map``: adds each split layer's copy gradient into its owner copy.

    One ``ppermute`` of one leaf per copy leaf, once per step. Global-norm
    clipping and the optimizer then see every parameter once (they read
    owner copies only).

    Args:
      plan: the stage plan.
      acc: this device's gradient stack entries.
      p: this device's pipe index (traced).

    Returns:
      The merged entries.
    """
    acc = list(acc)
    for po, ko, pc, kc in split_copies(plan):
        sent = lax.ppermute(acc[kc], PIPE_AXIS, [(pc, po)])
        merged = acc[ko] + sent.reshape(acc[ko].shape)
        acc[ko] = jnp.where(p == po, merged, acc[ko])
    return tuple(acc)


def sync_copies_local(plan: StagePlan, entries: Sequence[jax.Array], p: jax.Array) -> tuple[jax.Array, ...]:
    """Inside ``shard_map``: each extra copy of a split layer overwritten by its owner copy."""
    entries = list(entries)
    for po, ko, pc, kc in split_copies(plan):
        sent = lax.ppermute(entries[ko], PIPE_AXIS, [(po, pc)])
        entries[kc] = jnp.where(p == pc, sent.reshape(entries[kc].shape), entries[kc])
    return tuple(entries)


def sync_copies(plan: StagePlan, mesh):
    """``weights -> weights`` on the mesh: every extra copy of a split layer set to its owner copy.

    The identity when nothing is split.
    """
    if not split_copies(plan):
        return lambda weights: weights
    def body(weights):
        entries = sync_copies_local(plan, tuple(a[0] for a in weights), lax.axis_index(PIPE_AXIS))
        return tuple(a[None] for a in entries)

    spec = PartitionSpec(PIPE_AXIS)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)
