"""Random numbers inside layers: keys that do not depend on the mesh, schedule or cut.

A layer built with ``nnx.Rngs`` streams (``nnx.Dropout(rate, rngs=rngs)``,
stochastic depth, noise, a Linen module bridged with ``nnx.bridge.ToNNX``)
holds each stream as an ``nnx.RngKey`` and an ``nnx.RngCount``. jaxpipe
keeps neither: for every step and micro-batch it sets stream ``j`` of layer
``l`` (its ``j``-th ``RngKey`` in ``nnx.to_flat_state`` order) to::

    key = random.key(seed)
    key = fold_in(key, step)   # TrainState.step, the optimizer steps taken
    key = fold_in(key, g)      # the global micro-batch: rows [g * B, (g + 1) * B) of the global batch
    key = fold_in(key, l)      # the layer's position in the model
    key = fold_in(key, j)      # the stream; its count starts at 0

with ``g = replica * M + m``. Nothing else enters, so every mesh, schedule
and cut draws the same numbers for the same global batch and the same rows
per micro-batch ``B``. Layers whose output depends on their streams
(``draws``) are never split by rows (``Pipeline.unsplittable``): a piece of a
layer would have to draw its own rows' numbers from the whole micro-batch's
key, which a layer's own calls (``random.bernoulli(key, x.shape)``) cannot do.

Keys travel between functions as raw ``uint32`` key data, so no typed key
array ever becomes a switch operand or a stored residual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def stream_paths(rest: Any) -> tuple[tuple[Any, ...], ...]:
    """Paths of the ``nnx.RngKey`` variables in a layer's non-parameter state, in stream order."""
    return tuple(tuple(path) for path, var in nnx.to_flat_state(rest) if isinstance(var, nnx.RngKey))


def step_key(seed: int, step: Any) -> jax.Array:
    """Key data of ``fold_in(key(seed), step)``."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32)))


def microbatch_key(key: jax.Array, microbatch: Any) -> jax.Array:
    """Key data of ``fold_in(key, microbatch)`` for step key data ``key`` and global micro-batch ``g``."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), jnp.asarray(microbatch, jnp.uint32)))


def with_keys(rest: Any, layer: int, key: jax.Array | None) -> Any:
    """``rest`` with every RNG stream set from micro-batch key data ``key``, counts 0.

    The stream variables are always new objects, made in the caller's trace:
    a stream advances its count when drawn, and flax refuses to change a
    variable made outside the trace.

    Args:
      rest: a layer's non-parameter state.
      layer: the layer's position in the model.
      key: the micro-batch's key data (``microbatch_key``); ``None`` keeps
        the keys the layer was built with (shape tracing, costs).

    Returns:
      The state with stream ``j``'s key ``fold_in(fold_in(key, layer), j)``.
    """
    layer_key = None if key is None else jax.random.fold_in(jax.random.wrap_key_data(key), layer)
    out, j = [], 0
    for path, var in nnx.to_flat_state(rest):
        if isinstance(var, nnx.RngKey):
            var = var.replace(value=var.get_value() if layer_key is None else jax.random.fold_in(layer_key, j))
            j += 1
        elif isinstance(var, nnx.RngCount):
            var = var.replace(value=var.get_value() if layer_key is None else jnp.zeros((), jnp.uint32))
        out.append((path, var))
    return nnx.from_flat_state(out)


def eval_graphdef(graphdef: Any, params: Any, rest: Any) -> Any:
    """The graph definition of the layer in evaluation mode (``layer.eval()``), on a copy."""
    layer = nnx.merge(graphdef, params, rest)
    layer.eval()
    return nnx.split(layer, nnx.Param, ...)[0]


def _tainted_outputs(jaxpr: Any, tainted_inputs: Sequence[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` may depend on the tainted inputs (conservative)."""
    tainted = {v for v, t in zip(jaxpr.invars, tainted_inputs) if t}
    for eqn in jaxpr.eqns:
        flags = [not isinstance(v, jax.extend.core.Literal) and v in tainted for v in eqn.invars]
        if not any(flags):
            continue
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        inner = getattr(inner, "jaxpr", inner)
        if isinstance(inner, jax.extend.core.Jaxpr) and len(inner.invars) == len(flags):
            outs = _tainted_outputs(inner, flags)
        else:
            outs = [True] * len(eqn.outvars)
        tainted.update(v for v, t in zip(eqn.outvars, outs) if t)
    return [not isinstance(v, jax.extend.core.Literal) and v in tainted for v in jaxpr.outvars]


def draws(spec: Any, params: Any, x: Any, deterministic: bool) -> bool:
    """Whether layer ``spec``'s output depends on its RNG streams' keys.

    Traced abstractly: the dependence is followed through the layer's
    program, conservatively (an operation with a key among its inputs counts
    as using it, except nested jitted calls, which are followed). A Linen
    bridge draws from its streams on every call, but a module without
    dropout never uses the result.

    Args:
      spec: a ``layers.LayerSpec`` with RNG streams.
      params: its parameter tree (or shape structs).
      x: its input (shape structs).
      deterministic: check the layer in evaluation mode (``layer.eval()``).
    """
    from .layers import apply_layer  # layers imports this module

    key = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
    closed = jax.make_jaxpr(lambda k, p, h: apply_layer(spec, p, h, key=k, deterministic=deterministic))(
        key, params, x)
    flags = [True] + [False] * (len(closed.jaxpr.invars) - 1)
    return any(_tainted_outputs(closed.jaxpr, flags))


def uses_rng(specs: Sequence[Any]) -> bool:
    """Whether any layer spec holds RNG streams."""
    return any(spec.streams for spec in specs)
