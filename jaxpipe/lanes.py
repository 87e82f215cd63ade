"""What a stage computes in each lane of a tick: the branches the executor switches over.

A stage is a run of pieces (``partition.Piece``) on one device. Its forward
receives a message (``[B, F]`` floats, ``[B, I]`` ints, see ``wire.Carrier``),
runs its pieces and sends the next message; its backward takes the
message's cotangent and adds the weight gradient of each of its parameter
copies into that copy's accumulator stacks (``stacks.py``).

Legend: B rows per micro-batch, F/I float/int message columns, R_d residual
elements of dtype d per buffer slot; ``weights``/``acc`` are this device's
stack entries, each in its leaf's natural shape. ``docs/design.md``, "Two
lanes per tick" and "Buffer slots", describes the tick these lanes run in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .placement import Placement
from .layers import apply_layer, cast_floats, loss_precision
from .tracing import keep_costly, vjp_residuals


def _rows(tree: Any, start: int, stop: int | None = None) -> Any:
    return jax.tree.map(lambda a: a[start:stop], tree)


def _concat_rows(first: Any, second: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)


def receive(placement: Placement, s: int, in_f, in_i):
    """Decodes stage ``s``'s message: ``(done, pending)`` row blocks.

    ``pending`` is the entry layer's input for rows ``[k, B)``; ``done`` its
    output for rows ``[0, k)``, or ``None`` when ``k = 0``.
    """
    layer, k = placement.entry(s)
    carrier = placement.carrier
    pending = carrier.decode(placement.boundaries[layer], in_f[k:], in_i[k:])
    if not k or placement.boundaries[layer + 1] is None:  # split_loss: rows [0, k) of the last layer are done upstream
        return None, pending
    return carrier.decode(placement.boundaries[layer + 1], in_f[:k], in_i[:k]), pending


def send(placement: Placement, s: int, done, pending):
    """Packs stage ``s``'s exit state into one ``([B, F], [B, I])`` message."""
    carrier, last = placement.carrier, placement.stage_pieces[s][-1]
    if last.stop == carrier.rows:
        return carrier.encode(placement.boundaries[last.layer + 1], pending)
    if placement.boundaries[last.layer + 1] is None:  # split_loss: this stage took the loss of its rows
        pend_f, pend_i = carrier.encode(placement.boundaries[last.layer], pending)
        zero_f, zero_i = carrier.zeros(last.stop)
        return jnp.concatenate([zero_f, pend_f]), jnp.concatenate([zero_i, pend_i])
    done_f, done_i = carrier.encode(placement.boundaries[last.layer + 1], done)
    pend_f, pend_i = carrier.encode(placement.boundaries[last.layer], pending)
    return jnp.concatenate([done_f, pend_f]), jnp.concatenate([done_i, pend_i])


def stage_apply(placement: Placement, s: int, trees, in_f, in_i, x, compute_dtype=None, key=None, deterministic=False):
    """Stage ``s``'s pieces, with parameter ``trees``, on one micro-batch.

    The state between pieces is ``(done, pending)``: the current layer's
    output for the rows finished so far, and its input for the rest. A piece
    ``(layer, r0, r1)`` computes rows ``[r0, r1)``; when it reaches the last
    row, the layer's full output becomes the next layer's input. With a
    ``compute_dtype`` each piece's float inputs are cast to it (``trees``
    already are). ``key`` is the micro-batch's key data for layers that draw
    random numbers (``rng.py``); ``deterministic`` runs every layer in
    evaluation mode.

    Returns:
      The exit state ``(done, pending)``; for a stage whose last piece ends a
      layer, ``done`` is ``None`` and ``pending`` is the next layer's input
      (for the last stage: the model output).
    """
    done, pending = (None, x) if s == 0 else receive(placement, s, in_f, in_i)
    rows = placement.carrier.rows
    for piece, params in zip(placement.stage_pieces[s], trees):
        spec = placement.specs[piece.layer]
        with jax.named_scope(f"layer{piece.layer}_{spec.name}"):
            rows_in = cast_floats(_rows(pending, 0, piece.stop - piece.start), compute_dtype)
            part = apply_layer(spec, params, rows_in, key, deterministic)
        part = part if done is None else _concat_rows(done, part)
        if piece.stop == rows:
            done, pending = None, part
        else:
            done, pending = part, _rows(pending, piece.stop - piece.start)
    return done, pending


def stage_trees(placement: Placement, s: int, weights) -> list[Any]:
    """Stage ``s``'s parameter trees, read from this device's weight entries."""
    return [placement.copy_tree(weights, copy) for copy in placement.stage_copies[s]]


def partial_loss(placement: Placement, s: int, done, y, loss_of: Callable) -> jax.Array:
    """The loss of the rows ``[r0, r1)`` of the last layer stage ``s`` computed, weighted by ``(r1 - r0) / B``.

    ``loss_fn`` is a mean over rows, so these shares add up to the
    micro-batch's loss.
    """
    r0, r1 = placement.loss_rows(s)
    share = (r1 - r0) / placement.carrier.rows
    return jnp.asarray(loss_of(done, _rows(y, r0, r1)), jnp.float32) * share


def takes_loss_early(placement: Placement, s: int) -> bool:
    """Whether stage ``s`` (not the last) computes the loss of its rows of the last layer."""
    return s < placement.num_stages - 1 and placement.loss_rows(s) is not None


def _stage_vjp(placement: Placement, s: int, trees, in_f, in_i, x, key, compute_dtype=None, y=None, loss_of=None):
    """``(send_f, vjp, send_i)``: stage ``s``'s forward with its backward function.

    A stage that takes the loss of its rows early differentiates
    ``(send_f, loss)``; its ``send_i`` is then ``(send_i, loss)``. The
    forward runs under ``tracing.keep_costly``: its backward function keeps
    matmul, convolution and reduction outputs and recomputes elementwise ones.
    """
    if takes_loss_early(placement, s):
        def f(trees_, in_f_):
            done, pending = stage_apply(placement, s, trees_, in_f_, in_i, x, compute_dtype, key)
            send_f, send_i = send(placement, s, done, pending)
            loss = partial_loss(placement, s, done, y, loss_of)
            return (send_f, loss), (send_i, loss)

        (send_f, _), vjp, aux = jax.vjp(keep_costly(f), trees, in_f, has_aux=True)
        return send_f, vjp, aux

    def f(trees_, in_f_):
        return send(placement, s, *stage_apply(placement, s, trees_, in_f_, in_i, x, compute_dtype, key))

    return jax.vjp(keep_costly(f), trees, in_f, has_aux=True)


def slot_offsets(shapes, dtypes, stored) -> tuple[int, ...]:
    """Each stored leaf's offset in its dtype's slot vector (leaves concatenated in order), -1 where not stored."""
    offsets, used = [], {}
    for shape, dtype, keep in zip(shapes, dtypes, stored):
        offsets.append(used.get(dtype, 0) if keep else -1)
        if keep:
            used[dtype] = offsets[-1] + math.prod(shape)
    return tuple(offsets)


def slot_vectors(leaves, dtypes, sizes) -> tuple:
    """``leaves`` flattened and concatenated per dtype, in order, each padded to its ``[n_d]`` slot size."""
    parts = {d: [] for d in dtypes}
    for leaf in leaves:
        if leaf.size:
            parts[jnp.dtype(leaf.dtype)].append(leaf.reshape(-1))
    return tuple(
        jnp.pad(jnp.concatenate(parts[d]) if parts[d] else jnp.zeros((0,), d),
                (0, n - sum(p.shape[0] for p in parts[d])))
        for d, n in zip(dtypes, sizes)
    )


def read_slot(vectors: dict, shape, dtype, offset: int) -> jax.Array:
    """The leaf of ``shape`` and ``dtype`` at ``offset`` of its dtype's slot vector (``vectors``: dtype -> vector)."""
    size = math.prod(shape)
    return vectors[dtype][offset: offset + size].reshape(shape) if size else jnp.zeros(shape, dtype)


class Residuals(NamedTuple):
    """How one stage's saved residuals are stored between its two lanes.

    ``jax.vjp``'s backward function is a pytree whose leaves are the
    residuals. Leaves that are the stage's own inputs (parameters, the
    message in its activation slot, the micro-batch, its key) are not stored: the backward lane reads
    them again. The others are concatenated per dtype into flat residual-slot vectors
    (``slot_vectors``).

    Attributes:
      treedef: the backward function's tree structure (holds no arrays).
      shapes: ``[K]`` residual leaf shapes.
      dtypes: ``[K]`` their dtypes.
      inputs: ``[K]`` index into the flattened stage inputs, -1 if stored.
      offsets: ``[K]`` offset in its dtype's slot vector, -1 if an input.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    inputs: tuple[int, ...]
    offsets: tuple[int, ...]

    def sizes(self) -> dict:
        """Elements stored per dtype."""
        out: dict = {}
        for shape, dtype, where in zip(self.shapes, self.dtypes, self.inputs):
            if where < 0:
                out[dtype] = out.get(dtype, 0) + math.prod(shape)
        return out


def stage_residuals(placement: Placement, s: int, args, compute_dtype=None, y=None, loss_of=None) -> Residuals:
    """Traces stage ``s`` once (abstractly) to find which residuals to store.

    ``args`` are ``(trees, in_f, in_i, x, key)``; a stage that takes its loss
    early also reads the targets ``y`` (not stored: an input).
    """
    treedef, residuals = vjp_residuals(
        lambda *a: _stage_vjp(placement, s, *a[:5], compute_dtype, a[5], loss_of)[1], *args, y)
    shapes, dtypes, inputs = zip(*residuals) if residuals else ((), (), ())
    offsets = slot_offsets(shapes, dtypes, [where < 0 for where in inputs])
    return Residuals(treedef, tuple(shapes), tuple(dtypes), tuple(inputs), offsets)


class Lanes(NamedTuple):
    """The two lanes' branches and the residual buffer-slot sizes.

    Attributes:
      forwards: ``[idle, forward_0 .. forward_{S-2}]`` for one ``lax.switch``,
        each ``(weights, in_f, in_i, x, y, key) -> (send_f, send_i, saved, loss)``
        (``loss``: the share a stage that takes its loss early computed;
        ``key``: the micro-batch's key data, or ``None`` when no layer draws
        random numbers).
      backwards: ``[S]`` stage backwards, each run under its own two-branch
        ``lax.cond`` (see ``run_backward``): ``(weights, acc_s, in_f, in_i,
        cot_f, saved, x, y, key) -> (acc_s, send_grad, loss)``, ``acc_s`` the
        accumulator stacks the stage adds into (``touched[s]``).
      touched: ``[S]`` the accumulator stacks each stage's backward adds into.
      res_dtypes: dtypes of the residual vectors.
      res_sizes: ``R_d`` per dtype.
      grads: ``[S]`` each stage's whole backward without the accumulation,
        ``(weights, in_f, in_i, cot_f, saved, x, y, key) -> (g_trees, g_in,
        loss)`` (what ``split_backward`` splits into B and W).
      accumulate: ``(s, acc_s, g_trees) -> acc_s``, stage ``s``'s weight
        gradients added into its accumulator stacks.
    """

    forwards: list[Callable]
    backwards: list[Callable]
    touched: tuple[tuple[int, ...], ...]
    res_dtypes: tuple[Any, ...]
    res_sizes: tuple[int, ...]
    grads: list[Callable]
    accumulate: Callable


def run_backward(lanes: Lanes, branch: jax.Array, weights, acc, *operands):
    """The backward lane of one tick: ``(acc, send_grad, loss)``.

    One two-branch ``lax.cond`` per stage, each over only the accumulator
    stacks that stage adds into, instead of one ``lax.switch`` over all
    stages: when several branches of one conditional may update the same
    operand in place, XLA copies it (every accumulator, every tick); a
    conditional with one updating branch and a pass-through updates in place.
    """
    send_g, loss = None, jnp.zeros((), jnp.float32)
    acc = list(acc)
    for s, (backward, touched) in enumerate(zip(lanes.backwards, lanes.touched)):
        def idle(weights, sub, in_f, *rest):
            return sub, jnp.zeros_like(in_f), jnp.zeros((), jnp.float32)

        sub, g_in, l = lax.cond(branch == 1 + s, backward, idle, weights, tuple(acc[k] for k in touched), *operands)
        for k, a in zip(touched, sub):
            acc[k] = a
        send_g = g_in if send_g is None else send_g + g_in
        loss = loss + l
    return tuple(acc), send_g, loss


def make_lanes(placement: Placement, loss_fn: Callable, loss_scale: float, remat: bool, compute_dtype, args) -> Lanes:
    """The two lanes' branch lists and the residual slot sizes.

    A backward differentiates with respect to its stage's parameter trees
    and adds each copy's gradient into that copy's accumulator stacks, in
    the leaves' own shapes (idle passes the accumulators through). With
    ``remat`` (or on the last stage, whose forward is folded into its
    backward) the backward recomputes the stage's forward from its held
    input; otherwise it uses the residuals the forward lane saved. The
    weights arrive already cast to ``compute_dtype`` (once per step), so a
    stage's parameter trees are ``jax.vjp`` inputs, never stored residuals;
    gradients are cast to the accumulators' dtype as they are added. The
    last stage widens the model output to float32 for ``loss_fn``.

    Args:
      placement: the stage placement.
      loss_fn: ``(outputs, targets) -> []``.
      loss_scale: each micro-batch loss's weight in the step loss.
      remat: recompute forwards in the backward lane.
      compute_dtype: dtype the stages compute in, or ``None``.
      args: ``(weights, in_f, in_i, x, y, key)`` examples, to trace residual sizes.
    """
    carrier, last = placement.carrier, placement.num_stages - 1

    def loss_of(out, y):
        return loss_fn(out if compute_dtype is None else loss_precision(out), y)

    specs = {}
    if not remat:
        weights, in_f, in_i, x, y, key = args
        for s in range(last):
            trees = stage_trees(placement, s, weights)
            specs[s] = stage_residuals(placement, s, (trees, in_f, in_i, x, key), compute_dtype,
                                       y if takes_loss_early(placement, s) else None, loss_of)
    sizes: dict = {}
    for spec in specs.values():
        for dtype, n in spec.sizes().items():
            sizes[dtype] = max(sizes.get(dtype, 0), n)
    # Zero-sized arrays in a conditional crash XLA 0.11's conditional canonicalizer.
    res_dtypes = tuple(sorted((d for d in sizes if sizes[d] > 0), key=str))
    res_sizes = tuple(sizes[d] for d in res_dtypes)

    def no_residuals():
        return tuple(jnp.zeros((n,), d) for d, n in zip(res_dtypes, res_sizes))

    def idle_forward(weights, in_f, in_i, x, y, key):
        return carrier.zeros() + (no_residuals(), jnp.zeros((), jnp.float32))

    def forward(s):
        early = takes_loss_early(placement, s)

        def branch(weights, in_f, in_i, x, y, key):
            loss = jnp.zeros((), jnp.float32)
            with jax.named_scope(f"stage{s}_forward"):
                trees = stage_trees(placement, s, weights)
                if remat:
                    done, pending = stage_apply(placement, s, trees, in_f, in_i, x, compute_dtype, key)
                    if early:
                        loss = partial_loss(placement, s, done, y, loss_of)
                    return send(placement, s, done, pending) + (no_residuals(), loss)
                send_f, vjp, send_i = _stage_vjp(placement, s, trees, in_f, in_i, x, key, compute_dtype,
                                                 y if early else None, loss_of)
                if early:
                    send_i, loss = send_i
                stored = [leaf for leaf, where in zip(jax.tree.leaves(vjp), specs[s].inputs) if where < 0]
                saved = slot_vectors(stored, res_dtypes, res_sizes)
            return send_f, send_i, saved, loss

        return branch

    touched = tuple(
        tuple(sorted({k for copy in placement.stage_copies[s] for k in placement.stacks.places[copy] if k >= 0}))
        for s in range(placement.num_stages)
    )

    def grads(s):
        early = takes_loss_early(placement, s)

        def stage_grads(weights, in_f, in_i, cot_f, saved, x, y, key):
            trees = stage_trees(placement, s, weights)
            loss = jnp.zeros((), jnp.float32)
            scale = jnp.asarray(loss_scale, jnp.float32)
            cotangent = (cot_f, scale) if early else cot_f
            if s == last:
                def f(trees_, in_f_):
                    _, out = stage_apply(placement, s, trees_, in_f_, in_i, x, compute_dtype, key)
                    return partial_loss(placement, s, out, y, loss_of)

                loss, vjp = jax.vjp(f, trees, in_f)
                g_trees, g_in = vjp(scale)
            elif remat:
                _, vjp, _ = _stage_vjp(placement, s, trees, in_f, in_i, x, key, compute_dtype,
                                       y if early else None, loss_of)
                g_trees, g_in = vjp(cotangent)
            else:
                spec, inputs = specs[s], jax.tree.leaves((trees, in_f, in_i, x, key, y if early else None))
                vectors = dict(zip(res_dtypes, saved))
                leaves = [
                    inputs[where] if where >= 0 else read_slot(vectors, shape, dtype, offset)
                    for shape, dtype, where, offset in zip(spec.shapes, spec.dtypes, spec.inputs, spec.offsets)
                ]
                g_trees, g_in = jax.tree.unflatten(spec.treedef, leaves)(cotangent)
            return g_trees, g_in, loss

        return stage_grads

    def accumulate(s, sub, g_trees):
        acc = dict(zip(touched[s], sub))
        for copy, g_tree in zip(placement.stage_copies[s], g_trees):
            for k, g in zip(placement.stacks.places[copy], jax.tree.leaves(g_tree)):
                if k >= 0:
                    acc[k] = acc[k] + g.reshape(acc[k].shape).astype(acc[k].dtype)
        return tuple(acc[k] for k in touched[s])

    def backward(s):
        def branch(weights, sub, in_f, in_i, cot_f, saved, x, y, key):
            with jax.named_scope(f"stage{s}_backward"):
                g_trees, g_in, loss = grads(s)(weights, in_f, in_i, cot_f, saved, x, y, key)
                return accumulate(s, sub, g_trees), g_in, loss

        return branch

    forwards = [idle_forward] + [forward(s) for s in range(last)]
    backwards = [backward(s) for s in range(placement.num_stages)]
    return Lanes(forwards, backwards, touched, res_dtypes, res_sizes,
                 [grads(s) for s in range(placement.num_stages)], accumulate)
