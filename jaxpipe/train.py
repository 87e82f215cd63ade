"""``jaxpipe.train``: the one-call entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .pipeline import Pipeline, TrainState, check_rows
from .planner import Plan


class TrainResult(NamedTuple):
    """What ``train`` returns.

    Attributes:
      losses: the mean training loss of each step.
      layers: the trained layers, as ``model_fn`` returns them.
      state: the final ``TrainState`` (packed parameters and optimizer state).
      pipeline: the ``Pipeline`` that ran, for further steps or evaluation.
    """

    losses: list[float]
    layers: list[nnx.Module]
    state: TrainState
    pipeline: Pipeline

    @property
    def plan(self) -> Plan:
        """The plan that ran: per device its layers, loads, memory, prediction, reason."""
        return self.pipeline.plan


def train(
    model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]],
    mesh_shape: Sequence[int] = (1, 1),
    *,
    data: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    steps: int,
    num_microbatches: int = 1,
    schedule: str = "gpipe",
    virtual_stages: int = 1,
    cut: str = "integer",
    seed: int = 0,
    partition: Sequence[int] | None = None,
    costs: Sequence[float] | None = None,
    unsplittable: Sequence[int] = (),
    max_memory_per_device: float | None = None,
    executor: str = "table",
    remat: bool | None = None,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> TrainResult:
    """Trains ``model_fn``'s layers with pipeline and data parallelism.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``, the layers in order.
      mesh_shape: ``(D, P)``: data replicas x pipe devices; ``D * P`` devices
        are used. ``(1, 1)`` is plain single-device training.
      data: iterable of global batches ``(inputs, targets)``, each an array or
        pytree of arrays with ``R`` leading rows, ``R`` a multiple of ``D * M``.
      loss_fn: ``(outputs, targets) -> []``, mean loss over one micro-batch.
      optimizer: an optax transformation (see ``Pipeline`` for which are exact).
      steps: number of optimizer steps.
      num_microbatches: M, micro-batches per data replica.
      schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved"``, ``"balanced"``
        (fractional cuts, 1F1B order) or ``"auto"`` (the planner picks).
      virtual_stages: V, chunks per pipe device for ``"interleaved"``.
      cut: ``"integer"`` (whole layers per stage) or ``"fractional"`` (equal
        loads, layers split by rows); ``"balanced"`` implies fractional.
      seed: seed for ``model_fn``'s ``nnx.Rngs``.
      partition: ``[V * P]`` layers per stage (default: balanced by XLA's
        flop estimate).
      costs: ``[L]`` per-layer costs for the partitioner (default: XLA's
        forward+backward flop estimate), e.g. ``profile(...).total()``.
      unsplittable: layer indices ``schedule="balanced"`` must not split by
        rows (layers found to mix rows are added automatically).
      max_memory_per_device: bytes; ``schedule="auto"`` only picks plans
        predicted to fit.
      executor: ``"table"`` or ``"autodiff"`` (GPipe only; see ``Pipeline``).
      remat: with ``executor="autodiff"``, rematerialise each device's layers.
      progress: show a progress bar with the loss.
      devices: devices for the mesh; default ``jax.devices()``.

    Returns:
      A ``TrainResult`` with ``losses``, trained ``layers``, ``state`` and
      ``pipeline``.

    Raises:
      ValueError: for bad shapes, sizes or options (see ``Pipeline``), or if
        ``data`` runs out before ``steps`` batches.
      TypeError: for wrongly typed arguments.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {steps!r}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(data, Sized) and len(data) < steps:
        raise ValueError(
            f"data has {len(data)} batches but steps={steps}; give an iterable "
            "with at least one batch per step"
        )
    try:
        batches = iter(data)
    except TypeError:
        raise TypeError(
            "data must be an iterable of (inputs, targets) batches, got "
            f"{type(data).__name__}"
        ) from None
    first = _next_batch(batches, 0, steps)
    pipe = Pipeline(
        model_fn,
        mesh_shape,
        loss_fn,
        optimizer,
        num_microbatches,
        first,
        schedule=schedule,
        virtual_stages=virtual_stages,
        cut=cut,
        partition=partition,
        costs=costs,
        unsplittable=unsplittable,
        max_memory_per_device=max_memory_per_device,
        executor=executor,
        remat=remat,
        seed=seed,
        devices=devices,
    )
    state = pipe.init()
    losses: list[float] = []
    bar = _progress(steps, progress)
    batch = first
    for step in range(steps):
        if step:
            batch = _next_batch(batches, step, steps)
        state, loss = pipe.train_step(state, batch)
        losses.append(float(loss))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return TrainResult(losses, pipe.layers(state.params), state, pipe)


def _next_batch(batches, step: int, steps: int):
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(
            f"data ran out after {step} batches but steps={steps}; give an "
            "iterable with at least one batch per step"
        ) from None


def _progress(steps: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="train", unit="step")


def plan(
    model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]],
    mesh_shape: Sequence[int],
    example_inputs: Any,
    *,
    num_microbatches: int,
    schedule: str = "auto",
    **options: Any,
) -> Plan:
    """The plan jaxpipe would run for a model, without compiling or training.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``.
      mesh_shape: ``(D, P)``.
      example_inputs: one global batch of model inputs, ``[R, ...]`` leaves.
      num_microbatches: M.
      schedule: as for ``Pipeline`` (default ``"auto"``: the planner picks).
      **options: other ``Pipeline`` keyword options (``costs``,
        ``virtual_stages``, ``max_memory_per_device``, ``unsplittable``...).

    Returns:
      The ``Plan``; ``print`` it for per-device layers, loads, memory,
      predicted step time of the plain and chosen plan, and the reason.
    """
    rows = check_rows(example_inputs, "example_inputs")
    targets = np.zeros((rows,), np.float32)
    pipe = Pipeline(
        model_fn, mesh_shape, _plan_only_loss, optax.identity(), num_microbatches,
        (example_inputs, targets), schedule=schedule, **options,
    )
    return pipe.plan


def _plan_only_loss(outputs: Any, targets: Any) -> jax.Array:
    leaves = [leaf for leaf in jax.tree.leaves(outputs) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return sum(jnp.mean(leaf) for leaf in leaves) + 0.0 * jnp.mean(targets) if leaves else jnp.mean(targets)
