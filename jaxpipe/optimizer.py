"""The user's optax transformation, applied as if to the per-layer parameter tree.

The tree optax sees is the one ``model_fn``'s layers give (a list of one
``nnx.State`` of parameters per layer, each layer's own tree: a parameter
several layers share appears once, in the first, as ``nnx.split`` of the
whole layer list gives it), with every leaf in its natural shape,
so transformations that look at shapes, paths or whole leaves (masks,
adafactor's factoring, LAMB's trust ratios, Muon's orthogonalisation) are
exact. Its state is held like the parameters: every state leaf that belongs
to a layer (found by its path, which ends with that layer's parameter path)
lives in natural-shape stacks on the layer's device (``stacks.py``); the
others (step counts) are replicated.

Two ways to run ``update``, chosen once from the transformation's jaxpr
(``dataflow.py``):

* **per device** (when no update depends on another device's layers): inside
  ``shard_map`` each pipe device runs optax on the tree with its own layers
  filled in and every other layer as a one-element placeholder of the same
  rank, and keeps its own layers' results. Memory and work stay with the
  layers' devices.
* **whole tree** (when the transformation couples layers across devices, as
  ``clip_by_global_norm`` does): one program over the whole tree, each
  layer's leaves read from their stacks; XLA places the work. Exact, but
  every device may hold temporaries for the whole model during the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .dataflow import output_sources
from .mesh import PIPE_AXIS
from .placement import Placement, sync_copies_local
from .stacks import Item, StackLayout

SHARED = -1


class OptState(NamedTuple):
    """The optimizer state on the mesh.

    Attributes:
      stacks: ``[K']`` arrays ``[P, *shape]``: state leaves that belong to a
        layer, on that layer's device.
      shared: state leaves that belong to no layer (counts), replicated.
    """

    stacks: tuple
    shared: tuple


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _owners(state_struct: Any, params_struct: Any) -> list[int]:
    """Per flattened state leaf: the layer whose parameter path its path ends with, or ``SHARED``."""
    param_paths = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params_struct)[0]:
        param_paths[tuple(path)] = path[0].idx
    longest = max((len(p) for p in param_paths), default=0)
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(state_struct)[0]:
        path, owner = tuple(path), SHARED
        for n in range(min(longest, len(path)), 0, -1):
            if path[-n:] in param_paths:
                owner = param_paths[path[-n:]]
                break
        out.append(owner)
    return out


@dataclasses.dataclass(frozen=True)
class LayerOptimizer:
    """An optax transformation run on per-layer trees held in stacks.

    Attributes:
      optimizer: the user's transformation.
      placement: the stages placed on devices (layers, their devices, the parameter stacks).
      treedef: the state's tree structure for the per-layer tree.
      owners: per flattened state leaf, its layer or ``SHARED``.
      layout: the state stacks (items are layers, leaves their state leaves).
      shared: per flattened state leaf, its index in ``OptState.shared`` or -1.
      structs: per flattened state leaf, its shape and dtype.
      per_device: which way ``update`` runs (see the module docstring).
      coupled: when not per device, why (for messages and notes).
    """

    optimizer: optax.GradientTransformation
    placement: Placement
    treedef: Any
    owners: tuple[int, ...]
    layout: StackLayout
    shared: tuple[int, ...]
    structs: tuple[jax.ShapeDtypeStruct, ...]
    per_device: bool
    coupled: str

    @classmethod
    def build(cls, optimizer: optax.GradientTransformation, placement: Placement) -> "LayerOptimizer":
        """Traces ``optimizer`` on the per-layer tree and lays its state out.

        Raises:
          ValueError: if ``optimizer.init`` or ``update`` fails on the tree.
        """
        params = layer_structs(placement)
        try:
            state = jax.eval_shape(optimizer.init, params)
        except Exception as err:  # the optimizer's own error, with context
            raise ValueError(
                f"optimizer.init fails on the per-layer parameter tree (a list of {placement.num_layers} "
                f"nnx.State): {type(err).__name__}: {err}"
            ) from err
        leaves, treedef = jax.tree.flatten(state)
        owners = tuple(_owners(state, params))
        items, shared, n_shared = [], [], 0
        for layer in range(placement.num_layers):
            mine = [leaf for leaf, o in zip(leaves, owners) if o == layer]
            items.append(Item(placement.stacks.items[layer].device, tuple(a.shape for a in mine),
                              tuple(a.dtype for a in mine)))
        for o in owners:
            shared.append(n_shared if o == SHARED else -1)
            n_shared += o == SHARED
        layout = StackLayout.build(items, placement.num_devices)
        coupled = _coupling(optimizer, placement, params, state, owners)
        return cls(optimizer, placement, treedef, owners, layout, tuple(shared), tuple(leaves), not coupled, coupled)

    def leaf_positions(self, layer: int) -> list[int]:
        """Flattened state leaf indices of ``layer``, in its item's leaf order."""
        return [i for i, o in enumerate(self.owners) if o == layer]

    def to_tree(self, state: OptState) -> Any:
        """The state as the per-layer tree's optax state, on the host."""
        stacks = [np.asarray(a) for a in state.stacks]
        leaves = [None] * len(self.owners)
        for layer in range(self.placement.num_layers):
            for i, leaf in zip(self.leaf_positions(layer), self.layout.from_stacks(stacks, layer)):
                leaves[i] = leaf
        for i, s in enumerate(self.shared):
            if s >= 0:
                leaves[i] = np.asarray(state.shared[s])
        return jax.tree.unflatten(self.treedef, leaves)

    def from_tree(self, tree: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Host ``(stacks, shared)`` from the per-layer tree's optax state.

        Raises:
          ValueError: if the tree's structure or a leaf's shape differs.
        """
        try:
            leaves = self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(f"optimizer state does not have this optimizer's structure: {err}") from err
        for i, (leaf, struct) in enumerate(zip(leaves, self.structs)):
            if tuple(np.shape(leaf)) != tuple(struct.shape):
                raise ValueError(
                    f"optimizer state leaf {i} has shape {list(np.shape(leaf))}, expected {list(struct.shape)}"
                )
        per_layer = [[leaves[i] for i in self.leaf_positions(layer)] for layer in range(self.placement.num_layers)]
        stacks = self.layout.to_stacks(per_layer)
        shared = [np.asarray(leaves[i], self.structs[i].dtype) for i, s in enumerate(self.shared) if s >= 0]
        return stacks, shared

    def _device_tree(self, entries: Sequence[jax.Array], q: int, ones_like: Sequence[Any]) -> list:
        """Per-layer own leaves for device ``q``: its layers from the parameter (or gradient) ``entries``,
        others one-element placeholders."""
        placement = self.placement
        return [
            placement.own_read(entries, layer) if placement.stacks.items[layer].device == q else list(ones_like[layer])
            for layer in range(placement.num_layers)
        ]

    def local_step(self, q: int):
        """The update of device ``q``'s layers: ``(grads, state entries, shared, weights) -> (weights, entries, shared, sq)``."""
        placement, layout = self.placement, self.layout
        placeholders = _placeholders(placement)
        state_leaves_q = jax.tree.leaves(jax.eval_shape(self.optimizer.init, device_structs(placement, q)))

        def step(grads, entries, shared, weights):
            g = _trees(placement, self._device_tree(grads, q, placeholders))
            w = _trees(placement, self._device_tree(weights, q, placeholders))
            leaves = []
            for i, owner in enumerate(self.owners):
                if owner == SHARED:
                    leaves.append(shared[self.shared[i]])
                elif layout.items[owner].device == q:
                    leaves.append(None)
                else:
                    leaves.append(jnp.zeros(state_leaves_q[i].shape, state_leaves_q[i].dtype))
            for layer in range(placement.num_layers):
                if layout.items[layer].device == q:
                    for i, leaf in zip(self.leaf_positions(layer), layout.read(entries, layer)):
                        leaves[i] = leaf
            updates, new_state = self.optimizer.update(g, jax.tree.unflatten(self.treedef, leaves), w)
            new_w = optax.apply_updates(w, updates)
            new_leaves = jax.tree.leaves(new_state)
            for layer in range(placement.num_layers):
                if layout.items[layer].device == q:
                    weights = placement.own_write(weights, layer, jax.tree.leaves(new_w[layer]))
                    entries = layout.write(entries, layer, [new_leaves[i] for i in self.leaf_positions(layer)])
            shared = tuple(new_leaves[i] for i, s in enumerate(self.shared) if s >= 0)
            mine = [leaf for layer in range(placement.num_layers) if layout.items[layer].device == q
                    for leaf in jax.tree.leaves(g[layer])]
            sq = sum((jnp.sum(jnp.square(a.astype(jnp.float32))) for a in mine), jnp.zeros((), jnp.float32))
            return weights, entries, shared, sq

        return step

    def init_local(self, q: int):
        """The initial state entries of device ``q``'s layers: ``(entries, weights) -> (entries, shared)``."""
        placement, layout = self.placement, self.layout
        placeholders = _placeholders(placement)

        def init(entries, weights):
            w = _trees(placement, self._device_tree(weights, q, placeholders))
            new_leaves = jax.tree.leaves(self.optimizer.init(w))
            for layer in range(placement.num_layers):
                if layout.items[layer].device == q:
                    entries = layout.write(entries, layer, [new_leaves[i] for i in self.leaf_positions(layer)])
            return entries, tuple(new_leaves[i] for i, s in enumerate(self.shared) if s >= 0)

        return init


def layer_structs(placement: Placement) -> list[Any]:
    """The per-layer (own) parameter tree, as shape structs."""
    return _trees(placement, [[_struct(s, placement.dtype) for s in placement.specs[layer].own_shapes]
                         for layer in range(placement.num_layers)])


def device_structs(placement: Placement, q: int) -> list[Any]:
    """The per-layer tree device ``q``'s optimizer program sees: other devices' layers as placeholders."""
    return _trees(placement, [
        [_struct(s if placement.stacks.items[layer].device == q else (1,) * len(s), placement.dtype)
         for s in placement.specs[layer].own_shapes]
        for layer in range(placement.num_layers)
    ])


def _placeholders(placement: Placement) -> list[list[jax.Array]]:
    """Per layer, one-element leaves of each parameter's rank (``1`` in every dimension).

    One element, not zero: transformations compute from shapes (Muon divides
    by a dimension).
    """
    return [[jnp.zeros((1,) * len(s), placement.dtype) for s in placement.specs[layer].own_shapes]
            for layer in range(placement.num_layers)]


def _trees(placement: Placement, leaves: Sequence[Sequence[Any]]) -> list[Any]:
    """Per-layer own trees from per-layer own leaves."""
    return [jax.tree.unflatten(placement.specs[layer].own_structure, list(ls)) for layer, ls in enumerate(leaves)]


def _coupling(optimizer, placement: Placement, params: Any, state: Any, owners: Sequence[int]) -> str:
    """Why the update cannot run per device ('' if it can): an output depending on another device."""
    device = [placement.stacks.items[layer].device for layer in range(placement.num_layers)]
    param_tags = [device[path[0].idx] for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    state_tags = [SHARED if o == SHARED else device[o] for o in owners]
    try:
        sources = output_sources(optimizer.update, (params, state, params), param_tags + state_tags + param_tags)
    except Exception as err:  # the optimizer's own error, with context
        raise ValueError(
            f"optimizer.update fails on the per-layer parameter tree: {type(err).__name__}: {err}"
        ) from err
    treedef = jax.tree.structure(state)
    for q in range(placement.num_devices):
        local = jax.eval_shape(optimizer.init, device_structs(placement, q))
        if jax.tree.structure(local) != treedef:
            return f"its state's structure depends on the shapes of the layers (device {q}'s program differs)"
        for o, a, b in zip(owners, jax.tree.leaves(local), jax.tree.leaves(state)):
            if o == SHARED and (a.shape, a.dtype) != (b.shape, b.dtype):
                return f"its shared state depends on the shapes of the layers (device {q}'s program differs)"
    out_tags = param_tags + state_tags
    for where, (tag, src) in enumerate(zip(out_tags, sources)):
        allowed = {tag} if tag == SHARED else {tag, SHARED}
        others = set(src) - allowed
        if others:
            what = "an update" if where < len(param_tags) else "a state leaf"
            owner = "no layer" if tag == SHARED else f"device {tag}"
            return (f"{what} of {owner} depends on the layers of pipe devices {sorted(d for d in others if d >= 0)}"
                    + (" and on shared state" if SHARED in others else ""))
    return ""


def whole_tree_update(layer_opt: LayerOptimizer):
    """``(grads, state, weights) -> (weights, state, grad_norm)`` over the whole tree, outside ``shard_map``."""
    placement, layout = layer_opt.placement, layer_opt.layout

    def read(stacks, items: StackLayout, layer):
        item = items.items[layer]
        return [
            jnp.zeros(shape, dtype) if k < 0 else stacks[k][item.device].reshape(shape)
            for shape, dtype, k in zip(item.shapes, item.dtypes, items.places[layer])
        ]

    def read_own(stacks, layer):
        leaves = read(stacks, placement.stacks, layer)
        return [leaves[a] for a in placement.specs[layer].own_leaves]

    def update(grads, state: OptState, weights):
        g = _trees(placement, [read_own(grads, layer) for layer in range(placement.num_layers)])
        w = _trees(placement, [read_own(weights, layer) for layer in range(placement.num_layers)])
        leaves = [None] * len(layer_opt.owners)
        for layer in range(placement.num_layers):
            for i, leaf in zip(layer_opt.leaf_positions(layer), read(state.stacks, layout, layer)):
                leaves[i] = leaf
        for i, s in enumerate(layer_opt.shared):
            if s >= 0:
                leaves[i] = state.shared[s]
        updates, new_state = layer_opt.optimizer.update(g, jax.tree.unflatten(layer_opt.treedef, leaves), w)
        new_w = optax.apply_updates(w, updates)
        new_leaves = jax.tree.leaves(new_state)
        weights, stacks = list(weights), list(state.stacks)
        for layer in range(placement.num_layers):
            p = placement.stacks.items[layer].device
            places = placement.stacks.places[layer]
            for k, leaf in zip([places[a] for a in placement.specs[layer].own_leaves], jax.tree.leaves(new_w[layer])):
                if k >= 0:
                    weights[k] = weights[k].at[p].set(leaf.reshape(weights[k].shape[1:]).astype(weights[k].dtype))
            for k, i in zip(layout.places[layer], layer_opt.leaf_positions(layer)):
                if k >= 0:
                    stacks[k] = stacks[k].at[p].set(new_leaves[i].reshape(stacks[k].shape[1:]))
        shared = tuple(new_leaves[i] for i, s in enumerate(layer_opt.shared) if s >= 0)
        norm = jnp.sqrt(sum((jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(g)),
                            jnp.zeros((), jnp.float32)))
        return tuple(weights), OptState(tuple(stacks), shared), norm

    return update


def local_updates(layer_opt: LayerOptimizer, mesh: Mesh):
    """``(grads, state, weights) -> (weights, state, grad_norm)``: each device updates its own layers.

    One ``shard_map``; a ``lax.switch`` on the pipe index picks the device's
    program; split layers' extra copies and tied leaves are refreshed from
    their owners after (``placement.sync_copies_local``).
    """
    placement = layer_opt.placement
    steps = [layer_opt.local_step(q) for q in range(placement.num_devices)]
    n_shared = sum(1 for s in layer_opt.shared if s >= 0)

    def body(grads, entries, shared, weights):
        drop = lambda tree: tuple(a[0] for a in tree)  # noqa: E731
        p = lax.axis_index(PIPE_AXIS)
        grads, entries, weights, shared = drop(grads), drop(entries), drop(weights), tuple(shared)
        sq = jnp.zeros((), jnp.float32)
        # One two-branch cond per device (not one switch): XLA then updates the stacks in place.
        for q, step in enumerate(steps):
            def keep(g, e, s, w):
                return w, e, s, jnp.zeros((), jnp.float32)

            weights, entries, shared, sq_q = lax.cond(p == q, step, keep, grads, entries, shared, weights)
            sq = sq + sq_q
        weights = sync_copies_local(placement, weights, p)
        norm = jnp.sqrt(lax.psum(sq, PIPE_AXIS))
        return tuple(a[None] for a in weights), tuple(a[None] for a in entries), shared, norm

    pipe, rep = PartitionSpec(PIPE_AXIS), PartitionSpec()
    mapped = jax.shard_map(
        body, mesh=mesh,
        in_specs=(pipe, pipe, (rep,) * n_shared, pipe),
        out_specs=(pipe, pipe, (rep,) * n_shared, rep),
        check_vma=False,
    )

    def update(grads, state: OptState, weights):
        new_w, new_e, new_shared, norm = mapped(grads, state.stacks, state.shared, weights)
        return new_w, OptState(new_e, new_shared), norm

    return update


def local_init(layer_opt: LayerOptimizer, mesh: Mesh):
    """``weights -> OptState``: each device initialises its own layers' state."""
    placement, layout = layer_opt.placement, layer_opt.layout
    inits = [layer_opt.init_local(q) for q in range(placement.num_devices)]
    n_shared = sum(1 for s in layer_opt.shared if s >= 0)
    zeros = [jnp.zeros(s.shape[1:], s.dtype) for s in layout.zeros()]

    def body(weights):
        p, weights = lax.axis_index(PIPE_AXIS), tuple(a[0] for a in weights)
        entries = tuple(zeros)
        for q, init in enumerate(inits):
            entries = lax.cond(p == q, lambda e, w, init=init: init(e, w)[0], lambda e, w: e, entries, weights)
        # Shared leaves (counts, hyperparameters) do not depend on the layers: any device's program gives them.
        placeholders = _trees(placement, _placeholders(placement))
        init_leaves = jax.tree.leaves(layer_opt.optimizer.init(placeholders))
        shared = tuple(init_leaves[i] for i, s in enumerate(layer_opt.shared) if s >= 0)
        return tuple(a[None] for a in entries), shared

    pipe, rep = PartitionSpec(PIPE_AXIS), PartitionSpec()
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(pipe,), out_specs=(pipe, (rep,) * n_shared), check_vma=False)
    return lambda weights: OptState(*mapped(weights))
