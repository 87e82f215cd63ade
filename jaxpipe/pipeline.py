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
from .autodiff import autodiff_gpipe_loss
from .costs import layer_costs
from .batches import place_batch
from .evaluate import check_deterministic, forward_loss
from .executor import scheduled_loss_and_grad
from .guards import batch_signature, check_batch_like, check_state_like
from .mesh import DATA_AXIS, PIPE_AXIS, make_mesh
from .partition import (
    check_layer_ids,
    check_partition,
    fractional_partition,
    partition_layers,
    pieces_from_counts,
)
from .optimizer import LayerOptimizer, OptState, local_init, local_updates, whole_tree_update
from .placement import merge_copies, place_stages, sync_copies
from .rng import draws
from .planner import describe_plan, make_plan
from .row_mixing import mixing_layers
from .schedule import SCHEDULE_NAMES, make_schedule
from .layers import cast_floats, check_float_dtype, loss_precision, merge_layers, model_graph, split_layers
from .tracing import largest_activation_bytes, residual_bytes, trace_boundaries
from .ticks import pack, tick_buffers

SCHEDULES = SCHEDULE_NAMES + ("balanced", "auto")


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


def check_rows(tree: Any, what: str) -> int:
    """The common leading dimension (rows) of a batch pytree, or a ValueError."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{what} is empty; give an array or a pytree of arrays")
    rows = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(rows) != 1 or None in rows:
        shapes = jax.tree.map(np.shape, tree)
        raise ValueError(
            f"every array in {what} must have the same leading dimension (rows), "
            f"got shapes {shapes}"
        )
    return rows.pop()


def _check_batch(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "each batch must be a pair (inputs, targets) of arrays or pytrees of "
            f"arrays, got {type(batch).__name__}"
        )
    return batch[0], batch[1]


def _check_options(seed: Any, remat: Any, max_memory_per_device: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if remat is not None and not isinstance(remat, (bool, np.bool_)):
        raise TypeError(f"remat must be True, False or None, got {remat!r}")
    if max_memory_per_device is not None:
        if isinstance(max_memory_per_device, bool) or not isinstance(max_memory_per_device, (int, float, np.number)):
            raise TypeError(f"max_memory_per_device must be a number of bytes, got {max_memory_per_device!r}")
        if not np.isfinite(max_memory_per_device) or max_memory_per_device <= 0:
            raise ValueError(f"max_memory_per_device must be a positive number of bytes, got {max_memory_per_device!r}")


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
      schedule: the order of work, a table from ``schedule.py``:
        ``"gpipe"`` (Huang et al. 2019), ``"1f1b"`` (PipeDream-Flush,
        Narayanan et al. 2021), ``"interleaved"`` (Megatron-LM interleaved
        1F1B, needs M a multiple of P), ``"zb_h1"`` (zero-bubble 1F1B, Qi et
        al. 2024: each stage's backward runs as B, the input gradient, and
        W, the weight gradient, split from one trace; Ws fill the cool-down,
        ``split_backward.py``), ``"balanced"`` (``"1f1b"`` with
        ``cut="fractional"``), or ``"auto"`` (the planner predicts every cut,
        order and V and picks the fastest; see ``self.plan``).
      virtual_stages: V, chunks per device for ``"interleaved"``.
      cut: ``"integer"``: whole layers per stage, cut to minimise the
        largest stage's cost. ``"fractional"``: every stage gets the same
        cost; a layer straddling a cut is split by micro-batch rows between
        neighbouring devices (each holds a copy of its parameters), so a
        heavy layer may span several devices and the model may have fewer
        layers than pipe devices.
      partition: ``[V * P]`` layers per stage for ``cut="integer"``.
      costs: per-layer costs for the cuts and the planner: a ``Profile``
        (measured seconds), ``[L]`` numbers, or ``None`` for XLA's
        forward+backward flop estimate.
      unsplittable: layers a fractional cut must not split (layers whose
        outputs mix rows are found and added automatically).
      max_memory_per_device: bytes; ``"auto"`` only picks plans predicted to
        fit.
      executor: ``"table"`` (default): the schedule-table executor; each
        tick a device runs up to one forward and one backward (``ticks.py``),
        and a stage's forward saves its residuals for its backward.
        ``"autodiff"`` (GPipe only): the forward scan differentiated by JAX.
      remat: rematerialise: store only each stage's input and recompute its
        forward in the backward (less memory, one more forward per
        micro-batch). Default False for both executors.
      param_dtype: dtype of the master parameters, their gradients and the
        optimizer state (the parameter and state stacks); default the layers'
        own parameter dtype.
      compute_dtype: dtype the layers compute in, e.g. ``jnp.bfloat16``
        (mixed precision); default ``None``: no casts. Each stage casts its
        layers' parameters and every layer's float inputs to it, so the
        activations sent between pipe devices (and their gradients) and the
        saved residuals are in it, even after a layer that computes in its
        own dtype (flax's ``dtype=``; ``nnx.Embed`` keeps its build-time
        dtype). Each micro-batch's parameter gradient is cast back and
        accumulated in ``param_dtype``. The model output's float leaves
        narrower than float32 are widened to float32 before ``loss_fn``
        (targets are not cast). No loss scaling: use ``bfloat16`` (float32's
        exponent range); ``float16`` gradients may underflow.
      seed: seed of the ``nnx.Rngs`` given to ``model_fn``.
      devices: devices for the mesh; default ``jax.devices()``.

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
        num_microbatches: int,
        example_batch: tuple[Any, Any],
        *,
        schedule: str = "gpipe",
        virtual_stages: int = 1,
        cut: str = "integer",
        partition: Sequence[int] | None = None,
        costs: Any = None,
        unsplittable: Sequence[int] = (),
        max_memory_per_device: float | None = None,
        executor: str = "table",
        remat: bool | None = None,
        param_dtype: Any = None,
        compute_dtype: Any = None,
        seed: int = 0,
        devices: Sequence[jax.Device] | None = None,
        _skip_idle: bool = True,
    ):
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        _check_options(seed, remat, max_memory_per_device)
        distributed.auto_initialize()
        if isinstance(optimizer, optax.MultiSteps):
            optimizer = optimizer.gradient_transformation()
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
            )
        if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, (int, np.integer)):
            raise TypeError(f"num_microbatches must be an int, got {num_microbatches!r}")
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
        if cut not in ("integer", "fractional"):
            raise ValueError(f"cut={cut!r} is not one of ('integer', 'fractional')")
        if schedule == "balanced":
            schedule, cut = "1f1b", "fractional"
        if cut == "fractional" and executor == "autodiff":
            raise ValueError("cut='fractional' (schedule='balanced') needs executor='table'")
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, (int, np.integer)):
            raise TypeError(f"virtual_stages must be an int, got {virtual_stages!r}")
        if virtual_stages < 1 or (virtual_stages > 1 and schedule != "interleaved"):
            raise ValueError(
                f"virtual_stages={virtual_stages} with schedule={schedule!r}: use "
                "virtual_stages >= 1, and more than 1 only with schedule='interleaved'"
            )
        if executor not in ("table", "autodiff"):
            raise ValueError(f"executor={executor!r} is not one of ('table', 'autodiff')")
        if executor == "autodiff" and schedule != "gpipe":
            raise ValueError(
                f"executor='autodiff' runs GPipe only, got schedule={schedule!r}; "
                "use executor='table' for it"
            )
        param_dtype = check_float_dtype(param_dtype, "param_dtype")
        self.compute_dtype = check_float_dtype(compute_dtype, "compute_dtype")
        self.mesh = make_mesh(mesh_shape, devices)
        self.num_replicas, self.num_devices = self.mesh.devices.shape
        self.num_microbatches = int(num_microbatches)
        self.virtual_stages = int(virtual_stages)
        self.plan = None
        self.optimizer = optimizer
        self.seed = seed

        layers = model_fn(nnx.Rngs(seed))
        specs, layer_params, layer_dtype = split_layers(layers)
        self._graph = model_graph(layers)
        self.param_dtype = dtype = layer_dtype if param_dtype is None else param_dtype
        # Master parameters in param_dtype; the boundaries are traced with
        # the executors' compute_dtype casts, so the carrier gets that dtype.
        params = cast_floats(layer_params, dtype)
        run_params = cast_floats(params, self.compute_dtype)
        if len(specs) < self.num_devices and cut == "integer" and schedule != "auto":
            # Fractional cuts (and "auto", which then plans only those) give
            # each device rows of some layer instead.
            raise ValueError(
                f"the model has {len(specs)} layers but mesh_shape={tuple(mesh_shape)} "
                f"has {self.num_devices} pipe devices; every pipe device needs at least "
                f"one layer, so use pipe <= {len(specs)}, or cut='fractional' "
                "(schedule='balanced') to split layers by rows"
            )
        if self.virtual_stages > 1 and len(specs) < self.virtual_stages * self.num_devices:
            raise ValueError(
                f"schedule='interleaved' with virtual_stages={self.virtual_stages} on "
                f"{self.num_devices} pipe devices needs at least "
                f"{self.virtual_stages * self.num_devices} layers (V * P, one per stage), "
                f"but the model has {len(specs)}; lower virtual_stages to at most "
                f"{len(specs) // self.num_devices}"
            )
        inputs, targets = _check_batch(example_batch)
        rows = self._check_rows(inputs, targets)
        self.microbatch_rows = rows // (self.num_replicas * self.num_microbatches)
        self._signature = batch_signature(inputs, targets)
        x_mb, y_mb = (
            jax.tree.map(lambda a: jax.ShapeDtypeStruct((self.microbatch_rows,) + np.shape(a)[1:], a.dtype), t)
            for t in (inputs, targets)
        )
        structs = trace_boundaries(specs, run_params, x_mb, self.compute_dtype)
        outputs = structs[-1] if self.compute_dtype is None else loss_precision(structs[-1])
        self._check_loss(loss_fn, outputs, y_mb)

        # Cuts balance forward + backward: in a packed 1F1B steady state every
        # device runs one forward and one backward per tick, so these loads
        # set the lock-step tick length.
        forward, backward, unit = layer_costs(costs, specs, run_params, structs)
        if jax.process_count() > 1:
            # Measured costs differ between processes; every process must cut
            # (and so pack) the same way: all take process 0's.
            forward, backward = (
                np.asarray(a, np.float64)
                for a in multihost_utils.broadcast_one_to_all((forward.astype(np.float32), backward.astype(np.float32)))
            )
        if cut == "fractional" or schedule == "auto":
            if partition is not None:
                raise ValueError(
                    f"schedule={schedule!r} computes its own cut; drop "
                    f"partition={partition!r}, or use cut='integer' with it"
                )
            # Whether rows mix is the layer's property: tested in its own
            # dtype, where rows computed apart agree to float32 rounding.
            mixing = set(mixing_layers(specs, layer_params, inputs, self.microbatch_rows))
        else:
            mixing = set()
        # A layer that draws random numbers is never split (rng.py): a piece cannot draw its rows' share.
        random = {
            i for i, (spec, p) in enumerate(zip(specs, run_params))
            if spec.streams and draws(spec, p, structs[i], deterministic=False)
        }
        self.unsplittable = tuple(sorted(set(check_layer_ids(unsplittable, len(specs))) | mixing | random))
        common = dict(
            forward=forward, backward=backward, num_devices=self.num_devices,
            num_microbatches=self.num_microbatches, rows=self.microbatch_rows,
            param_bytes=[spec.size * jnp.dtype(dtype).itemsize for spec in specs],
            message_bytes=largest_activation_bytes(structs), max_memory=max_memory_per_device,
            residual_bytes=residual_bytes(specs, run_params, structs), remat=remat,
        )
        names = [spec.name for spec in specs]
        if schedule == "auto":
            self.plan = make_plan(
                **{k: v for k, v in common.items() if k != "max_memory"}, layer_names=names,
                unsplittable=self.unsplittable, max_memory_per_device=max_memory_per_device, unit=unit,
            )
            schedule, self.virtual_stages = self.plan.chosen.schedule, self.plan.chosen.virtual_stages
            cut, remat = self.plan.chosen.cut, self.plan.chosen.remat
            self.stages = self.plan.chosen.stages
        elif cut == "fractional":
            splittable = [i not in self.unsplittable for i in range(len(specs))]
            self.stages = fractional_partition(
                forward + backward, self.virtual_stages * self.num_devices, self.microbatch_rows, splittable
            )
        else:
            if partition is None:
                partition = partition_layers(forward + backward, self.virtual_stages * self.num_devices)
            partition = check_partition(partition, len(specs), self.num_devices, self.virtual_stages)
            self.stages = pieces_from_counts(partition, self.microbatch_rows)
        if schedule != "auto" and self.plan is None:
            common["remat"] = bool(remat)
            self.plan = describe_plan(
                self.stages, schedule, self.virtual_stages, cut, layer_names=names,
                unsplittable=self.unsplittable, unit=unit, **common,
            )
        self.schedule, self.cut = schedule, cut
        self.partition = tuple(
            round(sum((p.stop - p.start) / self.microbatch_rows for p in stage), 4)
            if any(p.stop - p.start < self.microbatch_rows for p in stage) else len(stage)
            for stage in self.stages
        )
        last_pieces = [p for stage in self.stages for p in stage if p.layer == len(specs) - 1]
        # Loss where the rows live: when the last layer is split, each piece's device takes the
        # loss of its rows (never shipping logits), if loss_fn is a mean over rows (probed).
        self.split_loss = len(last_pieces) > 1 and _loss_is_row_mean(
            loss_fn, outputs, jax.tree.map(lambda a: np.asarray(a)[: self.microbatch_rows], targets),
            [(p.start, p.stop) for p in last_pieces],
        )
        self.placement = place_stages(
            self.stages, self.num_devices, self.num_microbatches, specs, params, dtype, structs, x_mb,
            split_loss=self.split_loss,
        )
        self._host_params = list(params)
        self._structs = structs
        self._evaluate = None

        self._param_sharding = NamedSharding(self.mesh, PartitionSpec(PIPE_AXIS))
        self._data_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.executor = executor
        if executor == "autodiff":
            loss = autodiff_gpipe_loss(
                self.placement, self.mesh, loss_fn, remat=bool(remat), skip_idle=_skip_idle,
                compute_dtype=self.compute_dtype, seed=seed,
            )
            merge = merge_copies(self.placement, self.mesh)

            def value_and_grad(*args):
                value, grads = jax.value_and_grad(loss)(*args)
                return value, merge(grads)

            self._value_and_grad = value_and_grad
        else:
            self.table = make_schedule(
                schedule, self.num_devices, self.num_microbatches, self.virtual_stages, fused=True
            )
            self.ticks = pack(self.table)
            self.buffers = tick_buffers(self.ticks)
            self._value_and_grad = scheduled_loss_and_grad(
                self.placement, self.ticks, self.buffers, self.mesh, loss_fn, remat=bool(remat),
                compute_dtype=self.compute_dtype, seed=seed,
            )
        self._layer_opt = LayerOptimizer.build(optimizer, self.placement)
        self.optimizer_mode = "per device" if self._layer_opt.per_device else "whole tree"
        if self._layer_opt.per_device:
            self._update = local_updates(self._layer_opt, self.mesh)
        else:
            sync = sync_copies(self.placement, self.mesh)
            whole = whole_tree_update(self._layer_opt)

            def update(grads, opt_state, weights):
                weights, opt_state, norm = whole(grads, opt_state, weights)
                return sync(weights), opt_state, norm

            self._update = update
        self._loss_fn = loss_fn
        self._loss_and_grad = jax.jit(self._value_and_grad)
        self._step = jax.jit(self._train_step, donate_argnums=0)

    def _check_rows(self, inputs: Any, targets: Any) -> int:
        rows = check_rows(inputs, "inputs")
        if check_rows(targets, "targets") != rows:
            raise ValueError(
                f"inputs have {rows} rows but targets have {check_rows(targets, 'targets')}; "
                "they must match"
            )
        per_step = self.num_replicas * self.num_microbatches
        if rows == 0:
            raise ValueError(
                f"the global batch has 0 rows; give at least data={self.num_replicas} x num_microbatches="
                f"{self.num_microbatches} = {per_step} rows (one per micro-batch), a multiple of {per_step}"
            )
        if rows % per_step:
            raise ValueError(
                f"the global batch has {rows} rows, which does not divide into "
                f"data={self.num_replicas} replicas x num_microbatches="
                f"{self.num_microbatches}; use a batch of a multiple of {per_step} rows"
            )
        return rows

    @staticmethod
    def _check_loss(loss_fn: Callable, outputs: Any, targets: Any) -> None:
        try:
            out = jax.eval_shape(loss_fn, outputs, targets)
        except Exception as err:  # the loss's own error, re-raised with context
            shapes = [jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", t) for t in (outputs, targets)]
            raise ValueError(
                f"loss_fn fails on one micro-batch's model outputs {shapes[0]} and "
                f"targets {shapes[1]}: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(
                "loss_fn must return a float scalar (the mean loss over one "
                f"micro-batch), got {jax.tree.map(lambda a: f'{a.dtype}{list(a.shape)}', out)}"
            )

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
        inputs, targets = _check_batch(batch)
        layout = (self.num_replicas, self.num_microbatches, self.microbatch_rows)
        rows = self._check_rows(inputs, targets)
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
          into its owner layer's leaf); ``from_stacks(grads)`` gives per-layer
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
            inputs, targets = _check_batch(batch)
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

        The inverse of ``from_stacks``: every copy of a layer split between
        devices is filled from the layer's tree, every tied leaf from its
        owner layer's.

        Args:
          trees: ``[L]`` per-layer trees (``nnx.State`` or anything whose
            leaves come in the layer's parameter order), as ``from_stacks`` gives
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
          ``(params, opt_state, step)``: ``params`` as ``from_stacks`` gives;
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


def _loss_is_row_mean(loss_fn: Callable, outputs: Any, targets: Any, blocks: Sequence[tuple[int, int]]) -> bool:
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


def _host(leaf: Any) -> np.ndarray:
    """A NumPy copy of ``leaf``, gathering the parts other processes hold."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))
