"""Abstract traces of the layers: activation shapes and residual sizes, no compute.

What the build needs to know about the layers before anything runs
(``docs/design.md``, "Build flow"): the shape of every activation between
layers for one micro-batch (``trace_boundaries``), the same at another row
count to prove each leaf's first dimension is the rows (``trace_at_rows``,
``check_rows_follow``), the largest activation (``largest_activation_bytes``),
and what ``jax.vjp`` keeps for a backward (``vjp_residuals``,
``residual_bytes``), under the policy every executor saves by
(``keep_costly``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .layers import LayerSpec, apply_layer, cast_floats


# Primitives whose outputs a stage's forward does not save for its backward: elementwise and
# shape operations, which the backward recomputes from a saved matmul, convolution or reduction
# output (or from the stage's inputs) for about the cost of reading them back. A GELU MLP layer
# otherwise saves five activation-sized intermediates besides its matmul output.
RECOMPUTED = frozenset({
    "abs", "add", "add_any", "and", "broadcast_in_dim", "ceil", "clamp", "convert_element_type", "copy",
    "cos", "div", "eq", "erf", "erf_inv", "exp", "exp2", "expand_dims", "expm1", "floor", "ge", "gt",
    "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg",
    "not", "or", "pow", "reshape", "round", "rsqrt", "select_n", "sign", "sin", "sqrt", "square",
    "squeeze", "stop_gradient", "sub", "tan", "tanh", "transpose",
})


def _costly(prim: Any, *_: Any, **__: Any) -> bool:
    return prim.name not in RECOMPUTED


def keep_costly(fn: Callable) -> Callable:
    """``fn`` under ``jax.checkpoint`` saving every value but those of ``RECOMPUTED`` primitives.

    Each stage's forward runs under it, so a stage's residual buffer slot holds
    the outputs of its matmuls, convolutions, reductions and gathers, and the
    backward recomputes the elementwise chains in between (no matmul twice).
    """
    return jax.checkpoint(fn, policy=_costly, prevent_cse=False)


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


def boundary_bytes(structs: Sequence[Any]) -> list[float]:
    """``[L + 1]`` bytes of each activation between layers (and the model's input and output), one micro-batch."""
    return [float(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(s))) for s in structs]


def largest_activation_bytes(structs: Sequence[Any]) -> float:
    """Bytes of the largest activation between layers, one micro-batch."""
    return max(boundary_bytes(structs))


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
    under the executors' ``keep_costly`` policy, leaving out those that are
    the layer's own inputs (its parameters and its
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
            return jax.vjp(keep_costly(lambda p_: apply_layer(spec, p_, x)), p)[1]

        _, residuals = vjp_residuals(backward_fn, tree, struct)
        out.append(float(sum(
            math.prod(shape) * dtype.itemsize for shape, dtype, where in residuals if where < 0
        )))
    return out
