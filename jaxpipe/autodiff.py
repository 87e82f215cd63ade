"""GPipe with autodiff: the reference path beside the table executor.

GPipe (Huang et al., 2019, "GPipe: Efficient Training of Giant Neural Networks
using Pipeline Parallelism"): every micro-batch flows forward through the P
pipe devices, one device per tick; the backward pass is JAX's autodiff of the
forward scan, which runs the ticks in reverse and sends boundary gradients
back along the transposed ``ppermute``. A device with no micro-batch at a
tick (pipeline fill and drain) takes the ``lax.cond`` branch that computes
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .executor import index_microbatch, local_views
from .mesh import DATA_AXIS, PIPE_AXIS
from .placement import Placement
from .rng import microbatch_key, step_key, uses_rng
from .layers import apply_layer, cast_floats, loss_precision


def _device_program(placement: Placement, q: int, loss_fn: Callable, remat: bool, compute_dtype) -> Callable:
    """Forward program of pipe device ``q``: receive, run its layers, send.

    With a ``compute_dtype`` the parameters and every layer's float inputs
    are cast to it and the model output is widened to float32 for
    ``loss_fn``; the casts' transposes bring gradients back to the stacks' dtype.
    ``weights`` are this device's stack entries (``stacks.py``).

    Returns a function ``(weights, recv_f [B, F], recv_i [B, I], x, y, key) ->
    (send_f [B, F], send_i [B, I], loss [])`` where ``x`` and ``y`` are this
    micro-batch's model input and targets (used by the first and last device)
    and ``key`` its key data for layers that draw random numbers, or ``None``.
    """
    copies = placement.device_copies[q]
    last = q == placement.num_devices - 1
    carrier = placement.carrier

    def program(weights, recv_f, recv_i, x, y, key):
        h = x if q == 0 else carrier.decode(placement.boundaries[placement.copy_layer[copies[0]]], recv_f, recv_i)
        for copy in copies:
            spec, params = placement.specs[copy], cast_floats(placement.copy_tree(weights, copy), compute_dtype)
            with jax.named_scope(f"layer{placement.copy_layer[copy]}_{spec.name}"):
                h = apply_layer(spec, params, cast_floats(h, compute_dtype), key)
        if last:
            send_f, send_i = carrier.zeros()
            h = h if compute_dtype is None else loss_precision(h)
            return send_f, send_i, jnp.asarray(loss_fn(h, y), jnp.float32)
        send_f, send_i = carrier.encode(placement.boundaries[placement.copy_layer[copies[-1]] + 1], h)
        return send_f, send_i, jnp.zeros((), jnp.float32)

    program = jax.named_call(program, name=f"device{q}")
    return jax.checkpoint(program) if remat else program


def autodiff_gpipe_loss(
    placement: Placement,
    mesh: Mesh,
    loss_fn: Callable,
    remat: bool = False,
    skip_idle: bool = True,
    compute_dtype: Any = None,
    seed: int = 0,
) -> Callable:
    """Builds the GPipe pipeline loss, differentiable with ``jax.grad``.

    Args:
      placement: the static stage placement.
      mesh: a ``("data", "pipe")`` mesh whose pipe size equals the placement's P.
      loss_fn: ``(outputs, targets) -> []`` mean loss over one micro-batch.
      remat: rematerialise each device's layers in the backward pass, so only
        boundary activations are stored between forward and backward.
      skip_idle: skip computation on idle ticks (always on in the library;
        off only to measure what skipping saves).
      compute_dtype: dtype the layers compute in (``None``: no casts); see
        ``scheduled_loss_and_grad``.
      seed: the seed of the layers' random keys (``rng.py``).

    Returns:
      ``loss(weights, inputs [D, M, B, ...], targets [D, M, B, ...], step=0) ->
      []`` (``step`` enters the layers' random keys) where ``weights`` are the
      placement's stacks (``[K]`` arrays ``[P, *shape]``): the mean of
      ``loss_fn`` over all micro-batches of all replicas.
    """
    num_devices, num_mb = placement.num_devices, placement.num_microbatches
    programs = [_device_program(placement, q, loss_fn, remat, compute_dtype) for q in range(num_devices)]
    forward_perm = [(q, q + 1) for q in range(num_devices - 1)]
    random = uses_rng(placement.specs)

    def body(params, inputs, targets, step):
        weights, inputs, targets = local_views(params, inputs, targets)
        q = lax.axis_index(PIPE_AXIS)
        base = step_key(seed, step) if random else None

        def tick(carry, t):
            recv_f, recv_i, loss_sum = carry
            m = t - q
            active = (m >= 0) & (m < num_mb)
            mc = jnp.clip(m, 0, num_mb - 1)
            x, y = index_microbatch(inputs, mc), index_microbatch(targets, mc)
            key = microbatch_key(base, lax.axis_index(DATA_AXIS) * num_mb + mc) if random else None

            def work():
                return lax.switch(q, programs, weights, recv_f, recv_i, x, y, key)

            def idle():
                send_f, send_i = placement.carrier.zeros()
                return send_f, send_i, jnp.zeros((), jnp.float32)

            send_f, send_i, loss = lax.cond(active, work, idle) if skip_idle else work()
            if num_devices > 1:
                send_f = lax.ppermute(send_f, PIPE_AXIS, forward_perm)
                if placement.sends_ints:
                    send_i = lax.ppermute(send_i, PIPE_AXIS, forward_perm)
            return (send_f, send_i, loss_sum + loss), None

        recv_f, recv_i = placement.carrier.zeros()
        init = (recv_f, recv_i, jnp.zeros((), jnp.float32))
        (_, _, loss_sum), _ = lax.scan(tick, init, jnp.arange(num_mb + num_devices - 1))
        loss = lax.psum(loss_sum, PIPE_AXIS) / num_mb
        return lax.pmean(loss, DATA_AXIS)

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(PIPE_AXIS), PartitionSpec(DATA_AXIS), PartitionSpec(DATA_AXIS), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,
    )

    def loss(weights, inputs, targets, step=0):
        return mapped(weights, inputs, targets, jnp.asarray(step, jnp.int32))

    return loss
