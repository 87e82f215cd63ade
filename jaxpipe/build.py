"""The phases that build a ``Pipeline``, each a function of the previous ones' results.

``Pipeline.__init__`` runs them in this order and keeps their results::

    trace_model         model_fn, example batch, config -> Traced
    unsplittable_layers Traced, config                  -> layers a fractional cut must not split
    cost_model          Traced, config                  -> LayerCosts
    choose_stages       LayerCosts, config, P, B        -> Choice (the cut, order, V, remat, the Plan)
    place               Traced, Choice, config          -> Placed (the Placement)
    build_step          Placed, Choice, config          -> Step (value_and_grad, optimizer update)

Each returns a small immutable record and can be called alone (tests/test_build.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from .autodiff import autodiff_gpipe_loss
from .calibrate import Calibration
from .config import PipelineConfig
from .costs import layer_costs
from .executor import scheduled_loss_and_grad
from .guards import batch_rows, batch_signature, check_batch, check_loss
from .layers import cast_floats, loss_precision, model_graph, split_layers
from .optimizer import LayerOptimizer, local_updates, whole_tree_update
from .partition import (
    check_layer_ids,
    check_partition,
    partition_layers,
    pieces_from_counts,
)
from .placement import Placement, merge_copies, place_stages, sync_copies
from .planner import Plan, balanced_stages, describe_plan, make_plan
from .prediction import predict
from .rng import draws
from .row_mixing import mixing_layers
from .schedule import Schedule, make_schedule
from .ticks import TickBuffers, Ticks, pack, tick_buffers
from .tracing import boundary_bytes, largest_activation_bytes, residual_bytes, trace_boundaries


class Traced(NamedTuple):
    """A model's layers, their parameters, and every activation's shapes for one micro-batch.

    Attributes:
      specs: ``[L]`` ``LayerSpec``, the layers as pure functions.
      graph: the whole layer list as one nnx graph (``Pipeline.layers`` rebuilds shared objects from it).
      layer_params: ``[L]`` parameter trees in the layers' own dtype.
      params: ``[L]`` master parameter trees, in ``param_dtype``.
      run_params: ``[L]`` parameter trees in ``compute_dtype`` (what the stages compute with).
      param_dtype: the master parameters' dtype.
      structs: ``[L + 1]`` shape structs of each layer's input and the model output, one micro-batch.
      outputs: the model output's structs as ``loss_fn`` sees them (narrow floats widened).
      inputs: the example batch's inputs, ``[R, ...]`` leaves.
      targets: the example batch's targets, ``[R, ...]`` leaves.
      x_mb: one micro-batch's input structs, ``[B, ...]``.
      y_mb: one micro-batch's target structs, ``[B, ...]``.
      microbatch_rows: B, rows per micro-batch.
      signature: the example batch's leaf shapes and dtypes (``guards.batch_signature``).
    """

    specs: tuple
    graph: Any
    layer_params: tuple
    params: tuple
    run_params: tuple
    param_dtype: Any
    structs: tuple
    outputs: Any
    inputs: Any
    targets: Any
    x_mb: Any
    y_mb: Any
    microbatch_rows: int
    signature: Any


class LayerCosts(NamedTuple):
    """What the cuts and the planner know of each layer.

    Attributes:
      forward: ``[L]`` forward cost of one micro-batch.
      backward: ``[L]`` backward cost of one micro-batch.
      unit: what the costs measure: ``"s"``, ``"flop"`` or ``"cost"``.
      layer_names: ``[L]`` names for the printout.
      param_bytes: ``[L]`` master parameter bytes.
      residual_bytes: ``[L]`` bytes a forward saves for its backward, one micro-batch.
      message_bytes: bytes of the largest activation sent between stages.
      boundary_bytes: ``[L + 1]`` bytes of each layer boundary (the model
        input, each layer's output), one micro-batch.
      piece_scale: ``([L, B + 1], [L, B + 1])`` measured forward and backward
        fraction of a layer's cost at each row count (``Profile.piece_scale``),
        or ``None`` (a piece costs its share of rows).
    """

    forward: np.ndarray
    backward: np.ndarray
    unit: str
    layer_names: tuple
    param_bytes: tuple
    residual_bytes: tuple
    message_bytes: float
    boundary_bytes: tuple = ()
    piece_scale: tuple | None = None


class Choice(NamedTuple):
    """The stages and how they run: the caller's choice, or the planner's for ``"auto"``.

    Attributes:
      plan: the ``Plan`` (printout, predictions, the plain plan beside it).
      stages: ``[V * P]`` tuples of ``Piece``.
      schedule: the order run (never ``"auto"`` or ``"balanced"``).
      virtual_stages: V.
      cut: ``"integer"`` or ``"fractional"``.
      remat: whether stages recompute their forward in the backward.
      partition: ``[V * P]`` layers per stage; a stage holding part of a
        layer's rows counts that part's share of rows (rounded to 4 digits).
    """

    plan: Plan
    stages: tuple
    schedule: str
    virtual_stages: int
    cut: str
    remat: bool
    partition: tuple


class Placed(NamedTuple):
    """The stages on devices.

    Attributes:
      placement: the ``Placement`` (parameter copies, stacks, boundaries).
      split_loss: whether each piece of a split last layer takes its own rows' loss.
    """

    placement: Placement
    split_loss: bool


class Step(NamedTuple):
    """The functions one training step calls, and the tables they interpret.

    Attributes:
      value_and_grad: ``(params, inputs, targets, step) -> (loss [], grads)``.
      update: ``(grads, opt_state, params) -> (params, opt_state, grad_norm [])``.
      layer_optimizer: the optimizer on the per-layer tree (``optimizer.LayerOptimizer``).
      table: the schedule table run (``None`` with ``executor="autodiff"``).
      ticks: the table packed into ticks (``None`` with ``"autodiff"``).
      buffers: the ticks' buffer slots (``None`` with ``"autodiff"``).
    """

    value_and_grad: Callable
    update: Callable
    layer_optimizer: LayerOptimizer
    table: Schedule | None
    ticks: Ticks | None
    buffers: TickBuffers | None


def check_optimizer(optimizer: Any) -> optax.GradientTransformation:
    """The optax transformation to apply (a ``MultiSteps`` unwrapped), or a TypeError."""
    if isinstance(optimizer, optax.MultiSteps):
        optimizer = optimizer.gradient_transformation()
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    return optimizer


def trace_model(
    model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]], loss_fn: Callable, example_batch: tuple[Any, Any],
    config: PipelineConfig, num_replicas: int, num_devices: int,
) -> Traced:
    """Builds the layers, checks them against the mesh, and traces one micro-batch through them and the loss.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``, called with ``config.seed``.
      loss_fn: ``(outputs, targets) -> []``.
      example_batch: ``(inputs, targets)``, one global batch of ``[R, ...]`` leaves (or shape structs).
      config: the options.
      num_replicas: D.
      num_devices: P.

    Raises:
      ValueError: too few layers for the pipe devices (integer cuts) or for
        ``V * P`` stages, rows that do not divide into ``D * M``, a layer or
        ``loss_fn`` that fails or a loss that is no float scalar.
      TypeError: for a batch that is no pair, or layers that are no modules.
    """
    layers = model_fn(nnx.Rngs(config.seed))
    specs, layer_params, layer_dtype = split_layers(layers)
    graph = model_graph(layers)
    dtype = layer_dtype if config.param_dtype is None else config.param_dtype
    # Master parameters in param_dtype; the boundaries are traced with
    # the executors' compute_dtype casts, so the carrier gets that dtype.
    params = cast_floats(layer_params, dtype)
    run_params = cast_floats(params, config.compute_dtype)
    _check_layer_count(len(specs), config, (num_replicas, num_devices))
    inputs, targets = check_batch(example_batch)
    rows = batch_rows(inputs, targets, num_replicas, config.num_microbatches)
    microbatch_rows = rows // (num_replicas * config.num_microbatches)
    x_mb, y_mb = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct((microbatch_rows,) + np.shape(a)[1:], a.dtype), t)
        for t in (inputs, targets)
    )
    structs = trace_boundaries(specs, run_params, x_mb, config.compute_dtype)
    outputs = structs[-1] if config.compute_dtype is None else loss_precision(structs[-1])
    check_loss(loss_fn, outputs, y_mb)
    return Traced(
        tuple(specs), graph, tuple(layer_params), tuple(params), tuple(run_params), dtype, tuple(structs), outputs,
        inputs, targets, x_mb, y_mb, microbatch_rows, batch_signature(inputs, targets),
    )


def _check_layer_count(num_layers: int, config: PipelineConfig, mesh_shape: tuple[int, int]) -> None:
    num_devices, virtual_stages = mesh_shape[1], config.virtual_stages
    if num_layers < num_devices and config.cut == "integer" and config.schedule != "auto":
        # Fractional cuts (and "auto", which then plans only those) give
        # each device rows of some layer instead.
        raise ValueError(
            f"the model has {num_layers} layers but mesh_shape={mesh_shape} "
            f"has {num_devices} pipe devices; every pipe device needs at least "
            f"one layer, so use pipe <= {num_layers}, or cut='fractional' "
            "(schedule='balanced') to split layers by rows"
        )
    if virtual_stages > 1 and num_layers < virtual_stages * num_devices:
        raise ValueError(
            f"schedule='interleaved' with virtual_stages={virtual_stages} on "
            f"{num_devices} pipe devices needs at least "
            f"{virtual_stages * num_devices} layers (V * P, one per stage), "
            f"but the model has {num_layers}; lower virtual_stages to at most "
            f"{num_layers // num_devices}"
        )


def unsplittable_layers(traced: Traced, config: PipelineConfig) -> tuple[int, ...]:
    """The layers a fractional cut must not split: the given ones, those that mix rows, those that draw randoms.

    Whether rows mix is probed (``row_mixing.py``) only when a fractional cut
    may be chosen (``cut="fractional"`` or ``"auto"``).

    Raises:
      ValueError: for ``config.unsplittable`` entries that are no layer indices.
    """
    given = check_layer_ids(config.unsplittable, len(traced.specs))
    mixing = ()
    if config.cut == "fractional" or config.schedule == "auto":
        # Whether rows mix is the layer's property: tested in its own
        # dtype, where rows computed apart agree to float32 rounding.
        mixing = mixing_layers(traced.specs, traced.layer_params, traced.inputs, traced.microbatch_rows)
    # A layer that draws random numbers is never split (rng.py): a piece cannot draw its rows' share.
    random = (
        i for i, (spec, p) in enumerate(zip(traced.specs, traced.run_params))
        if spec.streams and draws(spec, p, traced.structs[i], deterministic=False)
    )
    return tuple(sorted(set(given) | set(mixing) | set(random)))


def cost_model(traced: Traced, config: PipelineConfig) -> LayerCosts:
    """Per-layer costs (``config.costs``, or XLA's flop estimate) and bytes for the cuts and the planner.

    Cuts balance forward + backward: in a packed 1F1B steady state every
    device runs one forward and one backward per tick, so these loads set
    the lock-step tick length. With several processes all take process 0's
    costs, so that every process cuts (and packs) alike.
    """
    forward, backward, unit = layer_costs(config.costs, traced.specs, traced.run_params, traced.structs)
    piece_scale = None
    if getattr(config.costs, "piece_rows", ()) and config.costs.microbatch_rows == traced.microbatch_rows:
        piece_scale = config.costs.piece_scale()
    if jax.process_count() > 1:
        forward, backward, *piece_scale = (
            np.asarray(a, np.float64) for a in multihost_utils.broadcast_one_to_all(
                (forward.astype(np.float32), backward.astype(np.float32),
                 *(a.astype(np.float32) for a in piece_scale or ()))
            )
        )
        piece_scale = tuple(piece_scale) or None
    itemsize = jnp.dtype(traced.param_dtype).itemsize
    return LayerCosts(
        forward, backward, unit, tuple(spec.name for spec in traced.specs),
        tuple(spec.size * itemsize for spec in traced.specs),
        tuple(residual_bytes(traced.specs, traced.run_params, traced.structs)),
        largest_activation_bytes(traced.structs), tuple(boundary_bytes(traced.structs)), piece_scale,
    )


def in_seconds(costs: LayerCosts, calibration: Calibration | None) -> LayerCosts:
    """``costs`` in seconds when a calibration will price the plan (flops times ``calibration.flop_s``).

    Raises:
      ValueError: if the costs are neither seconds nor flops (given numbers
        in an unknown unit cannot be added to seconds of overhead).
    """
    if calibration is None or costs.unit == "s":
        return costs
    if costs.unit != "flop":
        raise ValueError(
            f"calibration prices plans in seconds, but costs are given numbers (unit {costs.unit!r}); give "
            "costs=jaxpipe.profile(...) or costs=None (flop estimates), or leave calibration=None"
        )
    scale = calibration.flop_s
    return costs._replace(forward=costs.forward * scale, backward=costs.backward * scale, unit="s")


def choose_stages(
    costs: LayerCosts, config: PipelineConfig, num_devices: int, rows: int, unsplittable: Sequence[int] = ()
) -> Choice:
    """The stages, order, V and remat to run, with the ``Plan`` that describes them.

    ``"auto"``: the planner's fastest candidate that fits. Otherwise the
    config's order with its cut: ``planner.balanced_stages`` (equal loads,
    or the least predicted step with a calibration or measured piece costs),
    ``config.partition``, or the min-max integer cut ``partition_layers``.

    Args:
      costs: the layers' costs and bytes.
      config: the options.
      num_devices: P.
      rows: B, rows per micro-batch.
      unsplittable: layers a fractional cut must not split.

    Raises:
      ValueError: for a partition that does not fit the layers and stages,
        or (``"auto"``) when no plan fits ``max_memory_per_device``.
    """
    costs = in_seconds(costs, config.calibration)
    common = dict(
        forward=costs.forward, backward=costs.backward, num_devices=num_devices,
        num_microbatches=config.num_microbatches, rows=rows, param_bytes=list(costs.param_bytes),
        message_bytes=costs.message_bytes, residual_bytes=list(costs.residual_bytes),
        calibration=config.calibration, boundary_bytes=list(costs.boundary_bytes) or None,
        piece_scale=costs.piece_scale,
    )
    names, unsplittable = costs.layer_names, tuple(unsplittable)
    if config.schedule == "auto":
        plan = make_plan(
            **common, layer_names=names, unsplittable=unsplittable,
            max_memory_per_device=config.max_memory_per_device, unit=costs.unit, remat=config.remat,
        )
        c = plan.chosen
        return Choice(plan, c.stages, c.schedule, c.virtual_stages, c.cut, bool(c.remat), _sizes(c.stages, rows))
    total, num_layers = costs.forward + costs.backward, len(costs.forward)
    virtual_stages = config.virtual_stages
    if config.cut == "fractional":
        splittable = [i not in unsplittable for i in range(num_layers)]
        def step_time(stages):
            return predict(stages, config.schedule, virtual_stages, "fractional", **common, max_memory=None,
                           remat=bool(config.remat)).step_time

        descend = config.calibration is not None or costs.piece_scale is not None
        stages = balanced_stages(total, virtual_stages * num_devices, rows, splittable, step_time if descend else None)
    else:
        counts = config.partition if config.partition is not None else partition_layers(total, virtual_stages * num_devices)
        stages = pieces_from_counts(check_partition(counts, num_layers, num_devices, virtual_stages), rows)
    remat = bool(config.remat)
    plan = describe_plan(
        stages, config.schedule, virtual_stages, config.cut, layer_names=names, unsplittable=unsplittable,
        unit=costs.unit, max_memory=config.max_memory_per_device, remat=remat, **common,
    )
    return Choice(plan, tuple(stages), config.schedule, virtual_stages, config.cut, remat, _sizes(stages, rows))


def _sizes(stages: Sequence[Sequence[Any]], rows: int) -> tuple:
    """Layers per stage; a stage holding part of a layer's rows counts its share of rows."""
    return tuple(
        round(sum((p.stop - p.start) / rows for p in stage), 4)
        if any(p.stop - p.start < rows for p in stage) else len(stage)
        for stage in stages
    )


def place(traced: Traced, choice: Choice, config: PipelineConfig, loss_fn: Callable, num_devices: int) -> Placed:
    """Places the chosen stages on the pipe devices (``placement.place_stages``).

    When the last layer is split, each piece's device takes the loss of its
    rows (never shipping logits), if ``loss_fn`` is a mean over rows (probed).
    """
    rows = traced.microbatch_rows
    last_pieces = [p for stage in choice.stages for p in stage if p.layer == len(traced.specs) - 1]
    split_loss = len(last_pieces) > 1 and loss_is_row_mean(
        loss_fn, traced.outputs, jax.tree.map(lambda a: np.asarray(a)[:rows], traced.targets),
        [(p.start, p.stop) for p in last_pieces],
    )
    placement = place_stages(
        choice.stages, num_devices, config.num_microbatches, traced.specs, traced.params, traced.param_dtype,
        traced.structs, traced.x_mb, split_loss=split_loss,
    )
    return Placed(placement, split_loss)


def build_step(
    placed: Placed, choice: Choice, config: PipelineConfig, loss_fn: Callable,
    optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, skip_idle: bool = True,
) -> Step:
    """The step's functions: the executor's ``value_and_grad`` and the optimizer update.

    ``executor="table"``: the schedule table, packed into ticks, run by
    ``executor.scheduled_loss_and_grad``. ``"autodiff"``: ``jax.value_and_grad``
    of the GPipe forward scan, split-layer copies merged after it. The
    optimizer runs per device, or on the whole tree when it couples layers of
    different devices (``LayerOptimizer.build`` decides).
    """
    placement = placed.placement
    table = ticks = buffers = None
    if config.executor == "autodiff":
        loss = autodiff_gpipe_loss(
            placement, mesh, loss_fn, remat=choice.remat, skip_idle=skip_idle,
            compute_dtype=config.compute_dtype, seed=config.seed,
        )
        merge = merge_copies(placement, mesh)

        def value_and_grad(*args):
            value, grads = jax.value_and_grad(loss)(*args)
            return value, merge(grads)
    else:
        table = make_schedule(
            choice.schedule, len(placement.device_copies), config.num_microbatches, choice.virtual_stages, fused=True
        )
        ticks = pack(table)
        buffers = tick_buffers(ticks)
        value_and_grad = scheduled_loss_and_grad(
            placement, ticks, buffers, mesh, loss_fn, remat=choice.remat,
            compute_dtype=config.compute_dtype, seed=config.seed,
        )
    layer_opt = LayerOptimizer.build(optimizer, placement)
    if layer_opt.per_device:
        update = local_updates(layer_opt, mesh)
    else:
        sync = sync_copies(placement, mesh)
        whole = whole_tree_update(layer_opt)

        def update(grads, opt_state, weights):
            weights, opt_state, norm = whole(grads, opt_state, weights)
            return sync(weights), opt_state, norm
    return Step(value_and_grad, update, layer_opt, table, ticks, buffers)


def loss_is_row_mean(loss_fn: Callable, outputs: Any, targets: Any, blocks: Sequence[tuple[int, int]]) -> bool:
    """Whether ``loss_fn`` of a micro-batch equals its row blocks' losses weighted by their share of rows.

    Probed on random outputs (the model output's shapes) and real targets.
    """
    rows = jax.tree.leaves(targets)[0].shape[0]
    rng = np.random.default_rng(0)
    out = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32) if jnp.issubdtype(s.dtype, jnp.floating)
        else np.zeros(s.shape, s.dtype), outputs)
    cut = lambda tree, r0, r1: jax.tree.map(lambda a: a[r0:r1], tree)  # noqa: E731
    try:
        whole = float(loss_fn(out, targets))
        parts = sum(float(loss_fn(cut(out, r0, r1), cut(targets, r0, r1))) * (r1 - r0) / rows for r0, r1 in blocks)
    except Exception:  # noqa: BLE001 - a loss that fails on row blocks cannot be split
        return False
    return bool(np.isfinite(whole) and abs(whole - parts) <= 1e-5 * max(1.0, abs(whole)))
