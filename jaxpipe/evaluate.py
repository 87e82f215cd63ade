"""Forward-only evaluation: the mean loss of a batch, nothing kept for a backward.

The stages run in GPipe's forward order: stage ``s`` works on micro-batch
``m`` at tick ``m + s``, every device runs each of its ``V`` chunks' stages
when that stage has a micro-batch, and the messages move one device along
the pipe per tick (device 0's chunk ``c`` receives from the last device's
chunk ``c - 1``). Each stage is ``lanes.stage_apply`` with every layer in
evaluation mode (``layer.eval()``: dropout off), so any cut (integer or
fractional) and any number of chunks evaluate exactly as they train, less
the randomness. No ``jax.vjp`` runs: no residual is produced or stored.

Legend: P pipe devices, V chunks per device, S = V * P stages, M
micro-batches, B rows per micro-batch, F/I float/int message columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from .executor import index_microbatch, local_views
from .lanes import partial_loss, send, stage_apply, stage_trees, takes_loss_early
from .mesh import DATA_AXIS, PIPE_AXIS
from .placement import Placement
from .rng import draws
from .layers import cast_floats, loss_precision


def check_deterministic(placement: Placement, params: Sequence[Any], structs: Sequence[Any]) -> None:
    """Refuses a model whose layers still draw random numbers after ``layer.eval()``.

    Args:
      placement: the stage placement.
      params: ``[L]`` per-layer parameter trees (arrays or shape structs).
      structs: ``L + 1`` activation structures (``tracing.trace_boundaries``).

    Raises:
      ValueError: naming the first such layer.
    """
    for layer in range(placement.num_layers):
        spec = placement.specs[layer]
        if spec.streams and draws(spec, params[layer], structs[layer], deterministic=True):
            raise ValueError(
                f"layer {layer} ({spec.name}) still uses its RNG streams {['/'.join(map(str, p)) for p in spec.streams]} "
                "after layer.eval(), so its evaluation loss would be random; make its randomness follow a "
                "`deterministic` attribute (as nnx.Dropout does; a Linen module: wrap it with jaxpipe.linen, "
                "which passes deterministic to it)"
            )


def _stage_program(placement: Placement, s: int, loss_fn: Callable, compute_dtype) -> Callable:
    """``(weights, in_f, in_i, x, y) -> (send_f, send_i, loss)`` for stage ``s``, in evaluation mode."""
    last = s == placement.num_stages - 1

    def loss_of(out, y):
        return loss_fn(out if compute_dtype is None else loss_precision(out), y)

    def program(weights, in_f, in_i, x, y):
        done, pending = stage_apply(
            placement, s, stage_trees(placement, s, weights), in_f, in_i, x, compute_dtype, deterministic=True
        )
        if last:
            return placement.carrier.zeros() + (partial_loss(placement, s, pending, y, loss_of),)
        # A stage that holds the first rows of a split last layer takes their loss (split_loss).
        early = takes_loss_early(placement, s)
        loss = partial_loss(placement, s, done, y, loss_of) if early else jnp.zeros((), jnp.float32)
        return send(placement, s, done, pending) + (loss,)

    return program


def forward_loss(placement: Placement, mesh: Mesh, loss_fn: Callable, compute_dtype: Any = None) -> Callable:
    """Builds the forward-only mean loss.

    Args:
      placement: the stage placement.
      mesh: a ``("data", "pipe")`` mesh whose pipe size is the placement's P.
      loss_fn: ``(outputs, targets) -> []`` mean loss over one micro-batch.
      compute_dtype: dtype the layers compute in (``None``: no casts), as in training.

    Returns:
      ``loss(weights, inputs [D, M, B, ...], targets [D, M, B, ...]) -> []``:
      the mean of ``loss_fn`` over all micro-batches of all replicas, every
      layer in evaluation mode.
    """
    num_devices, num_mb, num_stages = placement.num_devices, placement.num_microbatches, placement.num_stages
    virtual_stages = num_stages // num_devices
    programs = [
        [_stage_program(placement, c * num_devices + q, loss_fn, compute_dtype) for q in range(num_devices)]
        for c in range(virtual_stages)
    ]
    ring = virtual_stages > 1
    perm = [(q, (q + 1) % num_devices) for q in range(num_devices if ring else num_devices - 1)]

    def body(weights, inputs, targets):
        weights, inputs, targets = local_views(weights, inputs, targets)
        weights, inputs = cast_floats(weights, compute_dtype), cast_floats(inputs, compute_dtype)
        p = lax.axis_index(PIPE_AXIS)

        def idle(*args):
            return placement.carrier.zeros() + (jnp.zeros((), jnp.float32),)

        def tick(carry, t):
            recv_f, recv_i, loss_sum = carry
            sends_f, sends_i = [], []
            for c in range(virtual_stages):
                m = t - (c * num_devices + p)
                mc = jnp.clip(m, 0, num_mb - 1)
                x, y = index_microbatch(inputs, mc), index_microbatch(targets, mc)

                def work(weights, in_f, in_i, x, y, c=c):
                    return lax.switch(p, programs[c], weights, in_f, in_i, x, y)

                send_f, send_i, loss = lax.cond(
                    (m >= 0) & (m < num_mb), work, idle, weights, recv_f[c], recv_i[c], x, y
                )
                sends_f.append(send_f)
                sends_i.append(send_i)
                loss_sum = loss_sum + loss
            sent_f, sent_i = jnp.stack(sends_f), jnp.stack(sends_i)
            if num_devices > 1:
                sent_f = lax.ppermute(sent_f, PIPE_AXIS, perm)
                if placement.sends_ints:
                    sent_i = lax.ppermute(sent_i, PIPE_AXIS, perm)
            # Device 0's chunk c continues the last device's chunk c - 1.
            sent_f = jnp.where(p == 0, jnp.roll(sent_f, 1, axis=0), sent_f)
            sent_i = jnp.where(p == 0, jnp.roll(sent_i, 1, axis=0), sent_i)
            return (sent_f, sent_i, loss_sum), None

        zero_f, zero_i = placement.carrier.zeros()
        init = (
            jnp.zeros((virtual_stages,) + zero_f.shape, zero_f.dtype),
            jnp.zeros((virtual_stages,) + zero_i.shape, zero_i.dtype),
            jnp.zeros((), jnp.float32),
        )
        (_, _, loss_sum), _ = lax.scan(tick, init, jnp.arange(num_mb + num_stages - 1))
        return lax.pmean(lax.psum(loss_sum, PIPE_AXIS) / num_mb, DATA_AXIS)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(PIPE_AXIS), PartitionSpec(DATA_AXIS), PartitionSpec(DATA_AXIS)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )
