"""``Pipeline``: a model placed on a ``(data, pipe)`` mesh, with a jitted step.

This is the lower-level API: build one, ``init`` a state, then call
``train_step`` in your own loop (``jaxpipe.train`` does exactly that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from . import distributed
from .batches import place_batch
from .build import (
    build_step,
    check_optimizer,
    choose_stages,
    cost_model,
    place,
    trace_model,
    unsplittable_layers,
)
from .config import PipelineConfig
from .evaluate import check_deterministic, forward_loss
from .guards import batch_rows, check_batch, check_batch_like, check_state_like
from .layers import cast_floats, merge_layers
from .mesh import DATA_AXIS, PIPE_AXIS, make_mesh
from .optimizer import OptState, local_init


class TrainState(NamedTuple):
    """Training state, all on device.

    Attributes:
      params: the parameter stacks (``[K]`` arrays ``[P, *shape]`` sharded
        over ``pipe``, ``stacks.py``); ``Pipeline.from_stacks`` gives per-layer trees.
      opt_state: the optimizer state of the per-layer tree, held the same way
        (``optimizer.OptState``); ``Pipeline.to_layers`` gives optax's tree.
      step: number of optimizer steps taken.
    """

    params: tuple
    opt_state: OptState
    step: jax.Array


class Pipeline:
    """A model's layers placed on a ``(data, pipe)`` mesh, ready to train.

    The step loss is the mean of ``loss_fn`` over all ``D * M`` micro-batches
    of a global batch, and its gradient is exact: for the same seed and data,
    every mesh gives the losses and parameters of plain single-device training
    (``mesh_shape=(1, 1)``) up to float rounding.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``, the layers in order.
      mesh_shape: ``(D, P)``: data replicas and pipe devices per replica.
      loss_fn: ``(outputs, targets) -> []``, the mean loss over one
        micro-batch's rows.
      optimizer: an optax transformation, applied exactly as to the
        per-layer parameter tree ``model_fn`` builds (a list of one
        ``nnx.State`` per layer, natural shapes; a parameter layers share,
        weight tying, appears once, in the first layer that reaches it, and
        its gradient is the sum over its uses): masks, adafactor, LAMB, Muon,
        ``MultiSteps`` and ``clip_by_global_norm`` give single-device results.
        Each device updates its own layers, unless the transformation couples
        layers of different devices (``clip_by_global_norm``): then one
        program updates the whole tree (``self.optimizer_mode``).
      num_microbatches: M, micro-batches per data replica per step.
      example_batch: ``(inputs, targets)``, one global batch (``[R, ...]``
        leaves): fixes the shapes the pipeline is compiled for.
      config: a ``PipelineConfig`` holding every build option (schedule,
        cut, virtual stages, costs, executor, remat, dtypes, seed...); then
        ``num_microbatches`` may be ``None``, and options given beside it
        must agree with it.
      devices: devices for the mesh; default ``jax.devices()``.
      **options: ``PipelineConfig`` fields as keywords (``schedule="1f1b"``,
        ``cut=``, ``partition=``, ``remat=``, ...), documented there.

    Attributes:
      config: the ``PipelineConfig`` built from the options.
      plan: the ``Plan`` run: per device its layers, loads, memory, the
        prediction and, for ``"auto"``, why it was chosen.
      layer_costs: what the cuts and the planner know of each layer
        (``build.LayerCosts``: costs, unit, parameter, residual and message bytes).
      schedule, cut, virtual_stages: the order, cut and V run (the planner's
        for ``"auto"``; ``"balanced"`` runs ``"1f1b"`` with fractional cuts).
      stages: ``[V * P]`` tuples of ``Piece``; ``partition`` their sizes.
      placement: the ``Placement`` (parameter copies, stacks, boundaries).
      table, ticks, buffers: the schedule table, its packed ticks and their
        buffer slots (``None`` with ``executor="autodiff"``).
      optimizer_mode: ``"per device"`` or ``"whole tree"``.

    Raises:
      ValueError: for a mesh larger than the device count, a batch whose rows
        do not divide by ``D * M``, fewer layers than pipe devices with integer
        cuts (or than stages with ``"interleaved"``), micro-batches with too
        few rows to give every device a piece with fractional cuts, a layer
        that fails on its input, an activation crossing pipe devices with a
        leaf that does not have the rows first, a ``loss_fn`` that fails or
        returns no scalar, or a bad partition.
      TypeError: for wrongly typed arguments or layers.
    """

    def __init__(
        self,
        model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]],
        mesh_shape: Sequence[int],
        loss_fn: Callable[[Any, Any], jax.Array],
        optimizer: optax.GradientTransformation,
        num_microbatches: int | None,
        example_batch: tuple[Any, Any],
        *,
        config: PipelineConfig | None = None,
        devices: Sequence[jax.Device] | None = None,
        _skip_idle: bool = True,
        **options: Any,
    ):
        for name, fn in (("model_fn", model_fn), ("loss_fn", loss_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if num_microbatches is not None or config is None:
            options["num_microbatches"] = num_microbatches
        self.config = config = PipelineConfig.from_options(config, **options)
        distributed.auto_initialize()
        self.optimizer = check_optimizer(optimizer)
        self.mesh = make_mesh(mesh_shape, devices)
        self.num_replicas, self.num_devices = self.mesh.devices.shape
        traced = trace_model(model_fn, loss_fn, example_batch, config, self.num_replicas, self.num_devices)
        self.unsplittable = unsplittable_layers(traced, config)
        self.layer_costs = cost_model(traced, config)
        choice = choose_stages(self.layer_costs, config, self.num_devices, traced.microbatch_rows, self.unsplittable)
        placed = place(traced, choice, config, loss_fn, self.num_devices)
        step = build_step(placed, choice, config, loss_fn, self.optimizer, self.mesh, _skip_idle)

        self.num_microbatches, self.seed, self.executor = config.num_microbatches, config.seed, config.executor
        self.param_dtype, self.compute_dtype = traced.param_dtype, config.compute_dtype
        self.microbatch_rows, self._signature = traced.microbatch_rows, traced.signature
        self._graph, self._host_params, self._structs = traced.graph, list(traced.params), traced.structs
        self.plan, self.stages, self.partition = choice.plan, choice.stages, choice.partition
        self.schedule, self.cut, self.virtual_stages = choice.schedule, choice.cut, choice.virtual_stages
        self.placement, self.split_loss = placed.placement, placed.split_loss
        self.table, self.ticks, self.buffers = step.table, step.ticks, step.buffers
        self._value_and_grad, self._update, self._layer_opt = step.value_and_grad, step.update, step.layer_optimizer
        self.optimizer_mode = "per device" if self._layer_opt.per_device else "whole tree"
        self._param_sharding = NamedSharding(self.mesh, PartitionSpec(PIPE_AXIS))
        self._data_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._loss_fn = loss_fn
        self._evaluate = None
        self._loss_and_grad = jax.jit(self._value_and_grad)
        self._step = jax.jit(self._train_step, donate_argnums=0)

    def _train_step(
        self, state: TrainState, inputs: Any, targets: Any
    ) -> tuple[TrainState, jax.Array, jax.Array]:
        loss, grads = self._value_and_grad(state.params, inputs, targets, state.step)
        params, opt_state, grad_norm = self._update(grads, state.opt_state, state.params)
        # A non-finite loss or gradient leaves the state as it was, so the
        # caller still holds the last good state (the input is donated).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(params, opt_state, state.step + 1)
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), loss, grad_norm

    def init(self) -> TrainState:
        """The initial state: ``model_fn``'s parameters, in stacks on their devices.

        Returns:
          A ``TrainState`` with step 0.
        """
        own = [spec.own(tree) for spec, tree in zip(self.placement.specs, self._host_params)]
        params = self.to_stacks(own)
        if self._layer_opt.per_device:
            opt_state = jax.jit(local_init(self._layer_opt, self.mesh))(params)
        else:
            opt_state = self._place_opt_state(*self._layer_opt.from_tree(self.optimizer.init(own)))
        step = jax.device_put(jnp.zeros((), jnp.int32), self._replicated)
        return TrainState(params, opt_state, step)

    def shard_batch(self, batch: tuple[Any, Any], per_process: bool = False) -> tuple[Any, Any]:
        """Places a batch on the mesh as global ``[D, M, B, ...]`` leaves.

        Args:
          batch: ``(inputs, targets)`` with ``[R, ...]`` leaves, the global
            batch; with ``per_process`` only this process's rows
            (``jaxpipe.data_shard``: global rows ``[i * R / n, (i + 1) * R / n)``
            for block ``i`` of ``n``), which no other host then needs.
          per_process: whether ``batch`` holds this process's rows only.

        Returns:
          ``(inputs, targets)`` with ``[D, M, B, ...]`` leaves sharded over ``data``.

        Raises:
          ValueError: if the rows, a leaf's shape or dtype, or the structure
            differ from the example batch's (or from this process's share of
            its rows).
        """
        inputs, targets = check_batch(batch)
        layout = (self.num_replicas, self.num_microbatches, self.microbatch_rows)
        rows = batch_rows(inputs, targets, self.num_replicas, self.num_microbatches)
        if not per_process and rows != math.prod(layout):
            raise ValueError(
                f"this pipeline was built for global batches of {math.prod(layout)} rows, got {rows}"
            )
        check_batch_like(self._signature, inputs, targets, (rows,))
        return place_batch((inputs, targets), self._data_sharding, layout, per_process)

    def train_step(self, state: TrainState, batch: tuple[Any, Any]) -> tuple[TrainState, jax.Array]:
        """One optimizer step on a global batch. ``state`` is donated.

        Args:
          state: the current state (its buffers are reused for the result).
          batch: ``(inputs, targets)``, ``[R, ...]`` leaves, or already placed
            by ``shard_batch``.

        Returns:
          ``(new_state, loss)`` with ``loss`` the step's mean training loss.
          If the loss or the gradient is not finite, ``new_state`` equals
          ``state`` (the update is skipped); check ``loss``.
        """
        state, loss, _ = self.train_step_stats(state, batch)
        return state, loss

    def loss_and_grad(self, params: tuple, batch: tuple[Any, Any], step: Any = 0) -> tuple[jax.Array, tuple]:
        """The mean loss of a global batch and its gradient.

        Args:
          params: the parameter stacks (``state.params``).
          batch: ``(inputs, targets)``, ``[R, ...]`` leaves or placed ones.
          step: the step whose random keys layers with RNG streams draw
            from (``train_step`` uses ``state.step``); no effect otherwise.

        Returns:
          ``(loss [], grads)``, ``grads`` in stacks like ``params`` (a split
          layer's gradient summed into its owner copy, a tied parameter's
          into its owner layer's leaf); ``unpack(grads)`` gives per-layer
          trees.
        """
        check_state_like(self._state_struct().params, params, "params")
        return self._loss_and_grad(params, *self._placed(batch), step)

    def evaluate(self, params: tuple, batch: tuple[Any, Any]) -> jax.Array:
        """The mean loss of a global batch, forwards only, every layer in evaluation mode.

        Runs each stage's forward in GPipe order (``evaluate.py``) with
        ``layer.eval()`` semantics (dropout off); nothing is kept for a
        backward. Equals ``loss_and_grad``'s loss for a model without
        dropout.

        Args:
          params: the parameter stacks (``state.params``).
          batch: ``(inputs, targets)``, ``[R, ...]`` leaves or placed ones.

        Returns:
          The loss ``[]``.

        Raises:
          ValueError: if a layer still uses its RNG streams in evaluation mode.
        """
        check_state_like(self._state_struct().params, params, "params")
        if self._evaluate is None:
            run_params = cast_floats(self._host_params, self.compute_dtype)
            check_deterministic(self.placement, run_params, self._structs)
            self._evaluate = jax.jit(forward_loss(self.placement, self.mesh, self._loss_fn, self.compute_dtype))
        return self._evaluate(params, *self._placed(batch))

    def _state_struct(self) -> TrainState:
        """This pipeline's state as shape structs, from the layouts (``init`` is not traced)."""
        layer_opt = self._layer_opt
        shared = [layer_opt.structs[i] for i, s in enumerate(layer_opt.shared) if s >= 0]
        return TrainState(
            self.placement.stacks.zeros(),
            OptState(layer_opt.layout.zeros(), tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shared)),
            jax.ShapeDtypeStruct((), jnp.int32),
        )

    def _placed(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        leaves = jax.tree.leaves(batch)
        lead = (self.num_replicas, self.num_microbatches, self.microbatch_rows)
        if leaves and all(
            isinstance(a, jax.Array) and a.sharding == self._data_sharding and a.shape[:3] == lead
            and a.ndim == want.ndim + 3 for a, want in zip(leaves, jax.tree.leaves(self._signature))
        ):
            inputs, targets = check_batch(batch)
            check_batch_like(self._signature, inputs, targets, lead)
            return batch
        return self.shard_batch(batch)

    def from_stacks(self, stacks: tuple) -> list[nnx.State]:
        """Per-layer ``nnx.State`` trees from parameter or gradient stacks.

        A layer split between devices is read from its owner copy. A
        parameter several layers share (weight tying, ``layers.find_ties``)
        is given once, in the first layer that reaches it, and left out of
        the later ones, as ``nnx.split`` of the whole layer list gives it:
        the tree the optimizer sees; its gradient is the sum over its uses.
        """
        return self.placement.from_stacks([_host(a) for a in stacks])

    def layers(self, params: tuple) -> list[nnx.Module]:
        """The layers with the given parameters, as ``model_fn`` returns them.

        Objects the layers shared (a tied parameter, sub-module or layer) are
        shared again (``layers.merge_layers``).
        """
        return merge_layers(self._graph, self.from_stacks(params))

    def train_step_stats(
        self, state: TrainState, batch: tuple[Any, Any]
    ) -> tuple[TrainState, jax.Array, jax.Array]:
        """``train_step`` that also returns the gradient's global norm. ``state`` is donated.

        Args:
          state: the current state (its buffers are reused for the result).
          batch: ``(inputs, targets)``, ``[R, ...]`` leaves, or placed ones.

        Returns:
          ``(new_state, loss, grad_norm)``. If ``loss`` or ``grad_norm`` is
          not finite the update is skipped: ``new_state`` equals ``state``.

        Raises:
          ValueError: if ``state`` was already donated to an earlier step or
            is not a state of this pipeline, or for a batch unlike the
            example batch.
        """
        check_state_like(self._state_struct(), state, "state")
        inputs, targets = self._placed(batch)
        return self._step(state, inputs, targets)

    def to_stacks(self, trees: Sequence[Any], dtype: Any = None) -> tuple:
        """Parameter stacks, placed on the mesh, from per-layer trees.

        The inverse of ``unpack``: every copy of a layer split between
        devices is filled from the layer's tree, every tied leaf from its
        owner layer's.

        Args:
          trees: ``[L]`` per-layer trees (``nnx.State`` or anything whose
            leaves come in the layer's parameter order), as ``unpack`` gives
            (a shared parameter only in the first layer that reaches it).
          dtype: the stacks' dtype; default the parameters' dtype.

        Returns:
          ``[K]`` arrays ``[P, *shape]`` sharded over ``pipe``.

        Raises:
          ValueError: if the number of layers or a leaf's shape differs.
        """
        return tuple(jax.device_put(a, self._param_sharding) for a in self.placement.to_stacks(trees, dtype))

    def _place_opt_state(self, stacks: Sequence[np.ndarray], shared: Sequence[np.ndarray]) -> OptState:
        return OptState(
            tuple(jax.device_put(a, self._param_sharding) for a in stacks),
            tuple(jax.device_put(a, self._replicated) for a in shared),
        )

    def to_layers(self, state: TrainState) -> tuple[list[Any], Any, int]:
        """A state in per-layer form, independent of mesh, schedule and cut.

        Args:
          state: a ``TrainState`` of this pipeline.

        Returns:
          ``(params, opt_state, step)``: ``params`` as ``unpack`` gives;
          ``opt_state`` the optimizer's state of the per-layer tree (what
          ``optimizer.init(params)`` builds), as NumPy arrays; ``step`` an int.
        """
        opt_state = OptState(tuple(_host(a) for a in state.opt_state.stacks),
                             tuple(_host(a) for a in state.opt_state.shared))
        return self.from_stacks(state.params), self._layer_opt.to_tree(opt_state), int(_host(state.step))

    def from_layers(self, params: Sequence[Any], opt_state: Any, step: int) -> TrainState:
        """The inverse of ``to_layers``: places a per-layer state on this mesh.

        Args:
          params: ``[L]`` per-layer parameter trees.
          opt_state: the optimizer's state of the per-layer tree.
          step: the step count.

        Returns:
          A ``TrainState`` laid out for this pipeline.

        Raises:
          ValueError: if a shape or the state's structure differs from this pipeline's.
        """
        stacks = self.to_stacks(params)
        opt_state = self._place_opt_state(*self._layer_opt.from_tree(opt_state))
        step = jax.device_put(jnp.asarray(step, jnp.int32), self._replicated)
        return TrainState(stacks, opt_state, step)

    def optimizer_state_structs(self) -> Any:
        """The optimizer state of the per-layer tree, as shape structs."""
        return jax.tree.unflatten(self._layer_opt.treedef, list(self._layer_opt.structs))


def _host(leaf: Any) -> np.ndarray:
    """A NumPy copy of ``leaf``, gathering the parts other processes hold."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))
