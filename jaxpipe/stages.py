"""Heterogeneous Flax layers as pure functions, and the wire format between them.

SPMD needs one shape per sharded array, but pipeline devices hold different
layers and pass differently shaped activations. Parameters keep their
natural shapes in stacks (``stacks.py``); activations are made one shape
here:

* Each layer becomes a pure function ``apply_layer(spec, params, x)`` over its
  ``nnx.Param`` tree; anything else the layer holds is a constant, except
  RNG streams, which get a key per step and micro-batch (``rng.py``).
* A *tie* is one ``nnx.Param`` that several layers reach (weight tying: an
  output head reading the embedding's matrix). The first layer that reaches
  it owns it; in every later layer it is a *tied leaf*: still in the
  layer's full tree (``apply_layer`` needs it), left out of the layer's own
  tree (``LayerSpec.own``), which is what the optimizer, ``unpack`` and
  checkpoints see, as ``nnx.split`` of the whole layer list gives
  (``merge_layers`` rebuilds the shared objects).
* A boundary activation (any pytree whose leaves all have ``B`` leading rows)
  travels as two row-major buffers: floats ``[B, F]`` in one float dtype and
  integers ``[B, I]`` as int32, both padded to the widest boundary, so
  integer token ids and float hidden states share one wire format exactly.
* Mixed precision: with a compute dtype every layer's parameters and float
  inputs are cast to it (``cast_floats``), so the traced boundaries, and with
  them the float buffer, have it; the loss sees float32 (``loss_precision``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
        its owner layer), as ``Pipeline.unpack`` gives.
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


def _kind(dtype) -> str:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if dtype == jnp.bool_ or (jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize <= 4):
        return "int"
    raise TypeError(
        f"boundary activations must be floats, bools or integers of at most 32 "
        f"bits, got dtype {dtype}"
    )


@dataclasses.dataclass(frozen=True)
class Boundary:
    """The structure of one activation between two layers, per micro-batch.

    Attributes:
      treedef: tree structure of the activation.
      shapes: leaf shapes, each ``[B, ...]``.
      dtypes: leaf dtypes.
      kinds: ``"float"`` or ``"int"`` per leaf: which buffer carries it.
      offsets: per leaf, its start column in that buffer.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    kinds: tuple[str, ...]
    offsets: tuple[int, ...]

    @classmethod
    def from_struct(cls, struct: Any, rows: int, where: str) -> "Boundary":
        """Builds a boundary from a pytree of ``jax.ShapeDtypeStruct``."""
        leaves, treedef = jax.tree.flatten(struct)
        if not leaves:
            raise ValueError(f"{where} is empty; every boundary needs at least one array")
        kinds, offsets, used = [], [], {"float": 0, "int": 0}
        for path, leaf in jax.tree_util.tree_leaves_with_path(struct):
            if leaf.ndim == 0 or leaf.shape[0] != rows:
                at = jax.tree_util.keystr(path)
                raise ValueError(
                    f"{where} has a leaf{' at ' + at if at else ''} of shape {tuple(leaf.shape)}; "
                    "every activation leaf that crosses pipe devices must have the "
                    f"micro-batch's {rows} rows first"
                )
            kind = _kind(leaf.dtype)
            kinds.append(kind)
            offsets.append(used[kind])
            used[kind] += math.prod(leaf.shape[1:])
        return cls(
            treedef,
            tuple(tuple(leaf.shape) for leaf in leaves),
            tuple(jnp.dtype(leaf.dtype) for leaf in leaves),
            tuple(kinds),
            tuple(offsets),
        )

    def width(self, kind: str) -> int:
        """Columns this boundary uses in the ``kind`` buffer."""
        return sum(
            math.prod(s[1:]) for s, k in zip(self.shapes, self.kinds) if k == kind
        )


@dataclasses.dataclass(frozen=True)
class Carrier:
    """The wire format of every boundary: ``[B, F]`` floats and ``[B, I]`` int32.

    Attributes:
      rows: B, rows per micro-batch.
      float_width: F (>= 1).
      int_width: I (>= 1).
      float_dtype: the float buffer's dtype (all float boundaries promote to it).
    """

    rows: int
    float_width: int
    int_width: int
    float_dtype: Any

    @classmethod
    def for_boundaries(cls, boundaries: Sequence[Boundary], rows: int) -> "Carrier":
        floats = [d for b in boundaries for d, k in zip(b.dtypes, b.kinds) if k == "float"]
        return cls(
            rows=rows,
            float_width=max([1] + [b.width("float") for b in boundaries]),
            int_width=max([1] + [b.width("int") for b in boundaries]),
            float_dtype=jnp.result_type(*floats) if floats else jnp.dtype(jnp.float32),
        )

    def zeros(self, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Empty float and int buffers."""
        rows = self.rows if rows is None else rows
        return (
            jnp.zeros((rows, self.float_width), self.float_dtype),
            jnp.zeros((rows, self.int_width), jnp.int32),
        )

    def pack(self, boundary: Boundary, tree: Any) -> tuple[jax.Array, jax.Array]:
        """Packs an activation into ``([B, F], [B, I])`` buffers.

        Built by concatenating the leaves' columns (each kind's offsets are
        consecutive) and zero padding, not by scattering into zeros: a
        scatter covering a whole buffer crashes XLA 0.11's CPU compiler.
        """
        leaves = jax.tree.leaves(tree)
        rows = leaves[0].shape[0]
        parts = {"float": [], "int": []}
        for leaf, kind, off in sorted(zip(leaves, boundary.kinds, boundary.offsets), key=lambda e: e[2]):
            flat = leaf.reshape(rows, -1)
            if kind == "float":
                flat = flat.astype(self.float_dtype)
            else:
                if flat.dtype == jnp.uint32:
                    flat = jax.lax.bitcast_convert_type(flat, jnp.int32)
                flat = flat.astype(jnp.int32)
            parts[kind].append(flat)
        out = []
        for kind, width, dtype in (("float", self.float_width, self.float_dtype), ("int", self.int_width, jnp.int32)):
            used = sum(p.shape[1] for p in parts[kind])
            if used < width:
                parts[kind].append(jnp.zeros((rows, width - used), dtype))
            out.append(parts[kind][0] if len(parts[kind]) == 1 else jnp.concatenate(parts[kind], axis=1))
        return out[0], out[1]

    def unpack(self, boundary: Boundary, fbuf: jax.Array, ibuf: jax.Array) -> Any:
        """Recovers an activation from its ``([B, F], [B, I])`` buffers."""
        leaves = []
        for shape, dtype, kind, off in zip(
            boundary.shapes, boundary.dtypes, boundary.kinds, boundary.offsets
        ):
            cols = math.prod(shape[1:])
            if kind == "float":
                leaf = fbuf[:, off : off + cols].astype(dtype)
            else:
                leaf = ibuf[:, off : off + cols]
                leaf = (
                    jax.lax.bitcast_convert_type(leaf, dtype)
                    if dtype == jnp.uint32
                    else leaf.astype(dtype)
                )
            leaves.append(leaf.reshape((fbuf.shape[0],) + shape[1:]))
        return jax.tree.unflatten(boundary.treedef, leaves)


def _struct(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def trace_boundaries(
    specs: Sequence[LayerSpec], params: Sequence[Any], x: Any, compute_dtype: Any = None
) -> list[Any]:
    """Shapes of every activation, from the model input to the model output.

    Args:
      specs: the layer specs.
      params: the per-layer parameter trees (already in the compute dtype).
      x: one micro-batch of model input (arrays or ``ShapeDtypeStruct``), ``[B, ...]``.
      compute_dtype: if set, every layer's float inputs are cast to it (as
        the executors do), so entries ``0 .. L - 1`` have it.

    Returns:
      ``L + 1`` pytrees of ``jax.ShapeDtypeStruct``: entry ``i`` is the input
      of layer ``i``; the last is the model output (not cast).

    Raises:
      ValueError: naming the layer index, class and input shape, if a layer
        fails on the shape it receives.
    """
    structs = [cast_floats(_struct(x), compute_dtype)]
    for i, (spec, p) in enumerate(zip(specs, params)):
        try:
            out = jax.eval_shape(lambda p_, x_: apply_layer(spec, p_, x_), p, structs[-1])
        except Exception as err:  # the layer's own error, re-raised with context
            shapes = jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", structs[-1])
            raise ValueError(
                f"layer {spec.index} ({spec.name}) fails on its input {shapes}: "
                f"{type(err).__name__}: {err}"
            ) from err
        structs.append(out if i == len(specs) - 1 else cast_floats(out, compute_dtype))
    return structs


def check_rows_follow(struct: Any, probe: Any, probe_rows: int, where: str) -> None:
    """Checks that every leaf's first dimension is the micro-batch's rows.

    A leaf whose first dimension only happens to equal the rows B (an array
    of fixed size independent of the batch) is caught by comparing with the
    same boundary traced for micro-batches of ``probe_rows`` rows.

    Args:
      struct: the boundary's structure for micro-batches of B rows.
      probe: the same boundary's structure for micro-batches of ``probe_rows``
        rows (not compared if its tree structure differs).
      probe_rows: the other row count, not B.
      where: what the boundary is, for the message.

    Raises:
      ValueError: naming the leaf and its shape, if its first dimension does
        not follow the number of rows.
    """
    if jax.tree.structure(probe) != jax.tree.structure(struct):
        return
    for (path, leaf), other in zip(jax.tree_util.tree_leaves_with_path(struct), jax.tree.leaves(probe)):
        if other.ndim == 0 or other.shape[0] != probe_rows:
            at = jax.tree_util.keystr(path)
            raise ValueError(
                f"{where} has a leaf{' at ' + at if at else ''} of shape {tuple(leaf.shape)} "
                f"whose first dimension does not follow the rows (it is {tuple(other.shape)} "
                f"for micro-batches of {probe_rows} rows); every activation leaf that crosses "
                "pipe devices must have one entry per row first, [rows, ...]. Compute "
                "batch-independent arrays inside the layer that uses them"
            )


def trace_at_rows(specs: Sequence[LayerSpec], params: Sequence[Any], x: Any, rows: int) -> list[Any] | None:
    """Like ``trace_boundaries`` for micro-batches of ``rows`` rows, in one trace.

    Args:
      specs: the layer specs.
      params: the per-layer parameter trees.
      x: one micro-batch of model input (arrays or ``ShapeDtypeStruct``); its
        leading dimension is replaced by ``rows``.
      rows: the number of rows to trace with.

    Returns:
      ``len(specs) + 1`` pytrees of ``jax.ShapeDtypeStruct``, or ``None`` if
      the layers do not run on micro-batches of ``rows`` rows.
    """
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct((rows,) + tuple(a.shape[1:]), a.dtype), x)

    def run(ps, h):
        outs = [h]
        for spec, p in zip(specs, ps):
            h = apply_layer(spec, p, h)
            outs.append(h)
        return outs

    try:
        return jax.eval_shape(run, list(params), x)
    except Exception:  # noqa: BLE001 - a layer bound to one row count: nothing to compare
        return None


def largest_activation_bytes(structs: Sequence[Any]) -> float:
    """Bytes of the largest activation between layers, one micro-batch."""
    return float(max(
        sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(s)) for s in structs
    ))


def vjp_residuals(backward_fn: Callable, *args: Any) -> tuple[Any, tuple[tuple[tuple[int, ...], Any, int], ...]]:
    """What a backward function made by ``jax.vjp`` keeps, traced abstractly.

    Args:
      backward_fn: ``(*args) -> vjp_fn``: runs a forward on ``args`` under
        ``jax.vjp`` and returns its backward function (a pytree whose leaves
        are the residuals).
      *args: the forward's inputs, arrays or ``ShapeDtypeStruct`` pytrees.

    Returns:
      ``(treedef, residuals)``: the backward function's tree structure (it
      holds no arrays) and, per residual leaf, ``(shape, dtype, input)``,
      where ``input`` is the index of the flattened ``args`` leaf that the
      residual is (held anyway, no need to store it), or -1 for a value the
      forward computed.
    """
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
    closed, out = jax.make_jaxpr(backward_fn, return_shape=True)(*structs)
    invars = {id(v): i for i, v in enumerate(closed.jaxpr.invars)}
    residuals = tuple(
        (tuple(v.aval.shape), jnp.dtype(v.aval.dtype), invars.get(id(v), -1)) for v in closed.jaxpr.outvars
    )
    return jax.tree.structure(out), residuals


def residual_bytes(specs: Sequence[LayerSpec], params: Sequence[Any], structs: Sequence[Any]) -> list[float]:
    """``[L]`` bytes each layer's forward saves for its backward, one micro-batch.

    The residuals of ``jax.vjp`` with respect to the layer's parameters,
    leaving out those that are the layer's own inputs (its parameters and its
    input activation, which are held anyway). Traced abstractly: no compute.

    Args:
      specs: the layer specs.
      params: ``[L]`` parameter trees.
      structs: ``L + 1`` activation structures (``trace_boundaries``).

    Returns:
      ``[L]`` bytes.
    """
    out = []
    for spec, tree, struct in zip(specs, params, structs):
        def backward_fn(p, x, spec=spec):
            return jax.vjp(lambda p_: apply_layer(spec, p_, x), p)[1]

        _, residuals = vjp_residuals(backward_fn, tree, struct)
        out.append(float(sum(
            math.prod(shape) * dtype.itemsize for shape, dtype, where in residuals if where < 0
        )))
    return out
