"""Placing stages on pipe devices: parameter copies, split-layer copies, tied leaves, stacks.

A stage (a run of pieces, ``partition.Piece``) lives on device ``s % P``. A
layer cut by rows between stages has a *parameter copy* on each device that
runs part of it: copy ``i < L`` is layer ``i`` itself (its owner copy), and
copies ``L, L + 1, ...`` are the extra copies of split layers. Every copy's
leaves live in natural-shape stacks (``stacks.py``), tied leaves
(``layers.find_ties``) included: a layer that shares an earlier layer's
parameter holds its own entry of it on its device.

Both are *linked* to an owner leaf (``copy_links``): each leaf of an extra
copy to the same leaf of its layer's owner copy, each tied leaf (in every
copy of its layer) to its owner layer's leaf. The partial gradients of
linked leaves are summed into the owner before the optimizer and the linked
leaves are refreshed from the owner after it, so they stay identical and the
optimizer sees each parameter once, in its owner's own tree
(``LayerSpec.own``). ``place_stages`` returns all of this as a ``Placement``
(``docs/design.md``, "Parameter stacks" and the glossary).
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
from .layers import LayerSpec
from .tracing import check_rows_follow, trace_at_rows
from .wire import Boundary, Carrier


@dataclasses.dataclass(frozen=True)
class Placement:
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
        """Inside ``shard_map``: copy ``copy``'s full parameter tree from this device's stack entries."""
        return jax.tree.unflatten(self.specs[copy].treedef, self.stacks.read(entries, copy))

    def own_read(self, entries: Sequence[Any], layer: int) -> list[Any]:
        """Inside ``shard_map``: layer ``layer``'s own leaves (``LayerSpec.own_leaves``) from its owner copy."""
        leaves = self.stacks.read(entries, layer)
        return [leaves[a] for a in self.specs[layer].own_leaves]

    def own_write(self, entries: Sequence[Any], layer: int, leaves: Sequence[Any]) -> tuple[Any, ...]:
        """Inside ``shard_map``: ``entries`` with layer ``layer``'s own leaves (owner copy) replaced."""
        out, places = list(entries), self.stacks.places[layer]
        for a, leaf in zip(self.specs[layer].own_leaves, leaves):
            k = places[a]
            if k >= 0:
                out[k] = leaf.reshape(self.stacks.shapes[k]).astype(out[k].dtype)
        return tuple(out)

    def to_stacks(self, layer_trees: Sequence[Any], dtype: Any = None) -> list[Any]:
        """Host stacks ``[P, *shape]`` from per-layer own trees; every extra copy and tied leaf filled.

        Args:
          layer_trees: ``[L]`` own trees (``LayerSpec.own``: a tied leaf is
            given once, in its owner layer), as ``from_stacks`` gives.
          dtype: cast every stack to it; default each stack's own dtype.

        Raises:
          ValueError: if the number of layers or a leaf's shape differs.
        """
        if len(layer_trees) != self.num_layers:
            raise ValueError(f"to_stacks needs {self.num_layers} per-layer trees, got {len(layer_trees)}")
        full = []
        for layer, tree in enumerate(layer_trees):
            spec, leaves = self.specs[layer], jax.tree.leaves(tree)
            shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
            if shapes != list(spec.own_shapes):
                tied = (f" (its tied leaves are given in their owner layers {sorted({o for _, o, _ in spec.tied})}, "
                        "not here)" if spec.tied else "")
                raise ValueError(
                    f"layer {layer} ({spec.name}) has parameter shapes {list(spec.own_shapes)}{tied}, got {shapes}"
                )
            leaves_full = [None] * len(spec.shapes)
            for a, leaf in zip(spec.own_leaves, leaves):
                leaves_full[a] = leaf
            full.append(leaves_full)
        for layer in range(self.num_layers):
            for leaf, owner, owner_leaf in self.specs[layer].tied:
                full[layer][leaf] = full[owner][owner_leaf]
        return self.stacks.to_stacks([full[layer] for layer in self.copy_layer], dtype)

    def from_stacks(self, stacks: Sequence[Any]) -> list[Any]:
        """Per-layer own trees (each layer's owner copy, tied leaves left out) from host stacks ``[P, *shape]``."""
        return [self.specs[layer].own(self.stacks.from_stacks(stacks, layer)) for layer in range(self.num_layers)]


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
) -> Placement:
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
        (``Placement.split_loss``); the model output then crosses no device.

    Returns:
      The ``Placement``.
    """
    num_layers, rows = len(specs), jax.tree.leaves(x_mb)[0].shape[0]
    virtual_stages = len(stages) // num_devices
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
        sum((stage_copies[c * num_devices + p] for c in range(virtual_stages)), ())
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
    return Placement(
        copy_specs, StackLayout.build(items, num_devices), tuple(device_copies), tuple(map(tuple, stages)),
        tuple(stage_copies), boundaries, carrier, num_microbatches, tuple(copy_layer), jnp.dtype(dtype),
        split_loss,
    )


def copy_links(placement: Placement) -> list[tuple[int, int, int, int]]:
    """``(owner device, owner stack, device, stack)`` per linked leaf.

    Linked leaves are every leaf of a split layer's extra copies (owner: the
    same leaf of the layer's owner copy) and every tied leaf, in each copy of
    its layer (owner: the leaf of the earlier layer that owns the
    parameter). Every owner is an own leaf of an owner copy, never itself
    linked, so merges and syncs may run in any order.
    """
    stacks = placement.stacks
    out = []
    for copy, layer in enumerate(placement.copy_layer):
        spec = placement.specs[copy]
        owners = {a: (layer, a) for a in range(len(spec.shapes))} if copy >= placement.num_layers else {}
        owners.update({leaf: (owner, owner_leaf) for leaf, owner, owner_leaf in spec.tied})
        for a, (owner, b) in sorted(owners.items()):
            if stacks.places[owner][b] >= 0:
                out.append((stacks.items[owner].device, stacks.places[owner][b],
                            stacks.items[copy].device, stacks.places[copy][a]))
    return out


def merge_copies_local(placement: Placement, acc: Sequence[jax.Array], p: jax.Array) -> tuple[jax.Array, ...]:
    """Inside ``shard_map``: adds each linked leaf's gradient into its owner leaf's.

    One ``ppermute`` of one leaf per linked leaf on another device (a local
    add on the same device), once per step. Global-norm clipping and the
    optimizer then see every parameter once (they read own leaves of owner
    copies only).

    Args:
      placement: the stage placement.
      acc: this device's gradient stack entries.
      p: this device's pipe index (traced).

    Returns:
      The merged entries.
    """
    acc = list(acc)
    for po, ko, pc, kc in copy_links(placement):
        sent = acc[kc] if po == pc else lax.ppermute(acc[kc], PIPE_AXIS, [(pc, po)])
        merged = acc[ko] + sent.reshape(acc[ko].shape)
        acc[ko] = jnp.where(p == po, merged, acc[ko])
    return tuple(acc)


def sync_copies_local(placement: Placement, entries: Sequence[jax.Array], p: jax.Array) -> tuple[jax.Array, ...]:
    """Inside ``shard_map``: each linked leaf overwritten by its owner leaf."""
    entries = list(entries)
    for po, ko, pc, kc in copy_links(placement):
        sent = entries[ko] if po == pc else lax.ppermute(entries[ko], PIPE_AXIS, [(po, pc)])
        entries[kc] = jnp.where(p == pc, sent.reshape(entries[kc].shape), entries[kc])
    return tuple(entries)


def _on_mesh(placement: Placement, mesh, local):
    """``stacks -> stacks`` on the mesh: ``local(placement, entries, p)`` per device; the identity without links."""
    if not copy_links(placement):
        return lambda stacks: stacks

    def body(stacks):
        entries = local(placement, tuple(a[0] for a in stacks), lax.axis_index(PIPE_AXIS))
        return tuple(a[None] for a in entries)

    spec = PartitionSpec(PIPE_AXIS)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)


def sync_copies(placement: Placement, mesh):
    """``weights -> weights`` on the mesh: every linked leaf set to its owner leaf."""
    return _on_mesh(placement, mesh, sync_copies_local)


def merge_copies(placement: Placement, mesh):
    """``grads -> grads`` on the mesh: every linked leaf's gradient added into its owner leaf's.

    For gradients taken outside ``shard_map`` (``executor="autodiff"``).
    """
    return _on_mesh(placement, mesh, merge_copies_local)
