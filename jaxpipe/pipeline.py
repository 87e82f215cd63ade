"""``Pipeline``: a model placed on a ``(data, pipe)`` mesh, with a jitted step.

This is the lower-level API: build one, ``init`` a state, then call
``train_step`` in your own loop (``jaxpipe.train`` does exactly that).
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
from jax.sharding import NamedSharding, PartitionSpec

from .autodiff import autodiff_gpipe_loss
from .executor import scheduled_loss_and_grad
from .guards import batch_signature, check_batch_like, check_state_like
from .mesh import DATA_AXIS, PIPE_AXIS, make_mesh
from .partition import (
    check_layer_ids,
    check_partition,
    fractional_partition,
    layer_costs,
    partition_layers,
    pieces_from_counts,
)
from .placement import place_stages, sync_copies
from .planner import describe_plan, make_plan
from .row_mixing import mixing_layers
from .schedule import SCHEDULE_NAMES, make_schedule
from .stages import (
    cast_floats,
    check_float_dtype,
    largest_activation_bytes,
    loss_precision,
    residual_bytes,
    split_layers,
    trace_boundaries,
)
from .ticks import pack, tick_buffers

SCHEDULES = SCHEDULE_NAMES + ("balanced", "auto")


class TrainState(NamedTuple):
    """Training state, all on device.

    Attributes:
      params: ``[P, N]`` packed parameters, sharded over ``pipe``.
      opt_state: the optax state of ``params``.
      step: number of optimizer steps taken.
    """

    params: jax.Array
    opt_state: Any
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
      optimizer: an optax transformation. It sees each pipe device's
        parameters as one flat vector (``[P, N]``), which is exact for
        element-wise optimizers and global-norm clipping (sgd, momentum, adam,
        adamw, lion, rmsprop, ``clip_by_global_norm``...), not for optimizers
        that look at leaf shapes or names (adafactor's factoring, masks, LAMB).
      num_microbatches: M, micro-batches per data replica per step.
      example_batch: ``(inputs, targets)``, one global batch (``[R, ...]``
        leaves): fixes the shapes the pipeline is compiled for.
      schedule: the order of work, a table from ``schedule.py``:
        ``"gpipe"`` (Huang et al. 2019), ``"1f1b"`` (PipeDream-Flush,
        Narayanan et al. 2021), ``"interleaved"`` (Megatron-LM interleaved
        1F1B, needs M a multiple of P), ``"balanced"`` (``"1f1b"`` with
        ``cut="fractional"``), or ``"auto"`` (the planner predicts every cut,
        order and V and picks the fastest; see ``self.plan``).
      virtual_stages: V, chunks per device for ``"interleaved"``.
      cut: ``"integer"``: whole layers per stage, cut to minimise the
        largest stage's cost. ``"fractional"``: every stage gets the same
        cost; a layer straddling a cut is split by micro-batch rows between
        neighbouring devices (each holds a copy of its parameters).
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
        optimizer state (the packed ``[P, N]`` buffers); default the layers'
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
        do not divide by ``D * M``, fewer layers than pipe devices, a layer
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
        self.num_chunks = int(virtual_stages)
        self.plan = None
        self.optimizer = optimizer
        self.seed = seed

        specs, layer_params, layer_dtype = split_layers(model_fn(nnx.Rngs(seed)))
        self.param_dtype = dtype = layer_dtype if param_dtype is None else param_dtype
        # Master parameters in param_dtype; the boundaries are traced with
        # the executors' compute_dtype casts, so the carrier gets that dtype.
        params = cast_floats(layer_params, dtype)
        run_params = cast_floats(params, self.compute_dtype)
        if len(specs) < self.num_devices:
            raise ValueError(
                f"the model has {len(specs)} layers but mesh_shape={tuple(mesh_shape)} "
                f"has {self.num_devices} pipe devices; every pipe device needs at least "
                f"one layer, so use pipe <= {len(specs)}"
            )
        if len(specs) < self.num_chunks * self.num_devices:
            raise ValueError(
                f"schedule='interleaved' with virtual_stages={self.num_chunks} on "
                f"{self.num_devices} pipe devices needs at least "
                f"{self.num_chunks * self.num_devices} layers (V * P, one per stage), "
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

        # Cuts balance forward + backward: the table executor's backward tick
        # (recompute + backward) is its longest, and the last stage's forward
        # is folded into it, so these loads set the lock-step tick length.
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
        self.unsplittable = tuple(sorted(set(check_layer_ids(unsplittable, len(specs))) | mixing))
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
            schedule, self.num_chunks = self.plan.chosen.schedule, self.plan.chosen.virtual_stages
            cut, remat = self.plan.chosen.cut, self.plan.chosen.remat
            self.stages = self.plan.chosen.stages
        elif cut == "fractional":
            splittable = [i not in self.unsplittable for i in range(len(specs))]
            self.stages = fractional_partition(
                forward + backward, self.num_chunks * self.num_devices, self.microbatch_rows, splittable
            )
        else:
            if partition is None:
                partition = partition_layers(forward + backward, self.num_chunks * self.num_devices)
            partition = check_partition(partition, len(specs), self.num_devices, self.num_chunks)
            self.stages = pieces_from_counts(partition, self.microbatch_rows)
        if schedule != "auto" and self.plan is None:
            common["remat"] = bool(remat)
            self.plan = describe_plan(
                self.stages, schedule, self.num_chunks, cut, layer_names=names,
                unsplittable=self.unsplittable, unit=unit, **common,
            )
        self.schedule, self.cut = schedule, cut
        self.partition = tuple(
            round(sum((p.stop - p.start) / self.microbatch_rows for p in stage), 4)
            if any(p.stop - p.start < self.microbatch_rows for p in stage) else len(stage)
            for stage in self.stages
        )
        self.stage_plan = place_stages(
            self.stages, self.num_devices, self.num_microbatches, specs, params, dtype, structs, x_mb
        )
        self.layout = self.stage_plan.layout
        self._host_params = [params[layer] for layer in self.stage_plan.slot_layer]

        self._param_sharding = NamedSharding(self.mesh, PartitionSpec(PIPE_AXIS))
        self._data_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.executor = executor
        if executor == "autodiff":
            loss = autodiff_gpipe_loss(
                self.stage_plan, self.mesh, loss_fn, remat=bool(remat), skip_idle=_skip_idle,
                compute_dtype=self.compute_dtype,
            )
            self._value_and_grad = jax.value_and_grad(loss)
        else:
            self.table = make_schedule(schedule, self.num_devices, self.num_microbatches, self.num_chunks, fused=True)
            self.ticks = pack(self.table)
            self.buffers = tick_buffers(self.ticks)
            self._value_and_grad = scheduled_loss_and_grad(
                self.stage_plan, self.ticks, self.buffers, self.mesh, loss_fn, remat=bool(remat),
                compute_dtype=self.compute_dtype,
            )
        self._sync_copies = sync_copies(self.stage_plan, self.mesh)
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
        loss, grads = self._value_and_grad(state.params, inputs, targets)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = self._sync_copies(optax.apply_updates(state.params, updates))
        # A non-finite loss or gradient leaves the state as it was, so the
        # caller still holds the last good state (the input is donated).
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(params, opt_state, state.step + 1)
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), loss, grad_norm

    def init(self) -> TrainState:
        """The initial state: ``model_fn``'s parameters, packed and placed.

        Returns:
          A ``TrainState`` with step 0.
        """
        params = jax.device_put(self.layout.pack(self._host_params), self._param_sharding)
        shapes = jax.eval_shape(self.optimizer.init, params)
        shardings = jax.tree.map(
            lambda s: self._param_sharding if s.shape == params.shape else self._replicated, shapes
        )
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self._replicated)
        return TrainState(params, opt_state, step)

    def shard_batch(self, batch: tuple[Any, Any]) -> tuple[Any, Any]:
        """Places a global batch on the mesh as ``[D, M, B, ...]`` leaves.

        Args:
          batch: ``(inputs, targets)`` with ``[R, ...]`` leaves.

        Returns:
          ``(inputs, targets)`` with ``[D, M, B, ...]`` leaves sharded over ``data``.

        Raises:
          ValueError: if the rows, a leaf's shape or dtype, or the structure
            differ from the example batch's.
        """
        inputs, targets = _check_batch(batch)
        rows = self._check_rows(inputs, targets)
        expected = self.num_replicas * self.num_microbatches * self.microbatch_rows
        if rows != expected:
            raise ValueError(
                f"this pipeline was built for global batches of {expected} rows, got {rows}"
            )
        check_batch_like(self._signature, inputs, targets, (rows,))
        shape = (self.num_replicas, self.num_microbatches, self.microbatch_rows)
        return jax.tree.map(
            lambda a: jax.device_put(np.asarray(a).reshape(shape + np.shape(a)[1:]), self._data_sharding),
            (inputs, targets),
        )

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

    def loss_and_grad(self, params: jax.Array, batch: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
        """The mean loss of a global batch and its gradient.

        Args:
          params: ``[P, N]`` packed parameters.
          batch: ``(inputs, targets)``, ``[R, ...]`` leaves or placed ones.

        Returns:
          ``(loss [], grads [P, N])``; ``unpack(grads)`` gives per-layer trees.
        """
        check_state_like(self._state_struct().params, params, "params")
        return self._loss_and_grad(params, *self._placed(batch))

    def _state_struct(self) -> TrainState:
        if not hasattr(self, "_init_struct"):
            self._init_struct = jax.eval_shape(self.init)
        return self._init_struct

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

    def unpack(self, packed: jax.Array) -> list[nnx.State]:
        """Per-layer ``nnx.State`` trees from packed ``[P, N]`` parameters or gradients.

        A layer split between devices is read from its owner copy.
        """
        if isinstance(packed, jax.Array) and not packed.is_fully_addressable:
            # Several processes (jax.distributed): gather the rows held elsewhere.
            packed = multihost_utils.process_allgather(packed, tiled=True)
        return self.layout.unpack(packed)[: self.stage_plan.num_layers]

    def layers(self, params: jax.Array) -> list[nnx.Module]:
        """The layers with the given packed parameters, as ``model_fn`` returns them."""
        return [
            nnx.merge(spec.graphdef, tree, spec.rest)
            for spec, tree in zip(self.layout.specs, self.unpack(params))
        ]

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

    def pack(self, trees: Sequence[Any], dtype: Any = None) -> jax.Array:
        """Packed ``[P, N]`` parameters, placed on the mesh, from per-layer trees.

        The inverse of ``unpack``: every copy of a layer split between
        devices is filled from the layer's tree.

        Args:
          trees: ``[L]`` per-layer trees (``nnx.State`` or anything whose
            leaves come in the layer's parameter order), as ``unpack`` gives.
          dtype: the buffer's dtype; default the parameters' dtype.

        Returns:
          A ``[P, N]`` array sharded over ``pipe``.

        Raises:
          ValueError: if the number of layers or a leaf's shape differs.
        """
        layout, plan = self.layout, self.stage_plan
        if len(trees) != plan.num_layers:
            raise ValueError(f"pack needs {plan.num_layers} per-layer trees, got {len(trees)}")
        out = np.zeros((self.num_devices, layout.width), dtype or layout.dtype)
        for p, slots in enumerate(layout.device_layers):
            for slot in slots:
                layer = plan.slot_layer[slot]
                leaves = jax.tree.leaves(trees[layer])
                shapes = [tuple(np.shape(leaf)) for leaf in leaves]
                if shapes != list(layout.specs[slot].shapes):
                    raise ValueError(
                        f"layer {layer} ({layout.specs[slot].name}) has parameter shapes "
                        f"{list(layout.specs[slot].shapes)}, got {shapes}"
                    )
                for offset, leaf in zip(layout.offsets[slot], leaves):
                    out[p, offset : offset + np.size(leaf)] = np.asarray(leaf).reshape(-1)
        return jax.device_put(out, self._param_sharding)

    def to_layers(self, state: TrainState) -> tuple[list[Any], Any, int]:
        """A state in per-layer form, independent of mesh, schedule and cut.

        Args:
          state: a ``TrainState`` of this pipeline.

        Returns:
          ``(params, opt_state, step)``: ``params`` as ``unpack`` gives;
          ``opt_state`` the optimizer's tree with each parameter-shaped
          ``[P, N]`` leaf replaced by its ``[L]`` per-layer trees and every
          other leaf (counts, scalars) a NumPy array; ``step`` an int.
        """
        shape = state.params.shape

        def host(leaf):
            if np.shape(leaf) == shape:
                return self.unpack(leaf)
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
            return np.asarray(jax.device_get(leaf))

        return self.unpack(state.params), jax.tree.map(host, state.opt_state), int(host(state.step))

    def from_layers(self, params: Sequence[Any], opt_state: Any, step: int) -> TrainState:
        """The inverse of ``to_layers``: packs and places a per-layer state on this mesh.

        Args:
          params: ``[L]`` per-layer parameter trees.
          opt_state: the optimizer's tree with ``[L]`` per-layer trees in
            place of each parameter-shaped leaf and arrays elsewhere.
          step: the step count.

        Returns:
          A ``TrainState`` laid out for this pipeline.

        Raises:
          ValueError: if a shape differs from this pipeline's.
        """
        packed = self.pack(params)
        shapes = jax.eval_shape(self.optimizer.init, jax.ShapeDtypeStruct(packed.shape, packed.dtype))

        def place(struct, value):
            if struct.shape == packed.shape:
                return self.pack(value, struct.dtype)
            if np.shape(value) != struct.shape:
                raise ValueError(
                    f"optimizer state leaf has shape {list(struct.shape)} here, got {list(np.shape(value))}"
                )
            return jax.device_put(np.asarray(value, struct.dtype), self._replicated)

        opt_state = jax.tree.map(place, shapes, opt_state)
        step = jax.device_put(jnp.asarray(step, jnp.int32), self._replicated)
        return TrainState(packed, opt_state, step)
