"""A stage's backward split into B (input gradient) and W (weight gradient), from one trace.

Zero-bubble schedules (``schedule.zb_h1``) run a stage's backward as two
actions: B computes the cotangent of the stage's input, which the previous
stage waits for, and W the weight gradients, which nothing waits for. Both
come from one trace of the whole stage backward (the function the backward
lane runs, ``Lanes.grads``: residuals and output cotangent -> weight
gradients, input cotangent, loss), made with ``jax.make_jaxpr`` and split by
dataflow, as JaxPP splits its backward jaxprs:

* B is every equation the input cotangent or the loss depends on;
* W is every other equation a weight gradient depends on;
* the values B computes that W reads (and the output cotangent, if W reads
  it directly) cross from B to W. They are concatenated per dtype into flat
  vectors, the *W input*, stored in a weight slot (``ticks.TickBuffers``)
  from B's tick to W's, exactly like a forward's residuals.

W reads the stage's own inputs again (weights, its activation slot with the
message and saved residuals, the micro-batch), so nothing is copied twice
and no equation runs in both: W does not redo B's work (``count`` shows it,
``tests/test_zero_bubble.py`` pins it). Calls (``pjit``, ``closed_call``, ``remat2``)
are inlined first so that a call computing both kinds of outputs is split
too; a call that closes over constants of its own is kept whole and goes to
B, and the outputs W needs cross.

Legend: Q_d elements of dtype d in one W input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from .lanes import slot_vectors, read_slot, slot_offsets

# Call-like primitives and the parameter holding their body; "remat2" is ``jax.checkpoint``
# (the stage forward's ``tracing.keep_costly``), whose recompute B and W then share out.
_CALLS = {"pjit": "jaxpr", "closed_call": "call_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}


def _inline(jaxpr) -> tuple[list, dict]:
    """The equations of ``jaxpr`` with calls inlined, and the substitution for its outputs."""
    subst: dict = {}

    def read(atom):
        return atom if isinstance(atom, jcore.Literal) else subst.get(atom, atom)

    def walk(eqns, env, top):
        out = []
        for eqn in eqns:
            invars = [read(env.get(v, v)) if not isinstance(v, jcore.Literal) else v for v in eqn.invars]
            key = _CALLS.get(eqn.primitive.name)
            inner = eqn.params.get(key) if key else None
            if inner is not None and not getattr(inner, "consts", ()):
                body = getattr(inner, "jaxpr", inner)
                inner_env = dict(zip(body.invars, invars))
                out += walk(body.eqns, inner_env, False)
                for outer, atom in zip(eqn.outvars, body.outvars):
                    if not isinstance(outer, jcore.DropVar):
                        subst[outer] = atom if isinstance(atom, jcore.Literal) else read(inner_env.get(atom, atom))
                continue
            outvars = []
            for v in eqn.outvars:
                if top or isinstance(v, jcore.DropVar):
                    outvars.append(v)
                else:
                    fresh = jcore.Var(v.aval)
                    env[v] = fresh
                    outvars.append(fresh)
            out.append(eqn.replace(invars=invars, outvars=outvars))
        return out

    return walk(jaxpr.eqns, {}, True), subst


def count(jaxpr, primitive: str) -> int:
    """Equations named ``primitive`` in a jaxpr, calls and control flow followed."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == primitive
        for sub in jcore.jaxprs_in_params(eqn.params):
            total += count(getattr(sub, "jaxpr", sub), primitive)
    return total


class SplitStage(NamedTuple):
    """One stage's backward as B and W.

    Attributes:
      b: ``(*inputs) -> (*b_outputs, *crossing)`` as a closed jaxpr.
      w: ``(*inputs, *crossing_from_b) -> weight-gradient leaves``.
      num_b_outputs: leaves B returns before the crossing values.
      crossing: ``[X]`` ``(shape, dtype)`` of the values that cross.
      from_input: ``[X]`` index into the flattened inputs for a crossing value
        that is an input (the output cotangent), -1 for one B computed.
      offsets: ``[X]`` offset in its dtype's W-input vector.
      whole: the unsplit backward, for counting.
    """

    b: Any
    w: Any
    num_b_outputs: int
    crossing: tuple[tuple[tuple[int, ...], Any], ...]
    from_input: tuple[int, ...]
    offsets: tuple[int, ...]
    whole: Any

    def sizes(self) -> dict:
        """Elements of the W input per dtype."""
        out: dict = {}
        for shape, dtype in self.crossing:
            out[dtype] = out.get(dtype, 0) + math.prod(shape)
        return out


def split_stage(fn: Callable, args: Sequence[Any], weight_outputs: int, carried: Sequence[int]) -> SplitStage:
    """Traces ``fn(*args)`` once and splits it into B and W.

    Args:
      fn: the stage backward; its flattened outputs are the weight-gradient
        leaves first (``weight_outputs`` of them), then the outputs B keeps.
      args: its arguments (arrays or ``ShapeDtypeStruct`` pytrees).
      weight_outputs: how many leading flattened outputs are weight gradients.
      carried: flattened input indices W may not read again (freed at B, such
        as the output cotangent's gradient-inbox slot): if W reads one, it
        crosses in the W input.

    Returns:
      The ``SplitStage``.
    """
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tuple(args))
    closed = jax.make_jaxpr(fn)(*structs)
    jaxpr = closed.jaxpr
    eqns, subst = _inline(jaxpr)
    outvars = [v if isinstance(v, jcore.Literal) else subst.get(v, v) for v in jaxpr.outvars]
    w_outs, b_outs = outvars[:weight_outputs], outvars[weight_outputs:]

    def slice_of(roots, pool):
        needed = {v for v in roots if isinstance(v, jcore.Var)}
        taken = []
        for eqn in reversed(pool):
            if eqn.effects or any(v in needed for v in eqn.outvars):
                taken.append(eqn)
                needed.update(v for v in eqn.invars if isinstance(v, jcore.Var))
        return taken[::-1], needed

    b_eqns, _ = slice_of(b_outs, eqns)
    b_ids = {id(e) for e in b_eqns}
    w_eqns, w_reads = slice_of(w_outs, [e for e in eqns if id(e) not in b_ids])
    w_reads.update(v for v in w_outs if isinstance(v, jcore.Var))
    inputs = {v: i for i, v in enumerate(jaxpr.invars)}
    carried = set(carried)
    crossing = [v for e in b_eqns for v in e.outvars if v in w_reads]
    crossing += [v for v in jaxpr.invars if v in w_reads and inputs[v] in carried]
    from_input = tuple(inputs.get(v, -1) for v in crossing)
    fresh = [jcore.Var(v.aval) if v in inputs else v for v in crossing]
    renamed = dict(zip(crossing, fresh))

    def rename(atom):
        return atom if isinstance(atom, jcore.Literal) else renamed.get(atom, atom)

    w_eqns = [e.replace(invars=[rename(v) for v in e.invars]) for e in w_eqns]

    def part(name, invars, outs, part_eqns):
        info = jcore.DebugInfo(name, None, tuple(f"in{i}" for i in range(len(invars))),
                               tuple(f"out{i}" for i in range(len(outs))))
        return jcore.ClosedJaxpr(jcore.Jaxpr(jaxpr.constvars, invars, outs, part_eqns, debug_info=info), closed.consts)

    b = part("input_grad", list(jaxpr.invars), b_outs + crossing, b_eqns)
    w = part("weight_grad", list(jaxpr.invars) + fresh, [rename(v) for v in w_outs], w_eqns)
    shapes = tuple((tuple(v.aval.shape), jnp.dtype(v.aval.dtype)) for v in crossing)
    offsets = slot_offsets([shape for shape, _ in shapes], [dtype for _, dtype in shapes], [True] * len(shapes))
    return SplitStage(b, w, len(b_outs), shapes, from_input, offsets, closed)


def run_b(split: SplitStage, flat_args: Sequence[Any], dtypes: Sequence[Any], sizes: Sequence[int]):
    """Runs B: ``(b_outputs, w_input)``, the W input as one ``[Q_d]`` vector per dtype."""
    outs = jcore.jaxpr_as_fun(split.b)(*flat_args)
    b_outs, cross = outs[: split.num_b_outputs], outs[split.num_b_outputs:]
    return list(b_outs), slot_vectors(cross, dtypes, sizes)


def run_w(split: SplitStage, flat_args: Sequence[Any], dtypes: Sequence[Any], vectors: Sequence[Any]) -> list:
    """Runs W from the stage's inputs and its W input: the weight-gradient leaves."""
    by_dtype = dict(zip(dtypes, vectors))
    cross = [read_slot(by_dtype, shape, dtype, offset) for (shape, dtype), offset in zip(split.crossing, split.offsets)]
    return list(jcore.jaxpr_as_fun(split.w)(*flat_args, *cross))


class SplitLanes(NamedTuple):
    """The backward lane as B and the weight lane as W, for split ticks.

    Attributes:
      backwards: ``[idle, b_0 .. b_{S-1}]`` for one ``lax.switch`` (B adds
        nothing into the accumulators), each ``(weights, in_f, in_i, cot_f,
        saved, x, y, key) -> (send_grad, loss, w_input)``.
      weights: ``[S]`` stage Ws, each run under its own two-branch
        ``lax.cond`` (``run_weight``): ``(weights, acc_s, in_f, in_i, saved,
        x, y, key, w_input) -> acc_s``.
      touched: ``[S]`` the accumulator stacks each stage's W adds into.
      w_dtypes: dtypes of the W-input vectors.
      w_sizes: ``Q_d`` per dtype.
      stages: ``[S]`` the ``SplitStage`` of each stage.
    """

    backwards: list[Callable]
    weights: list[Callable]
    touched: tuple[tuple[int, ...], ...]
    w_dtypes: tuple[Any, ...]
    w_sizes: tuple[int, ...]
    stages: tuple[SplitStage, ...]


def make_split_lanes(lanes, args) -> SplitLanes:
    """Splits every stage's backward (``lanes.grads``) into B and W lane branches.

    Args:
      lanes: the ``lanes.Lanes`` of the pipeline.
      args: ``(weights, in_f, in_i, cot_f, saved, x, y, key)`` examples, to trace.

    Returns:
      The ``SplitLanes``.
    """
    marks = jax.tree.leaves(jax.tree.map(lambda _: False, args[:3]) + (jax.tree.map(lambda _: True, args[3]),)
                            + jax.tree.map(lambda _: False, args[4:]))
    carried = [i for i, mark in enumerate(marks) if mark]
    splits, g_treedefs = [], []
    for grads in lanes.grads:
        g_treedefs.append(jax.tree.structure(jax.eval_shape(grads, *args)[0]))
        splits.append(split_stage(lambda *a, grads=grads: _flat_grads(grads, a), args, g_treedefs[-1].num_leaves,
                                  carried))
    sizes: dict = {}
    for split in splits:
        for dtype, n in split.sizes().items():
            sizes[dtype] = max(sizes.get(dtype, 0), n)
    # Zero-sized arrays in a conditional crash XLA 0.11's conditional canonicalizer.
    dtypes = tuple(sorted((d for d in sizes if sizes[d] > 0), key=str))
    w_sizes = tuple(sizes[d] for d in dtypes)
    treedef = jax.tree.structure(args)

    def idle_b(weights, in_f, in_i, cot_f, saved, x, y, key):
        return jnp.zeros_like(in_f), jnp.zeros((), jnp.float32), tuple(jnp.zeros((n,), d) for d, n in zip(dtypes, w_sizes))

    def b_branch(s):
        def branch(*operands):
            with jax.named_scope(f"stage{s}_input_grad"):
                (g_in, loss), vectors = run_b(splits[s], jax.tree.leaves(operands), dtypes, w_sizes)
            return g_in, loss, vectors

        return branch

    def w_branch(s):
        def branch(weights, sub, in_f, in_i, saved, x, y, key, vectors):
            with jax.named_scope(f"stage{s}_weight_grad"):
                operands = jax.tree.unflatten(treedef, jax.tree.leaves(
                    (weights, in_f, in_i, jnp.zeros_like(in_f), saved, x, y, key)))
                leaves = run_w(splits[s], jax.tree.leaves(operands), dtypes, vectors)
                g_trees = jax.tree.unflatten(g_treedefs[s], leaves)
                return lanes.accumulate(s, sub, g_trees)

        return branch

    num = len(splits)
    return SplitLanes([idle_b] + [b_branch(s) for s in range(num)], [w_branch(s) for s in range(num)],
                      lanes.touched, dtypes, w_sizes, tuple(splits))


def _flat_grads(grads: Callable, args) -> tuple:
    g_trees, g_in, loss = grads(*args)
    return tuple(jax.tree.leaves(g_trees)) + (g_in, loss)


def run_weight(split: SplitLanes, branch: jax.Array, weights, acc, *operands) -> tuple:
    """The weight lane of one tick: the accumulators after the W (if any) of ``branch - 1``.

    One two-branch ``lax.cond`` per stage over only the stacks that stage
    adds into, for the reason ``lanes.run_backward`` gives.
    """
    acc = list(acc)
    for s, (weight, touched) in enumerate(zip(split.weights, split.touched)):
        def idle(weights, sub, *rest):
            return sub

        sub = lax.cond(branch == 1 + s, weight, idle, weights, tuple(acc[k] for k in touched), *operands)
        for k, a in zip(touched, sub):
            acc[k] = a
    return tuple(acc)
