"""The table executor: one ``shard_map`` that runs any schedule.

Every schedule (GPipe, 1F1B, interleaved 1F1B, ...) is a NumPy table of
actions (``schedule.py``), packed into ticks of two lanes (``ticks.py``);
this module only interprets them (``docs/design.md``). Per tick, every pipe
device:

1. writes the activation and the gradient that arrived (sent at the previous
   tick) into its activation and gradient-inbox slots, as ``ticks.tick_buffers``
   says, and stores the residuals its previous forward produced;
2. runs its forward lane (a ``lax.switch``: nothing, or the forward of one of
   its stages, ``lanes.py``) and its backward lane (nothing, or the backward
   of one of its stages, which adds each parameter copy's weight gradient
   into that copy's accumulator stacks in their natural shapes);
3. sends its forward output to the next device and its input-gradient to the
   previous one with ``lax.ppermute`` (a ring when chunks wrap around).

Weights are read where they live (``stacks.py``): nothing weight-sized is
copied, sliced or concatenated inside the tick loop; the only weight-sized
operation per tick is the in-place add of a backward's gradient.

Split ticks (zero-bubble tables) run B in the backward lane (a ``lax.switch``
that adds nothing into the accumulators; what W needs goes into a weight
slot) and W in a third, weight lane, which adds the weight gradient into the
accumulator stacks (``split_backward.py``).

Ticks run under ``lax.scan`` over the table rows, so compile time does not
grow with the number of micro-batches. The last stage's forward is folded
into its backward (computing the loss there), so its forward lane is empty.

Legend: T ticks, P pipe devices, A activation slots, G gradient-inbox slots,
W weight slots, B rows per micro-batch, F/I float/int message columns, R_d
residual elements of dtype d per slot, Q_d W-input elements of dtype d.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .lanes import make_lanes, run_backward
from .mesh import DATA_AXIS, PIPE_AXIS
from .placement import Placement, merge_copies_local
from .rng import microbatch_key, step_key, uses_rng
from .split_backward import make_split_lanes, run_weight
from .layers import cast_floats
from .ticks import TickBuffers, Ticks


def index_microbatch(tree: Any, m: jax.Array) -> Any:
    """Micro-batch ``m`` of ``[M, B, ...]`` leaves (``m`` traced)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, m, keepdims=False), tree)


def local_views(weights: Any, inputs: Any, targets: Any) -> tuple[Any, Any, Any]:
    """Inside ``shard_map``: this device's stack entries and ``[M, B, ...]`` data."""
    drop = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    return drop(weights), drop(inputs), drop(targets)


class TickColumns(NamedTuple):
    """What each lane does, per tick and device: ``[T, P]`` int32 each (one row per tick in the scan)."""

    forward_branch: Any  # 0: idle, 1 + s: forward of stage s
    forward_mb: Any  # its micro-batch
    forward_slot: Any  # activation slot it reads
    residual_slot: Any  # slot its residuals go to, -1: none
    backward_branch: Any  # 0: idle, 1 + s: backward of stage s
    backward_mb: Any  # its micro-batch
    backward_slot: Any  # activation (and residual) slot it reads
    grad_slot: Any  # gradient-inbox slot it reads
    recv_act_slot: Any  # slot the arriving activation goes to, -1: none
    recv_grad_slot: Any  # slot the arriving gradient goes to, -1: none
    weight_branch: Any  # 0: idle, 1 + s: W of stage s (split ticks)
    weight_mb: Any  # its micro-batch
    weight_act_slot: Any  # activation (and residual) slot it reads
    weight_slot: Any  # weight slot it reads
    weight_out_slot: Any  # weight slot the backward lane's W input goes to, -1: none


def tick_columns(ticks: Ticks, buffers: TickBuffers) -> TickColumns:
    """The packed ticks and their buffer slots as executor columns (NumPy)."""
    S = ticks.num_stages
    f_stage, b_stage = ticks.stage(ticks.forward_chunk), ticks.stage(ticks.backward_chunk)
    w_stage = ticks.stage(ticks.weight_chunk)
    # The last stage's forward is folded into its backward: nothing to do.
    f_branch = np.where((f_stage >= 0) & (f_stage < S - 1), 1 + f_stage, 0)
    b_branch = np.where(b_stage >= 0, 1 + b_stage, 0)
    columns = TickColumns(
        forward_branch=f_branch, forward_mb=ticks.forward, forward_slot=buffers.forward_slot,
        residual_slot=np.where(f_branch > 0, buffers.forward_slot, -1),
        backward_branch=b_branch, backward_mb=ticks.backward, backward_slot=buffers.backward_slot,
        grad_slot=buffers.grad_slot, recv_act_slot=buffers.recv_act_slot, recv_grad_slot=buffers.recv_grad_slot,
        weight_branch=np.where(w_stage >= 0, 1 + w_stage, 0), weight_mb=ticks.weight,
        weight_act_slot=buffers.weight_act_slot, weight_slot=buffers.weight_slot,
        weight_out_slot=buffers.weight_out_slot,
    )
    return TickColumns(*(np.asarray(c, np.int32) for c in columns))


class TickState(NamedTuple):
    """The scan carry of one device."""

    act_f: jax.Array  # [A, B, F] activations held for their forward and backward
    act_i: jax.Array  # [A, B, I]
    inbox: jax.Array  # [G, B, F] input-gradients held for their backward
    saved: tuple  # per dtype [A, R_d] residuals from forward to backward
    acc: tuple  # [K] gradient accumulator stack entries, natural shapes
    loss_sum: jax.Array  # [] summed, scaled micro-batch losses
    arrived_f: jax.Array  # [B, F] activation sent to this device last tick
    arrived_i: jax.Array  # [B, I]
    arrived_g: jax.Array  # [B, F] gradient sent to this device last tick
    pending: tuple  # per dtype [R_d] residuals produced last tick
    pending_slot: jax.Array  # [] their slot, -1: none
    w_inputs: tuple  # per dtype [W, Q_d] what B computed for W (split ticks; empty otherwise)
    w_pending: tuple  # per dtype [Q_d] W input produced last tick
    w_pending_slot: jax.Array  # [] its slot, -1: none


def _write(slots: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """``slots[slot] = value`` where ``slot >= 0``; unchanged otherwise."""
    index = jnp.maximum(slot, 0)
    current = lax.dynamic_index_in_dim(slots, index, keepdims=False)
    value = jnp.where(slot >= 0, value, current)
    return lax.dynamic_update_index_in_dim(slots, value, index, 0)


def _read(slots: jax.Array, slot: jax.Array) -> jax.Array:
    return lax.dynamic_index_in_dim(slots, jnp.maximum(slot, 0), keepdims=False)


def _store_arrivals(state: TickState, cell: TickColumns) -> TickState:
    """Writes last tick's arrivals and residuals into their slots, before the lanes read.

    Writing residuals after the backward lane's read made XLA copy the whole
    residual buffer twice per tick.
    """
    return state._replace(
        act_f=_write(state.act_f, cell.recv_act_slot, state.arrived_f),
        act_i=_write(state.act_i, cell.recv_act_slot, state.arrived_i),
        inbox=_write(state.inbox, cell.recv_grad_slot, state.arrived_g),
        saved=tuple(_write(buf, state.pending_slot, new) for buf, new in zip(state.saved, state.pending)),
        w_inputs=tuple(_write(buf, state.w_pending_slot, new) for buf, new in zip(state.w_inputs, state.w_pending)),
    )


def _after_both_lanes(messages: tuple, lane_loss: jax.Array) -> tuple:
    """The tick's messages, made to depend on both lanes' results, so all are sent after both lanes ran.

    Each ``ppermute`` blocks until its peer reaches it. Left to itself XLA
    sends the forward lane's message as soon as it exists, before the
    backward lane; then a device whose work sits in one lane (the last
    stage, whose forward is folded into its backward) first waits for its
    neighbour's forward lane, and the neighbour then waits for its backward
    lane: the devices' lanes run one after the other instead of side by side
    (measured on 2 processes, issue 10's residual MLP, 1F1B: 860 ms per step
    before, about 650-740 ms after). ``lax.optimization_barrier`` does not
    survive XLA:CPU's pipeline, so the dependency is a data one: a NaN loss
    of this tick (from either lane) turns float messages to NaN and integer
    ones to 0, which the step's NaN loss reports anyway.
    ``tests/test_tick_hlo.py`` checks the resulting order.
    """
    nan = jnp.isnan(lane_loss)

    def tie(message):
        fill = lane_loss if jnp.issubdtype(message.dtype, jnp.floating) else 0
        return jnp.where(nan, jnp.asarray(fill, message.dtype), message)

    return tuple(tie(message) for message in messages)


def scheduled_loss_and_grad(
    placement: Placement,
    ticks: Ticks,
    buffers: TickBuffers,
    mesh: Mesh,
    loss_fn: Callable,
    remat: bool = False,
    compute_dtype: Any = None,
    seed: int = 0,
) -> Callable:
    """Builds the loss-and-gradient function that runs packed ticks.

    Args:
      placement: the stages placed on devices (``S = V * P`` stages).
      ticks: a schedule packed by ``ticks.pack`` for the placement's P, M and V.
      buffers: its buffer slots (``ticks.tick_buffers``).
      mesh: a ``("data", "pipe")`` mesh whose pipe size is P.
      loss_fn: ``(outputs, targets) -> []`` mean loss over one micro-batch.
      remat: recompute each stage's forward in its backward from the held
        input instead of saving its residuals (less memory, one more forward).
      compute_dtype: dtype the stages compute in (``None``: no casts): the
        weights are cast to it once per step and every layer's float inputs
        as they arrive; gradients accumulate in the parameters' dtype. The
        placement's boundaries must have been traced with the same casts
        (``trace_boundaries``).
      seed: the seed of the layers' random keys (``rng.py``); micro-batch
        ``m`` of replica ``r`` draws with global micro-batch ``r * M + m``.

    Returns:
      ``f(weights, inputs [D, M, B, ...], targets [D, M, B, ...], step=0) ->
      (loss [], grads)``: ``step`` (the optimizer steps taken) enters the
      layers' random keys; ``weights`` and ``grads`` are the placement's stacks
      (``[K]`` arrays ``[P, *shape]``); the loss is the mean of ``loss_fn``
      over all micro-batches of all replicas, the gradient its gradient
      (summed over ``data``; a split layer's copies summed into its owner).

    Raises:
      ValueError: if the ticks' sizes do not match the placement's.
    """
    num_devices, num_mb = placement.num_devices, placement.num_microbatches
    if (ticks.num_devices, ticks.num_microbatches, ticks.num_stages) != (
        num_devices, num_mb, placement.num_stages
    ):
        raise ValueError(
            f"schedule {ticks.name} is for P={ticks.num_devices}, "
            f"M={ticks.num_microbatches}, S={ticks.num_stages} stages, but the "
            f"placement has P={num_devices}, M={num_mb}, S={placement.num_stages}"
        )
    num_replicas = mesh.devices.shape[0]
    columns = jax.tree.map(jnp.asarray, tick_columns(ticks, buffers))
    ring = ticks.virtual_stages > 1
    fwd_perm = [(p, (p + 1) % num_devices) for p in range(num_devices if ring else num_devices - 1)]
    bwd_perm = [(p, (p - 1) % num_devices) for p in range(1 if not ring else 0, num_devices)]
    carrier = placement.carrier
    zero_f, zero_i = carrier.zeros()

    random = uses_rng(placement.specs)

    def body(weights, inputs, targets, step):
        weights, inputs, targets = local_views(weights, inputs, targets)
        acc = tuple(jnp.zeros_like(w) for w in weights)
        # Cast once per step, so no tick casts weights and no stage stores a cast copy as a residual.
        weights, inputs = cast_floats(weights, compute_dtype), cast_floats(inputs, compute_dtype)
        p = lax.axis_index(PIPE_AXIS)
        base = step_key(seed, step) if random else None

        def key_of(m):
            return microbatch_key(base, lax.axis_index(DATA_AXIS) * num_mb + m) if random else None

        x0, y0 = index_microbatch(inputs, 0), index_microbatch(targets, 0)
        lanes = make_lanes(placement, loss_fn, 1.0 / (num_mb * num_replicas), remat, compute_dtype,
                           (weights, zero_f, zero_i, x0, y0, key_of(0)))
        no_saved = tuple(jnp.zeros((n,), d) for d, n in zip(lanes.res_dtypes, lanes.res_sizes))
        split = make_split_lanes(lanes, (weights, zero_f, zero_i, zero_f, no_saved, x0, y0, key_of(0))) if ticks.split else None
        w_dtypes, w_sizes = (split.w_dtypes, split.w_sizes) if split else ((), ())

        def tick(state: TickState, row: TickColumns):
            cell = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, p, keepdims=False), row)
            state = _store_arrivals(state, cell)
            f_mb, b_mb = jnp.maximum(cell.forward_mb, 0), jnp.maximum(cell.backward_mb, 0)
            send_f, send_i, produced, early_loss = lax.switch(
                cell.forward_branch, lanes.forwards, weights, _read(state.act_f, cell.forward_slot),
                _read(state.act_i, cell.forward_slot), index_microbatch(inputs, f_mb),
                index_microbatch(targets, f_mb), key_of(f_mb),
            )
            b_operands = (
                _read(state.act_f, cell.backward_slot), _read(state.act_i, cell.backward_slot),
                _read(state.inbox, cell.grad_slot), tuple(_read(buf, cell.backward_slot) for buf in state.saved),
                index_microbatch(inputs, b_mb), index_microbatch(targets, b_mb), key_of(b_mb),
            )
            w_made, w_slot = (), jnp.asarray(-1, jnp.int32)
            if split is None:
                acc, send_g, loss = run_backward(lanes, cell.backward_branch, weights, state.acc, *b_operands)
            else:
                send_g, loss, w_made = lax.switch(cell.backward_branch, split.backwards, weights, *b_operands)
                w_slot, w_mb = cell.weight_out_slot, jnp.maximum(cell.weight_mb, 0)
                acc = run_weight(
                    split, cell.weight_branch, weights, state.acc,
                    _read(state.act_f, cell.weight_act_slot), _read(state.act_i, cell.weight_act_slot),
                    tuple(_read(buf, cell.weight_act_slot) for buf in state.saved),
                    index_microbatch(inputs, w_mb), index_microbatch(targets, w_mb), key_of(w_mb),
                    tuple(_read(buf, cell.weight_slot) for buf in state.w_inputs),
                )
            if num_devices > 1:
                send_f, send_i, send_g = _after_both_lanes((send_f, send_i, send_g), early_loss + loss)
                send_f = lax.ppermute(send_f, PIPE_AXIS, fwd_perm)
                if placement.sends_ints:
                    send_i = lax.ppermute(send_i, PIPE_AXIS, fwd_perm)
                send_g = lax.ppermute(send_g, PIPE_AXIS, bwd_perm)
            state = state._replace(
                acc=acc, loss_sum=state.loss_sum + early_loss + loss, arrived_f=send_f, arrived_i=send_i, arrived_g=send_g,
                pending=produced, pending_slot=cell.residual_slot, w_pending=w_made, w_pending_slot=w_slot,
            )
            return state, None

        slots_a, slots_g = buffers.num_act_slots, buffers.num_grad_slots
        init = TickState(
            act_f=jnp.zeros((slots_a,) + zero_f.shape, zero_f.dtype),
            act_i=jnp.zeros((slots_a,) + zero_i.shape, zero_i.dtype),
            inbox=jnp.zeros((slots_g,) + zero_f.shape, zero_f.dtype),
            saved=tuple(jnp.zeros((slots_a, n), d) for d, n in zip(lanes.res_dtypes, lanes.res_sizes)),
            acc=acc,
            loss_sum=jnp.zeros((), jnp.float32),
            arrived_f=zero_f, arrived_i=zero_i, arrived_g=zero_f,
            pending=tuple(jnp.zeros((n,), d) for d, n in zip(lanes.res_dtypes, lanes.res_sizes)),
            pending_slot=jnp.asarray(-1, jnp.int32),
            w_inputs=tuple(jnp.zeros((buffers.num_weight_slots, n), d) for d, n in zip(w_dtypes, w_sizes)),
            w_pending=tuple(jnp.zeros((n,), d) for d, n in zip(w_dtypes, w_sizes)),
            w_pending_slot=jnp.asarray(-1, jnp.int32),
        )
        final, _ = lax.scan(tick, init, columns)
        loss = lax.psum(lax.psum(final.loss_sum, PIPE_AXIS), DATA_AXIS) / (num_mb * num_replicas)
        grads = merge_copies_local(placement, jax.tree.map(lambda g: lax.psum(g, DATA_AXIS), final.acc), p)
        return loss, tuple(g[None] for g in grads)

    spec = PartitionSpec(PIPE_AXIS)
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spec, PartitionSpec(DATA_AXIS), PartitionSpec(DATA_AXIS), PartitionSpec()),
        out_specs=(PartitionSpec(), spec),
        check_vma=False,
    )

    def loss_and_grad(weights, inputs, targets, step=0):
        return mapped(weights, inputs, targets, jnp.asarray(step, jnp.int32))

    return loss_and_grad
