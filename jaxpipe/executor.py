"""The table executor: one ``shard_map`` that runs any schedule table.

Every schedule (GPipe, 1F1B, interleaved 1F1B, ...) is a NumPy table of
actions (``schedule.py``); this module only interprets tables (DESIGN.md rules
1 and 2). Per tick, every pipe device:

1. writes the activation and the gradient that arrived (sent at the previous
   tick) into its stash and gradient-inbox slots, as the buffer plan says;
2. runs one branch of a ``lax.switch``: idle (computes nothing), the forward
   of one of its stages, or the backward of one of its stages. The backward
   recomputes the stage from its stashed input with ``jax.vjp`` and adds the
   parameter gradient to a packed ``[N]`` accumulator, so every branch returns
   the same shapes and nothing is stored between ticks but boundary inputs;
3. sends its forward output to the next device and its input-gradient to the
   previous one with ``lax.ppermute`` (a ring when chunks wrap around).

Ticks run under ``lax.scan`` over the table rows, so compile time does not
grow with the number of micro-batches. The last stage's forward is folded
into its backward (the recomputation yields the loss too), so its FORWARD
cells compute nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .mesh import DATA_AXIS, PIPE_AXIS
from .placement import StagePlan, merge_copies_local
from .schedule import BACKWARD, FORWARD, Buffers, Schedule
from .stages import apply_layer


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


def _stage_apply(plan: StagePlan, s: int, trees, in_f, in_i, x):
    """Stage ``s``'s pieces, with parameter ``trees``, on one micro-batch.

    The state between pieces is ``(done, pending)``: the current layer's
    output for the rows finished so far, and its input for the rest. A piece
    ``(layer, r0, r1)`` computes rows ``[r0, r1)``; when it reaches the last
    row, the layer's full output becomes the next layer's input.

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
            part = apply_layer(spec, params, _rows(pending, 0, piece.stop - piece.start))
        part = part if done is None else _concat_rows(done, part)
        if piece.stop == rows:
            done, pending = None, part
        else:
            done, pending = part, _rows(pending, piece.stop - piece.start)
    return done, pending


def _branches(plan: StagePlan, loss_fn: Callable, loss_scale: float) -> list[Callable]:
    """``[idle, forward_0 .. forward_{S-1}, backward_0 .. backward_{S-1}]``.

    Every branch maps ``(row, in_f, in_i, cot_f, x, y)`` to ``(send_f, send_i,
    grad [G], send_grad, loss)``. A backward branch differentiates with respect
    to its stage's parameter trees and returns their gradients flat, padded to
    the largest stage's size G; the caller adds them into the stage's window
    of the gradient row, outside the switch, where XLA updates it in place.
    """
    carrier, layout, last = plan.carrier, plan.layout, plan.num_stages - 1
    window = plan.window

    def trees_of(s, row):
        return [layout.unpack_layer(slot, row) for slot in plan.stage_slots[s]]

    def nothing(in_f):
        return jnp.zeros((window,), layout.dtype), jnp.zeros_like(in_f), jnp.zeros((), jnp.float32)

    def idle(row, in_f, in_i, cot_f, x, y):
        return carrier.zeros() + nothing(in_f)

    def forward(s):
        def branch(row, in_f, in_i, cot_f, x, y):
            with jax.named_scope(f"stage{s}_forward"):
                send = _send(plan, s, *_stage_apply(plan, s, trees_of(s, row), in_f, in_i, x))
            return send + nothing(in_f)

        return branch

    def backward(s):
        def branch(row, in_f, in_i, cot_f, x, y):
            with jax.named_scope(f"stage{s}_backward"):
                if s == last:
                    def f(trees, in_f_):
                        _, out = _stage_apply(plan, s, trees, in_f_, in_i, x)
                        return jnp.asarray(loss_fn(out, y), jnp.float32)

                    loss, vjp = jax.vjp(f, trees_of(s, row), in_f)
                    g_trees, g_in = vjp(jnp.asarray(loss_scale, jnp.float32))
                else:
                    def f(trees, in_f_):
                        state = _stage_apply(plan, s, trees, in_f_, in_i, x)
                        return _send(plan, s, *state)[0]

                    _, vjp = jax.vjp(f, trees_of(s, row), in_f)
                    g_trees, g_in = vjp(cot_f)
                    loss = jnp.zeros((), jnp.float32)
                flat = layout.flatten(g_trees, layout.dtype)
                grad = jnp.pad(flat, (0, window - flat.shape[0]))
            return carrier.zeros() + (grad, g_in, loss)

        return branch

    stages = range(plan.num_stages)
    forwards = [forward(s) if s < last else idle for s in stages]
    return [idle] + forwards + [backward(s) for s in stages]


def _tick_table(plan: StagePlan, schedule: Schedule, buffers: Buffers) -> np.ndarray:
    """``[T, P, 7]`` int32: branch, micro-batch, four slot columns, gradient window start."""
    S = schedule.num_stages
    stage = schedule.stage
    branch = np.where(schedule.op == FORWARD, 1 + stage, 0)
    branch = np.where(schedule.op == BACKWARD, 1 + S + stage, branch)
    # The last stage's forward is recomputed by its backward: nothing to do.
    branch = np.where((schedule.op == FORWARD) & (stage == S - 1), 0, branch)
    starts = np.asarray([plan.layout.segment(slots)[0] for slots in plan.stage_slots])
    window_start = np.where(schedule.op == BACKWARD, starts[np.maximum(stage, 0)], 0)
    columns = (branch, schedule.microbatch, buffers.act_slot, buffers.grad_slot,
               buffers.recv_act_slot, buffers.recv_grad_slot, window_start)
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
    schedule: Schedule,
    buffers: Buffers,
    mesh: Mesh,
    loss_fn: Callable,
) -> Callable:
    """Builds the loss-and-gradient function that runs ``schedule``.

    Args:
      plan: the static stage plan (``S = V * P`` stages).
      schedule: a legal table for the plan's P, M and V.
      buffers: its slot plan (``schedule.assign_buffers``).
      mesh: a ``("data", "pipe")`` mesh whose pipe size is P.
      loss_fn: ``(outputs, targets) -> []`` mean loss over one micro-batch.

    Returns:
      ``f(params [P, N], inputs [D, M, B, ...], targets [D, M, B, ...]) ->
      (loss [], grads [P, N])``: the mean of ``loss_fn`` over all micro-batches
      of all replicas, and its gradient (summed over ``data``).

    Raises:
      ValueError: if the schedule's sizes do not match the plan's.
    """
    num_devices, num_mb = plan.num_devices, plan.num_microbatches
    if (schedule.num_devices, schedule.num_microbatches, schedule.num_stages) != (
        num_devices, num_mb, plan.num_stages
    ):
        raise ValueError(
            f"schedule {schedule.name} is for P={schedule.num_devices}, "
            f"M={schedule.num_microbatches}, S={schedule.num_stages} stages, but the "
            f"plan has P={num_devices}, M={num_mb}, S={plan.num_stages}"
        )
    num_replicas = mesh.devices.shape[0]
    branches = _branches(plan, loss_fn, 1.0 / (num_mb * num_replicas))
    table = jnp.asarray(_tick_table(plan, schedule, buffers))
    ring = schedule.num_chunks > 1
    fwd_perm = [(p, (p + 1) % num_devices) for p in range(num_devices if ring else num_devices - 1)]
    bwd_perm = [(p, (p - 1) % num_devices) for p in range(1 if not ring else 0, num_devices)]
    carrier = plan.carrier
    zero_f, zero_i = carrier.zeros()

    def body(params, inputs, targets):
        row, inputs, targets = local_views(params, inputs, targets)
        p = lax.axis_index(PIPE_AXIS)

        def tick(carry, cells):
            act_f, act_i, grads_in, grad_acc, loss_sum, arr_f, arr_i, arr_g = carry
            branch, m, act_slot, grad_slot, recv_act, recv_grad, start = (
                lax.dynamic_index_in_dim(cells, p, keepdims=False)[k] for k in range(7)
            )
            act_f = _write(act_f, recv_act, arr_f)
            act_i = _write(act_i, recv_act, arr_i)
            grads_in = _write(grads_in, recv_grad, arr_g)
            mc = jnp.maximum(m, 0)
            send_f, send_i, grad, send_g, loss = lax.switch(
                branch, branches, row,
                _read(act_f, act_slot), _read(act_i, act_slot), _read(grads_in, grad_slot),
                index_microbatch(inputs, mc), index_microbatch(targets, mc),
            )
            current = lax.dynamic_slice_in_dim(grad_acc, start, plan.window)
            grad_acc = lax.dynamic_update_slice_in_dim(grad_acc, current + grad, start, 0)
            if num_devices > 1:
                send_f = lax.ppermute(send_f, PIPE_AXIS, fwd_perm)
                if plan.sends_ints:
                    send_i = lax.ppermute(send_i, PIPE_AXIS, fwd_perm)
                send_g = lax.ppermute(send_g, PIPE_AXIS, bwd_perm)
            return (act_f, act_i, grads_in, grad_acc, loss_sum + loss, send_f, send_i, send_g), None

        slots_a, slots_g = buffers.num_act_slots, buffers.num_grad_slots
        init = (
            jnp.zeros((slots_a,) + zero_f.shape, zero_f.dtype),
            jnp.zeros((slots_a,) + zero_i.shape, zero_i.dtype),
            jnp.zeros((slots_g,) + zero_f.shape, zero_f.dtype),
            jnp.zeros_like(row),
            jnp.zeros((), jnp.float32),
            zero_f, zero_i, zero_f,
        )
        carry, _ = lax.scan(tick, init, table)
        grad_acc, loss_sum = carry[3], carry[4]
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
