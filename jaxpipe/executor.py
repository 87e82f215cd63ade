"""The table executor: one ``shard_map`` that runs any schedule.

Every schedule (GPipe, 1F1B, interleaved 1F1B, ...) is a NumPy table of
actions (``schedule.py``), packed into ticks of two lanes (``ticks.py``);
this module only interprets them (DESIGN.md rules 1 and 2). Per tick, every
pipe device:

1. writes the activation and the gradient that arrived (sent at the previous
   tick) into its stash and gradient-inbox slots, as the buffer plan says;
2. runs its forward lane (a ``lax.switch``: nothing, or the forward of one of
   its stages, which also saves the stage's residuals in the micro-batch's
   slot) and its backward lane (nothing, or the backward of one of its
   stages, from the saved residuals or, with ``remat``, recomputing the stage
   from its stashed input; the parameter gradient is added to a packed
   ``[N]`` accumulator);
3. sends its forward output to the next device and its input-gradient to the
   previous one with ``lax.ppermute`` (a ring when chunks wrap around).

Ticks run under ``lax.scan`` over the table rows, so compile time does not
grow with the number of micro-batches. The last stage's forward is folded
into its backward (computing the loss there), so its forward lane is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .mesh import DATA_AXIS, PIPE_AXIS
from .placement import StagePlan, merge_copies_local
from .stages import apply_layer, cast_floats, loss_precision, vjp_residuals
from .ticks import TickBuffers, Ticks


def index_microbatch(tree: Any, m: jax.Array) -> Any:
    """Micro-batch ``m`` of ``[M, B, ...]`` leaves (``m`` traced)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, m, keepdims=False), tree)


def local_views(params: jax.Array, inputs: Any, targets: Any) -> tuple[jax.Array, Any, Any]:
    """Inside ``shard_map``: this device's ``[N]`` row and ``[M, B, ...]`` data."""
    drop = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    return params[0], drop(inputs), drop(targets)


def _rows(tree: Any, start: int, stop: int | None = None) -> Any:
    return jax.tree.map(lambda a: a[start:stop], tree)


def _concat_rows(first: Any, second: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)


def _receive(plan: StagePlan, s: int, in_f, in_i):
    """Unpacks stage ``s``'s message: ``(done, pending)`` row blocks.

    ``pending`` is the entry layer's input for rows ``[k, B)``; ``done`` its
    output for rows ``[0, k)``, or ``None`` when ``k = 0``.
    """
    layer, k = plan.entry(s)
    carrier = plan.carrier
    pending = carrier.unpack(plan.boundaries[layer], in_f[k:], in_i[k:])
    done = carrier.unpack(plan.boundaries[layer + 1], in_f[:k], in_i[:k]) if k else None
    return done, pending


def _send(plan: StagePlan, s: int, done, pending):
    """Packs stage ``s``'s exit state into one ``([B, F], [B, I])`` message."""
    carrier, last = plan.carrier, plan.stage_pieces[s][-1]
    if last.stop == carrier.rows:
        return carrier.pack(plan.boundaries[last.layer + 1], pending)
    done_f, done_i = carrier.pack(plan.boundaries[last.layer + 1], done)
    pend_f, pend_i = carrier.pack(plan.boundaries[last.layer], pending)
    return jnp.concatenate([done_f, pend_f]), jnp.concatenate([done_i, pend_i])


def _stage_apply(plan: StagePlan, s: int, trees, in_f, in_i, x, compute_dtype=None):
    """Stage ``s``'s pieces, with parameter ``trees``, on one micro-batch.

    The state between pieces is ``(done, pending)``: the current layer's
    output for the rows finished so far, and its input for the rest. A piece
    ``(layer, r0, r1)`` computes rows ``[r0, r1)``; when it reaches the last
    row, the layer's full output becomes the next layer's input. With a
    ``compute_dtype`` each piece's float inputs are cast to it (``trees``
    already are).

    Returns:
      The exit state ``(done, pending)``; for a stage whose last piece ends a
      layer, ``done`` is ``None`` and ``pending`` is the next layer's input
      (for the last stage: the model output).
    """
    done, pending = (None, x) if s == 0 else _receive(plan, s, in_f, in_i)
    rows = plan.carrier.rows
    for piece, params in zip(plan.stage_pieces[s], trees):
        spec = plan.layout.specs[piece.layer]
        with jax.named_scope(f"layer{piece.layer}_{spec.name}"):
            rows_in = cast_floats(_rows(pending, 0, piece.stop - piece.start), compute_dtype)
            part = apply_layer(spec, params, rows_in)
        part = part if done is None else _concat_rows(done, part)
        if piece.stop == rows:
            done, pending = None, part
        else:
            done, pending = part, _rows(pending, piece.stop - piece.start)
    return done, pending


class _Residuals(NamedTuple):
    """How one stage's saved residuals are stored between its two lanes.

    ``jax.vjp``'s backward function is a pytree whose leaves are the
    residuals. Leaves that are the stage's own inputs (parameters, the
    stashed message, the micro-batch) are not stored: the backward lane reads
    them again. The others are packed per dtype into flat slot vectors.

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


def _stage_vjp(plan: StagePlan, s: int, trees, in_f, in_i, x, compute_dtype=None):
    """``(send_f, vjp, send_i)``: stage ``s``'s forward with its backward function."""

    def f(trees_, in_f_):
        send_f, send_i = _send(plan, s, *_stage_apply(plan, s, trees_, in_f_, in_i, x, compute_dtype))
        return send_f, send_i

    return jax.vjp(f, trees, in_f, has_aux=True)


def _residuals(plan: StagePlan, s: int, args, compute_dtype=None) -> _Residuals:
    """Traces stage ``s`` once (abstractly) to find which residuals to store."""
    treedef, residuals = vjp_residuals(lambda *a: _stage_vjp(plan, s, *a, compute_dtype)[1], *args)
    offsets, used = [], {}
    for shape, dtype, where in residuals:
        offsets.append(used.get(dtype, 0) if where < 0 else -1)
        if where < 0:
            used[dtype] = offsets[-1] + math.prod(shape)
    shapes, dtypes, inputs = zip(*residuals) if residuals else ((), (), ())
    return _Residuals(treedef, tuple(shapes), tuple(dtypes), tuple(inputs), tuple(offsets))


def _lanes(plan: StagePlan, loss_fn: Callable, loss_scale: float, remat: bool, compute_dtype, args) -> tuple:
    """The two lanes' branch lists and the residual slot sizes.

    Forward lane ``[idle, forward_0 .. forward_{S-2}]``:
    ``(row, in_f, in_i, x) -> (send_f, send_i, residuals)``. Backward lane
    ``[idle, backward_0 .. backward_{S-1}]``:
    ``(row, acc [G], in_f, in_i, cot_f, residuals, x, y) -> (acc [G], send_grad, loss)``.
    ``acc`` is the stage's window of the gradient row (G: the largest stage's
    parameter count); a backward differentiates with respect to its stage's
    parameter trees and adds their gradients, flat and padded, into it in one
    fused pass (idle passes it through); the caller writes the window back
    outside the switch, where XLA updates the row in place. With ``remat``
    (or on the last stage, whose forward is folded into its backward) the
    backward recomputes the stage's forward from its stashed input; otherwise
    it uses the residuals the forward lane saved. With a ``compute_dtype`` a stage's
    parameter trees are cast to it before its ``jax.vjp`` (so they are
    inputs, not stored residuals, and their gradients come back in it; the
    flat gradient is cast to the layout dtype), every layer's float inputs
    are cast to it, and the last stage widens the model output to float32
    for ``loss_fn``.

    Returns:
      ``(forwards, backwards, res_dtypes, res_sizes)``: the branch lists and
      the per-dtype length of a residual slot.
    """
    carrier, layout, last = plan.carrier, plan.layout, plan.num_stages - 1
    window = plan.window

    def trees_of(s, row):
        return cast_floats([layout.unpack_layer(slot, row) for slot in plan.stage_slots[s]], compute_dtype)

    def loss_of(out, y):
        return loss_fn(out if compute_dtype is None else loss_precision(out), y)

    specs = {}
    if not remat:
        row, in_f, in_i, x = args
        for s in range(last):
            specs[s] = _residuals(plan, s, (trees_of(s, row), in_f, in_i, x), compute_dtype)
    sizes: dict = {}
    for spec in specs.values():
        for dtype, n in spec.sizes().items():
            sizes[dtype] = max(sizes.get(dtype, 0), n)
    # Zero-sized arrays in a conditional crash XLA 0.11's conditional canonicalizer.
    res_dtypes = tuple(sorted((d for d in sizes if sizes[d] > 0), key=str))
    res_sizes = tuple(sizes[d] for d in res_dtypes)

    def no_residuals():
        return tuple(jnp.zeros((n,), d) for d, n in zip(res_dtypes, res_sizes))

    def idle_forward(row, in_f, in_i, x):
        return carrier.zeros() + (no_residuals(),)

    def forward(s):
        def branch(row, in_f, in_i, x):
            with jax.named_scope(f"stage{s}_forward"):
                if remat:
                    send = _send(plan, s, *_stage_apply(plan, s, trees_of(s, row), in_f, in_i, x, compute_dtype))
                    return send + (no_residuals(),)
                send_f, vjp, send_i = _stage_vjp(plan, s, trees_of(s, row), in_f, in_i, x, compute_dtype)
                spec, leaves = specs[s], jax.tree.leaves(vjp)
                parts = {d: [] for d in res_dtypes}
                for leaf, where in zip(leaves, spec.inputs):
                    if where < 0 and leaf.size:
                        parts[leaf.dtype].append(leaf.reshape(-1))
                saved = tuple(
                    jnp.pad(jnp.concatenate(parts[d]) if parts[d] else jnp.zeros((0,), d),
                            (0, n - sum(p.shape[0] for p in parts[d])))
                    for d, n in zip(res_dtypes, res_sizes)
                )
            return send_f, send_i, saved

        return branch

    def idle_backward(row, acc, in_f, in_i, cot_f, saved, x, y):
        return acc, jnp.zeros_like(in_f), jnp.zeros((), jnp.float32)

    def backward(s):
        def branch(row, acc, in_f, in_i, cot_f, saved, x, y):
            with jax.named_scope(f"stage{s}_backward"):
                trees = trees_of(s, row)
                loss = jnp.zeros((), jnp.float32)
                if s == last:
                    def f(trees_, in_f_):
                        _, out = _stage_apply(plan, s, trees_, in_f_, in_i, x, compute_dtype)
                        return jnp.asarray(loss_of(out, y), jnp.float32)

                    loss, vjp = jax.vjp(f, trees, in_f)
                    g_trees, g_in = vjp(jnp.asarray(loss_scale, jnp.float32))
                elif remat:
                    _, vjp, _ = _stage_vjp(plan, s, trees, in_f, in_i, x, compute_dtype)
                    g_trees, g_in = vjp(cot_f)
                else:
                    spec, inputs = specs[s], jax.tree.leaves((trees, in_f, in_i, x))
                    vectors = dict(zip(res_dtypes, saved))
                    leaves = [
                        inputs[where] if where >= 0
                        else jnp.zeros(shape, dtype) if not math.prod(shape)
                        else vectors[dtype][offset: offset + math.prod(shape)].reshape(shape)
                        for shape, dtype, where, offset in zip(spec.shapes, spec.dtypes, spec.inputs, spec.offsets)
                    ]
                    g_trees, g_in = jax.tree.unflatten(spec.treedef, leaves)(cot_f)
                flat = layout.flatten(g_trees, layout.dtype)
                acc = acc + jnp.pad(flat, (0, window - flat.shape[0]))
            return acc, g_in, loss

        return branch

    forwards = [idle_forward] + [forward(s) for s in range(last)]
    backwards = [idle_backward] + [backward(s) for s in range(plan.num_stages)]
    return forwards, backwards, res_dtypes, res_sizes


def _tick_table(plan: StagePlan, ticks: Ticks, buffers: TickBuffers) -> np.ndarray:
    """``[T, P, 11]`` int32 per tick and device.

    Columns: forward branch, its micro-batch, its slot, the slot its
    residuals go to (-1: none), backward branch, its micro-batch, its slot,
    gradient slot, arriving activation slot, arriving gradient slot, and the
    start of the backward stage's gradient window.
    """
    S = ticks.num_stages
    f_stage, b_stage = ticks.stage(ticks.forward_chunk), ticks.stage(ticks.backward_chunk)
    # The last stage's forward is folded into its backward: nothing to do.
    f_branch = np.where((f_stage >= 0) & (f_stage < S - 1), 1 + f_stage, 0)
    b_branch = np.where(b_stage >= 0, 1 + b_stage, 0)
    res_slot = np.where(f_branch > 0, buffers.forward_slot, -1)
    starts = np.asarray([plan.layout.segment(slots)[0] for slots in plan.stage_slots])
    window_start = np.where(b_stage >= 0, starts[np.maximum(b_stage, 0)], 0)
    columns = (f_branch, ticks.forward, buffers.forward_slot, res_slot, b_branch, ticks.backward,
               buffers.backward_slot, buffers.grad_slot, buffers.recv_act_slot, buffers.recv_grad_slot,
               window_start)
    return np.stack([np.asarray(c, np.int32) for c in columns], axis=-1)


def _write(stash: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """``stash[slot] = value`` where ``slot >= 0``; unchanged otherwise."""
    index = jnp.maximum(slot, 0)
    current = lax.dynamic_index_in_dim(stash, index, keepdims=False)
    value = jnp.where(slot >= 0, value, current)
    return lax.dynamic_update_index_in_dim(stash, value, index, 0)


def _read(stash: jax.Array, slot: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(stash, jnp.maximum(slot, 0), keepdims=False)


def scheduled_loss_and_grad(
    plan: StagePlan,
    ticks: Ticks,
    buffers: TickBuffers,
    mesh: Mesh,
    loss_fn: Callable,
    remat: bool = False,
    compute_dtype: Any = None,
) -> Callable:
    """Builds the loss-and-gradient function that runs packed ticks.

    Args:
      plan: the static stage plan (``S = V * P`` stages).
      ticks: a schedule packed by ``ticks.pack`` for the plan's P, M and V.
      buffers: its slot plan (``ticks.tick_buffers``).
      mesh: a ``("data", "pipe")`` mesh whose pipe size is P.
      loss_fn: ``(outputs, targets) -> []`` mean loss over one micro-batch.
      remat: recompute each stage's forward in its backward from the stashed
        input instead of saving its residuals (less memory, one more forward).
      compute_dtype: dtype the stages compute in (``None``: no casts): the
        parameters and every layer's float inputs are cast to it; gradients
        accumulate in the parameters' dtype. The plan's boundaries must have
        been traced with the same casts (``trace_boundaries``).

    Returns:
      ``f(params [P, N], inputs [D, M, B, ...], targets [D, M, B, ...]) ->
      (loss [], grads [P, N])``: the mean of ``loss_fn`` over all micro-batches
      of all replicas, and its gradient (summed over ``data``).

    Raises:
      ValueError: if the ticks' sizes do not match the plan's.
    """
    num_devices, num_mb = plan.num_devices, plan.num_microbatches
    if (ticks.num_devices, ticks.num_microbatches, ticks.num_stages) != (
        num_devices, num_mb, plan.num_stages
    ):
        raise ValueError(
            f"schedule {ticks.name} is for P={ticks.num_devices}, "
            f"M={ticks.num_microbatches}, S={ticks.num_stages} stages, but the "
            f"plan has P={num_devices}, M={num_mb}, S={plan.num_stages}"
        )
    num_replicas = mesh.devices.shape[0]
    table = jnp.asarray(_tick_table(plan, ticks, buffers))
    ring = ticks.num_chunks > 1
    fwd_perm = [(p, (p + 1) % num_devices) for p in range(num_devices if ring else num_devices - 1)]
    bwd_perm = [(p, (p - 1) % num_devices) for p in range(1 if not ring else 0, num_devices)]
    carrier = plan.carrier
    zero_f, zero_i = carrier.zeros()
    slots_a, slots_g = buffers.num_act_slots, buffers.num_grad_slots

    def body(params, inputs, targets):
        row, inputs, targets = local_views(params, inputs, targets)
        inputs = cast_floats(inputs, compute_dtype)  # once, so no stage stores a cast copy as a residual
        p = lax.axis_index(PIPE_AXIS)
        forwards, backwards, res_dtypes, res_sizes = _lanes(
            plan, loss_fn, 1.0 / (num_mb * num_replicas), remat, compute_dtype,
            (row, zero_f, zero_i, index_microbatch(inputs, 0)),
        )

        def tick(carry, cells):
            act_f, act_i, grads_in, saved, grad_acc, loss_sum, arr_f, arr_i, arr_g, last_saved, last_slot = carry
            f_branch, f_mb, f_slot, res_slot, b_branch, b_mb, b_slot, g_slot, recv_act, recv_grad, start = (
                lax.dynamic_index_in_dim(cells, p, keepdims=False)[k] for k in range(11)
            )
            act_f = _write(act_f, recv_act, arr_f)
            act_i = _write(act_i, recv_act, arr_i)
            grads_in = _write(grads_in, recv_grad, arr_g)
            # The previous tick's residuals are stored now, before this tick
            # reads: writing after the read made XLA copy the whole buffer.
            saved = tuple(_write(buf, last_slot, new) for buf, new in zip(saved, last_saved))
            f_mb, b_mb = jnp.maximum(f_mb, 0), jnp.maximum(b_mb, 0)
            send_f, send_i, new_saved = lax.switch(
                f_branch, forwards, row, _read(act_f, f_slot), _read(act_i, f_slot),
                index_microbatch(inputs, f_mb),
            )
            current = lax.dynamic_slice_in_dim(grad_acc, start, plan.window)
            current, send_g, loss = lax.switch(
                b_branch, backwards, row, current, _read(act_f, b_slot), _read(act_i, b_slot),
                _read(grads_in, g_slot), tuple(_read(buf, b_slot) for buf in saved),
                index_microbatch(inputs, b_mb), index_microbatch(targets, b_mb),
            )
            grad_acc = lax.dynamic_update_slice_in_dim(grad_acc, current, start, 0)
            if num_devices > 1:
                send_f = lax.ppermute(send_f, PIPE_AXIS, fwd_perm)
                if plan.sends_ints:
                    send_i = lax.ppermute(send_i, PIPE_AXIS, fwd_perm)
                send_g = lax.ppermute(send_g, PIPE_AXIS, bwd_perm)
            carry = (act_f, act_i, grads_in, saved, grad_acc, loss_sum + loss, send_f, send_i, send_g,
                     new_saved, res_slot)
            return carry, None

        init = (
            jnp.zeros((slots_a,) + zero_f.shape, zero_f.dtype),
            jnp.zeros((slots_a,) + zero_i.shape, zero_i.dtype),
            jnp.zeros((slots_g,) + zero_f.shape, zero_f.dtype),
            tuple(jnp.zeros((slots_a, n), d) for d, n in zip(res_dtypes, res_sizes)),
            jnp.zeros_like(row),
            jnp.zeros((), jnp.float32),
            zero_f, zero_i, zero_f,
            tuple(jnp.zeros((n,), d) for d, n in zip(res_dtypes, res_sizes)),
            jnp.asarray(-1, jnp.int32),
        )
        carry, _ = lax.scan(tick, init, table)
        grad_acc, loss_sum = carry[4], carry[5]
        loss = lax.psum(lax.psum(loss_sum, PIPE_AXIS), DATA_AXIS) / (num_mb * num_replicas)
        grads = merge_copies_local(plan, lax.psum(grad_acc, DATA_AXIS), p)
        return loss, grads[None]

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(PIPE_AXIS), PartitionSpec(DATA_AXIS), PartitionSpec(DATA_AXIS)),
        out_specs=(PartitionSpec(), PartitionSpec(PIPE_AXIS)),
        check_vma=False,
    )
