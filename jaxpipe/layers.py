"""Heterogeneous Flax layers as pure functions: specs, ties, state and dtype checks, casts.

``docs/design.md`` ("Modules", "Glossary") places this module; the wire
format between stages is ``wire.py``, abstract traces of the layers are
``tracing.py``.

* Each layer becomes a pure function ``apply_layer(spec, params, x)`` over its
  ``nnx.Param`` tree; anything else the layer holds is a constant, except
  RNG streams, which get a key per step and micro-batch (``rng.py``).
* A *tie* is one ``nnx.Param`` that several layers reach (weight tying: an
  output head reading the embedding's matrix). The first layer that reaches
  it owns it; in every later layer it is a *tied leaf*: still in the
  layer's full tree (``apply_layer`` needs it), left out of the layer's own
  tree (``LayerSpec.own``), which is what the optimizer, ``from_stacks`` and
  checkpoints see, as ``nnx.split`` of the whole layer list gives
  (``merge_layers`` rebuilds the shared objects).
* Mixed precision: with a compute dtype every layer's parameters and float
  inputs are cast to it (``cast_floats``), so the traced boundaries, and with
  them the float buffer of the wire format, have it; the loss sees float32
  (``loss_precision``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .rng import eval_graphdef, stream_paths, with_keys


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static description of one layer: how to rebuild and call it.

    Attributes:
      index: position of the layer in the model's layer list.
      name: the layer's class name, for messages and profiles.
      graphdef: the layer's ``nnx.GraphDef``.
      rest: the layer's non-parameter state, held constant.
      treedef: tree structure of the layer's ``nnx.Param`` state.
      shapes: shapes of the parameter leaves, in ``treedef`` order.
      streams: paths of the layer's RNG stream keys (``rng.stream_paths``);
        empty for a layer that draws no random numbers.
      eval_graphdef: the graph definition after ``layer.eval()`` (dropout
        off, frozen statistics), used by ``apply_layer(..., deterministic=True)``.
      tied: per tied leaf ``(leaf, owner layer, owner leaf)``: leaf ``leaf``
        of this layer is leaf ``owner leaf`` of the earlier layer ``owner
        layer`` (leaf indices in ``treedef`` order); empty without ties.
      own_treedef: tree structure of the layer's own tree (its leaves less
        the tied ones); ``None``: ``treedef``.
    """

    index: int
    name: str
    graphdef: Any
    rest: Any
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    streams: tuple[tuple[Any, ...], ...] = ()
    eval_graphdef: Any = None
    tied: tuple[tuple[int, int, int], ...] = ()
    own_treedef: Any = None

    @property
    def size(self) -> int:
        """Number of parameter scalars (tied leaves included: the layer's device holds them)."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def own_leaves(self) -> tuple[int, ...]:
        """Indices (``treedef`` order) of the leaves this layer owns: all but the tied ones."""
        tied = {leaf for leaf, _, _ in self.tied}
        return tuple(a for a in range(len(self.shapes)) if a not in tied)

    @property
    def own_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the own leaves, in order."""
        return tuple(self.shapes[a] for a in self.own_leaves)

    @property
    def own_structure(self) -> Any:
        """Tree structure of the own tree."""
        return self.treedef if self.own_treedef is None else self.own_treedef

    def own(self, tree: Any) -> Any:
        """The own tree of a full parameter tree (or full leaf list) of this layer."""
        leaves = jax.tree.leaves(tree)
        return jax.tree.unflatten(self.own_structure, [leaves[a] for a in self.own_leaves])


def split_layers(layers: Sequence[nnx.Module]) -> tuple[list[LayerSpec], list[Any], Any]:
    """Splits Flax layers into static specs and parameter trees.

    Args:
      layers: the model's layers, in order.

    Returns:
      ``(specs, params, dtype)``: one spec and one ``nnx.State`` of parameters
      per layer (its full tree: tied leaves included, see ``find_ties``), and
      the common parameter dtype.

    Raises:
      TypeError: if a layer is not an ``nnx.Module``, holds state that
        ``check_state`` refuses, or the layers' parameters do not share one
        floating dtype.
    """
    if isinstance(layers, nnx.Module) or not isinstance(layers, Sequence):
        raise TypeError(
            "model_fn must return a list of nnx.Module layers in order, got "
            f"{type(layers).__name__}"
        )
    if not layers:
        raise ValueError("model_fn returned no layers; it must return a non-empty list of nnx.Module layers")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nnx.Module):
            raise TypeError(
                f"layer {i} is a {type(layer).__name__}, expected an nnx.Module"
            )
    ties = find_ties(layers)
    specs, params, dtypes, paths = [], [], {}, []
    for i, layer in enumerate(layers):
        graphdef, param_state, rest = nnx.split(layer, nnx.Param, ...)
        check_state(i, layer, rest)
        leaves, treedef = jax.tree.flatten(param_state)
        paths.append(param_paths(param_state))
        tied = tuple(
            (paths[i].index(path), owner, paths[owner].index(owner_path))
            for path, (owner, owner_path) in sorted(ties[i].items(), key=lambda e: paths[i].index(e[0]))
        )
        own_treedef = jax.tree.structure(
            nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(param_state) if p not in ties[i]])
        ) if tied else None
        for leaf in leaves:
            dtypes.setdefault(jnp.dtype(leaf.dtype), f"layer {i} ({type(layer).__name__})")
        specs.append(
            LayerSpec(
                index=i,
                name=type(layer).__name__,
                graphdef=graphdef,
                rest=rest,
                treedef=treedef,
                shapes=tuple(tuple(leaf.shape) for leaf in leaves),
                streams=stream_paths(rest),
                eval_graphdef=eval_graphdef(graphdef, param_state, rest),
                tied=tied,
                own_treedef=own_treedef,
            )
        )
        params.append(param_state)
    if len(dtypes) > 1 or any(not jnp.issubdtype(d, jnp.floating) for d in dtypes):
        found = ", ".join(f"{d} (first in {where})" for d, where in dtypes.items())
        raise TypeError(
            "all parameters must share one floating dtype (the master parameters, "
            f"gradients and optimizer state are kept in it), got {found}; build every layer with the same float param_dtype"
        )
    dtype = next(iter(dtypes)) if dtypes else jnp.dtype(jnp.float32)
    return specs, params, dtype


def check_state(index: int, layer: nnx.Module, rest: Any) -> None:
    """Refuses non-parameter state a pipeline would not keep exact.

    Everything a layer holds besides ``nnx.Param`` is a constant of the
    pipeline, except RNG streams (``nnx.RngKey`` / ``nnx.RngCount``), which
    get a key per step, micro-batch and layer (``rng.py``). Constants are
    exact for buffers and for frozen batch statistics
    (``nnx.BatchNorm(..., use_running_average=True)``, or after
    ``layer.eval()``), not for running statistics a layer updates: per
    micro-batch updates would depend on the schedule's order and on how a
    cut splits rows (see BUILD_NOTES.md, "Jobs and data").

    Args:
      index: the layer's position, for messages.
      layer: the layer.
      rest: its non-``nnx.Param`` state (``nnx.split(layer, nnx.Param, ...)``).

    Raises:
      TypeError: for batch statistics that are not frozen.
    """
    flat = [(path, var) for path, var in nnx.to_flat_state(rest)]
    where = f"layer {index} ({type(layer).__name__})"
    modules = dict(nnx.iter_modules(layer))
    updated = [
        "/".join(map(str, path)) for path, var in flat
        if isinstance(var, nnx.BatchStat) and not (
            isinstance(modules.get(path[:-1]), nnx.BatchNorm) and modules[path[:-1]].use_running_average is True
        )
    ]
    if updated:
        raise TypeError(
            f"{where} holds batch statistics at {updated} that it would update; jaxpipe trains "
            "nnx.Param state only, and running statistics updated per micro-batch would depend on "
            "the schedule's order and on how a cut splits rows. Normalise per row instead "
            "(nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm), or freeze the statistics: "
            "nnx.BatchNorm(..., use_running_average=True) or layer.eval(), which jaxpipe keeps constant"
        )


def find_ties(layers: Sequence[nnx.Module]) -> list[dict]:
    """Which parameters layers share: per layer, ``{path: (owner layer, owner path)}``.

    A parameter is one ``nnx.Param`` object; the layer that reaches it first
    (lowest index) owns it, and each later layer that reaches it (through the
    same ``nnx.Param``, the same sub-module, or the same layer instance
    listed twice) holds a tied leaf at the path where ``nnx.split`` of that
    layer alone puts it. Exact: found by object identity, as ``nnx`` itself
    shares variables.

    Args:
      layers: the model's layers, in order.

    Returns:
      ``[L]`` dicts, empty for a layer with no tied leaf.
    """
    owner: dict = {}
    out = []
    for i, layer in enumerate(layers):
        ties = {}
        for path, node in nnx.graph.iter_graph(layer):
            if not isinstance(node, nnx.Param):
                continue
            first = owner.setdefault(id(node), (i, path))
            if first[0] != i:
                ties[path] = first
        out.append(ties)
    return out


def param_paths(state: Any) -> list[tuple[Any, ...]]:
    """The ``nnx`` path of each leaf of a parameter ``nnx.State``, in ``jax.tree.flatten`` order."""
    return [
        tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        for key_path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
    ]


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """The whole layer list as one ``nnx`` graph, to rebuild layers with their ties.

    Attributes:
      graphdef: ``nnx.split(list(layers), nnx.Param, ...)``'s graph definition.
      rest: its non-parameter state.
    """

    graphdef: Any
    rest: Any


def model_graph(layers: Sequence[nnx.Module]) -> ModelGraph:
    """The layers' joint graph (``ModelGraph``)."""
    graphdef, _, rest = nnx.split(list(layers), nnx.Param, ...)
    return ModelGraph(graphdef, rest)


def merge_layers(graph: ModelGraph, own_trees: Sequence[Any]) -> list[nnx.Module]:
    """The layers, as ``model_fn`` returned them, with the parameters of ``own_trees``.

    Objects the layers shared are shared again: a tied leaf is its owner's
    ``nnx.Param`` (or sub-module, or layer), so the layers can be trained
    further with ``nnx`` as one model.

    Args:
      graph: the layers' joint graph.
      own_trees: ``[L]`` own trees (``LayerSpec.own``; a tied leaf only in
        its owner layer), as ``Pipeline.from_stacks`` gives.
    """
    flat = [((i,) + path, var) for i, tree in enumerate(own_trees) for path, var in nnx.to_flat_state(tree)]
    return list(nnx.merge(graph.graphdef, nnx.from_flat_state(flat), graph.rest))


def check_float_dtype(value: Any, name: str) -> Any:
    """``value`` as a floating ``np.dtype``, or ``None`` for ``None``.

    Args:
      value: a dtype (``jnp.bfloat16``, ``"float32"``, ...) or ``None``.
      name: the option's name, for messages.

    Raises:
      TypeError: if ``value`` is not a dtype.
      ValueError: if it is not a floating dtype, or a 64-bit one while
        ``jax_enable_x64`` is off (JAX would silently compute in 32 bits).
    """
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a floating dtype such as jnp.float32 or jnp.bfloat16, or None, got {value!r}"
        ) from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating dtype such as jnp.float32 or jnp.bfloat16, got {dtype}"
        )
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"{name}={dtype} needs jax.config.update('jax_enable_x64', True); without it "
            f"JAX computes in {jax.dtypes.canonicalize_dtype(dtype)}"
        )
    return dtype


def cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating leaves cast to ``dtype`` (``None``: unchanged).

    Integer and bool leaves (token ids) are kept as they are. Works on arrays
    and on ``jax.ShapeDtypeStruct`` leaves.
    """
    if dtype is None:
        return tree
    return jax.tree.map(lambda a: _astype(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def loss_precision(tree: Any) -> Any:
    """``tree`` with floating leaves narrower than float32 widened to float32.

    With a ``compute_dtype`` the model output (logits) is widened before
    ``loss_fn``, so softmax and the mean over rows run in at least float32.
    """
    return jax.tree.map(
        lambda a: _astype(a, jnp.float32)
        if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4 else a,
        tree,
    )


def _astype(leaf: Any, dtype: Any) -> Any:
    if jnp.dtype(leaf.dtype) == jnp.dtype(dtype):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, dtype)
    return leaf.astype(dtype)


def apply_layer(spec: LayerSpec, params: Any, x: Any, key: Any = None, deterministic: bool = False) -> Any:
    """Calls layer ``spec`` with parameters ``params`` on input ``x``.

    Args:
      spec: the layer.
      params: its parameter tree.
      x: its input.
      key: the micro-batch's key data (``rng.microbatch_key``): the layer's
        RNG streams are set from it (``rng.with_keys``). ``None``: the streams
        keep the keys the layer was built with (shape tracing, costs).
      deterministic: run the layer in evaluation mode (``layer.eval()``).
    """
    rest = with_keys(spec.rest, spec.index, key) if spec.streams else spec.rest
    graphdef = spec.eval_graphdef if deterministic and spec.eval_graphdef is not None else spec.graphdef
    return nnx.merge(graphdef, params, rest)(x)
