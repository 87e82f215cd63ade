"""Which inputs of a traced function each output depends on.

Used to decide, before training, whether an optax transformation can run on
each pipe device separately (every update depends only on that device's
layers) or couples layers across devices (global-norm clipping, a global
finiteness check), from the transformation's own jaxpr. The analysis is
conservative: an equation's outputs depend on all of its inputs, except
for calls (``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``)
and ``cond`` whose bodies are followed, so a per-leaf ``jax.jit`` inside
optax, or ``MultiSteps``'s conditional update, does not couple the leaves
it is mapped over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

_CALLS = {
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


def _inner(eqn) -> Any:
    key = _CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    inner = eqn.params[key]
    return getattr(inner, "jaxpr", inner)


def _sources(jaxpr, in_sources: Sequence[frozenset]) -> list[frozenset]:
    env: dict = {}

    def read(v):
        if isinstance(v, jcore.Literal):
            return frozenset()
        return env.get(v, frozenset())

    for v, s in zip(jaxpr.invars, in_sources):
        env[v] = s
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        inner = _inner(eqn)
        if inner is not None and len(inner.invars) == len(ins) and len(inner.outvars) == len(eqn.outvars):
            outs = _sources(inner, ins)
        elif eqn.primitive.name == "cond":
            # Outputs depend on the branch index and on what any branch computes them from.
            per_branch = [_sources(b.jaxpr, ins[1:]) for b in eqn.params["branches"]]
            outs = [ins[0].union(*(b[i] for b in per_branch)) for i in range(len(eqn.outvars))]
        else:
            union = frozenset().union(*ins) if ins else frozenset()
            outs = [union] * len(eqn.outvars)
        for v, s in zip(eqn.outvars, outs):
            env[v] = s
    return [read(v) for v in jaxpr.outvars]


def output_sources(fn: Callable, args: Sequence[Any], tags: Sequence[Any]) -> list[frozenset]:
    """For each flattened output of ``fn(*args)``, the tags of the inputs it depends on.

    Args:
      fn: the function, traced abstractly.
      args: its arguments (arrays or ``jax.ShapeDtypeStruct`` pytrees).
      tags: one hashable tag per flattened input leaf.

    Returns:
      One ``frozenset`` of tags per flattened output leaf.
    """
    closed = jax.make_jaxpr(fn)(*args)
    in_sources = [frozenset([t]) for t in tags]
    if len(in_sources) != len(closed.jaxpr.invars):
        raise ValueError(f"{len(tags)} tags for {len(closed.jaxpr.invars)} traced inputs")
    return _sources(closed.jaxpr, in_sources)
