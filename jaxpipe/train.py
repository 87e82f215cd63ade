"""``jaxpipe.train``: the one-call entry point, with checkpoints, metrics and preemption."""

from __future__ import annotations

import itertools
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from . import distributed
from .batches import data_shard
from .checkpoint import CheckpointInfo, Checkpoints
from .metrics import MetricsFile, Progress, StepMetrics
from .config import PipelineConfig
from .guards import check_rows
from .pipeline import Pipeline, TrainState
from .planner import Plan


DEFAULT_EVAL_STEPS = 100  # batches read from an eval_data without a length


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or gradient.

    Attributes:
      step: the step (1-based) whose loss or gradient was not finite; its
        update was not applied.
      loss: that step's loss.
      grad_norm: that step's gradient global norm.
      layers: indices of the layers whose gradient (or parameters) hold a
        non-finite value.
    """

    def __init__(self, message: str, step: int, loss: float, grad_norm: float, layers: tuple[int, ...]):
        super().__init__(message)
        self.step, self.loss, self.grad_norm, self.layers = step, loss, grad_norm, layers


class TrainResult(NamedTuple):
    """What ``train`` returns.

    Attributes:
      losses: the mean training loss of each step this call ran (steps
        ``start_step + 1`` onwards).
      layers: the trained layers, as ``model_fn`` returns them.
      state: the final ``TrainState`` (parameter and optimizer-state stacks).
      pipeline: the ``Pipeline`` that ran, for further steps or evaluation.
      start_step: the step this call started from: 0, or the step of the
        checkpoint it resumed.
      stopped: ``None`` if training reached ``steps``; ``"sigterm"`` if a
        SIGTERM stopped it (preemption) and ``"callback"`` if a callback
        returned True, after saving a checkpoint where ``checkpoint_dir`` is
        set.
      eval_losses: ``(step, eval loss)`` pairs, one per evaluation.
      checkpoint: the newest checkpoint saved or resumed, or ``None``.
    """

    losses: list[float]
    layers: list[nnx.Module]
    state: TrainState
    pipeline: Pipeline
    start_step: int = 0
    stopped: str | None = None
    eval_losses: tuple[tuple[int, float], ...] = ()
    checkpoint: CheckpointInfo | None = None

    @property
    def plan(self) -> Plan:
        """The plan that ran: per device its layers, loads, memory, prediction, reason."""
        return self.pipeline.plan


def train(
    model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]],
    mesh_shape: Sequence[int] = (1, 1),
    *,
    data: Iterable[tuple[Any, Any]] | Callable[[int], Iterable[tuple[Any, Any]]],
    data_per_process: bool = False,
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    steps: int,
    config: PipelineConfig | None = None,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 3,
    log_every: int = 10,
    metrics_path: str | os.PathLike | None = None,
    eval_data: Iterable[tuple[Any, Any]] | None = None,
    eval_every: int | None = None,
    eval_steps: int | None = None,
    callbacks: Sequence[Callable[[StepMetrics], Any]] = (),
    **options: Any,
) -> TrainResult:
    """Trains ``model_fn``'s layers with pipeline and data parallelism.

    With ``checkpoint_dir``, a call first resumes from the newest complete
    checkpoint there (on any mesh, schedule or cut: checkpoints are stored
    per layer), skips the batches it already used, and trains on to
    ``steps`` in total; a directory whose newest checkpoint is at ``steps``
    returns at once. A SIGTERM (preemption) finishes the current step, saves
    a checkpoint and returns with ``stopped="sigterm"``.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``, the layers in order.
      mesh_shape: ``(D, P)``: data replicas x pipe devices; ``D * P`` devices
        are used. ``(1, 1)`` is plain single-device training.
      data: iterable of global batches ``(inputs, targets)``, each an array or
        pytree of arrays with ``R`` leading rows, ``R`` a multiple of ``D * M``.
        To resume, it must yield the same batches from the start again (a
        list, or a fresh generator with the same seed): the first ``step``
        batches are read and dropped. A stream that cannot replay loses those
        batches; give instead a function ``data(position)`` returning an
        iterable that starts at batch ``position``.
      data_per_process: ``data`` (and ``eval_data``) yield only this
        process's rows of each global batch: global rows
        ``[i * R / n, (i + 1) * R / n)`` for block ``i`` of ``n`` given by
        ``jaxpipe.data_shard(mesh_shape)`` (with one data replica per process,
        process ``i``'s ``1/n``); no process loads all rows. Default False:
        every process passes the same global batches.
      loss_fn: ``(outputs, targets) -> []``, mean loss over one micro-batch.
      optimizer: an optax transformation (see ``Pipeline`` for which are exact).
      steps: total optimizer steps, counting those of a resumed checkpoint.
      config: the ``PipelineConfig`` (micro-batches, schedule, cut, costs,
        executor, remat, dtypes, seed...; the seed is unused when resuming).
      progress: show a progress bar with step, loss, step time and
        examples/s; ``False`` prints nothing.
      devices: devices for the mesh; default ``jax.devices()``.
      checkpoint_dir: folder for checkpoints (orbax, see ``checkpoint.py``);
        resumes from it when it holds one. A checkpoint is also saved after
        the last step and when stopped early.
      checkpoint_every: save every this many steps (needs ``checkpoint_dir``).
      keep_checkpoints: how many checkpoints to keep; ``None`` keeps all.
      log_every: write metrics (and refresh the bar's numbers) every this
        many steps; the last step and evaluated steps are always written.
      metrics_path: JSON-lines metrics file (one object per logged step:
        ``step``, ``loss``, ``step_time_s``, ``examples_per_s``,
        ``grad_norm``, and ``eval_loss`` when evaluated). Default
        ``checkpoint_dir/metrics.jsonl`` with a ``checkpoint_dir``, else none.
        Lines of steps after the starting step are dropped on opening.
      eval_data: an iterable of held-out global batches (shaped like the
        training batches), read once, one batch at a time, before the first
        step; the eval loss is the mean loss of the batches read.
      eval_every: evaluate every this many steps (needs ``eval_data``); with
        ``eval_data`` the last step is always evaluated.
      eval_steps: read at most this many batches of ``eval_data``. Default
        ``None``: all of an ``eval_data`` with a length (a list, a dataset),
        and the first ``DEFAULT_EVAL_STEPS`` (100) of one without (a
        generator, possibly endless), with a warning if it holds more.
      callbacks: functions called after every step with its ``StepMetrics``;
        one returning ``True`` stops training after that step (a checkpoint
        is saved first when ``checkpoint_dir`` is set).
      **options: ``PipelineConfig`` fields as keywords instead of ``config``
        (``num_microbatches=4, schedule="1f1b"``, ...).

    Returns:
      A ``TrainResult``.

    Raises:
      ValueError: for bad shapes, sizes or options (see ``Pipeline``), if
        ``data`` runs out before ``steps`` batches, or if a checkpoint holds
        another model or optimizer.
      NonFiniteError: (a ``ValueError``) if a step's loss or gradient is not
        finite; that update is not applied and no checkpoint is written for it.
      TypeError: for wrongly typed arguments.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {steps!r}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not isinstance(data_per_process, bool):
        raise TypeError(f"data_per_process must be True or False, got {data_per_process!r}")
    config = PipelineConfig.from_options(config, **options)
    distributed.auto_initialize()
    _check_options(
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log_every=log_every,
        metrics_path=metrics_path, eval_data=eval_data, eval_every=eval_every, eval_steps=eval_steps,
        callbacks=callbacks,
        progress=progress,
    )
    eval_batches = _iterate(eval_data, "eval_data") if eval_data is not None else None
    store = Checkpoints(checkpoint_dir, keep_checkpoints) if checkpoint_dir is not None else None
    if store is not None:
        store.check_writable()
    pipe, state, batches, resumed = _resume(
        model_fn, mesh_shape, loss_fn, optimizer, config, devices, data, data_per_process, steps, store
    )
    start = resumed.step if resumed is not None else 0
    if start >= steps:
        return TrainResult([], pipe.layers(state.params), state, pipe, start, None, (), resumed)
    evals = _read_eval(pipe, eval_batches, eval_steps, isinstance(eval_data, Sized), data_per_process)
    if metrics_path is None and checkpoint_dir is not None:
        metrics_path = os.path.join(checkpoint_dir, "metrics.jsonl")
    report = _Report(
        pipe, store, evals, callbacks, steps, start, resumed, metrics_path=metrics_path, progress=progress,
        log_every=log_every, eval_every=eval_every, checkpoint_every=checkpoint_every,
    )
    try:
        state, losses, stopped = _step_loop(pipe, state, batches, start, steps, data_per_process, report)
    finally:
        report.close()
    return TrainResult(
        losses, pipe.layers(state.params), state, pipe, start, stopped, tuple(report.eval_losses), report.saved
    )


class _Resumed(NamedTuple):
    """Where training starts: the pipeline, its state, the batches from there on, the checkpoint resumed."""

    pipe: Pipeline
    state: TrainState
    batches: Iterator  # the batches from the resumed step on
    resumed: CheckpointInfo | None


def _resume(model_fn, mesh_shape, loss_fn, optimizer, config, devices, data, per_process, steps, store) -> _Resumed:
    """Builds the pipeline and restores the newest readable checkpoint in ``store``, or inits a fresh state.

    The data is opened at the checkpoint's data position; its first batch
    (or, resuming at the end, data position 0's) fixes the pipeline's shapes.
    """
    latest = store.latest_readable() if store is not None else None
    resumed = store.info(latest) if latest is not None else None
    position = resumed.data_position if resumed is not None else 0
    batches, example = _open_data(data, position, steps)
    if per_process:
        example = _global_example(example, data_shard(mesh_shape, devices).count)
    pipe = Pipeline(
        model_fn, mesh_shape, loss_fn, optimizer, config.num_microbatches, example, config=config, devices=devices
    )
    if resumed is not None:
        state, resumed = store.restore(pipe, latest)
    else:
        state = pipe.init()
    return _Resumed(pipe, state, batches, resumed)


def _step_loop(pipe: Pipeline, state: TrainState, batches: Iterator, start: int, steps: int, per_process: bool,
               report: _Report) -> tuple[TrainState, list[float], str | None]:
    """Steps ``start + 1 .. steps``: ``(final state, losses, why it stopped early or None)``.

    Raises:
      NonFiniteError: at the first step whose loss or gradient is not finite.
    """
    losses, stopped = [], None
    with _SigtermFlag() as sigterm:
        for step in range(start + 1, steps + 1):
            batch = _next_batch(batches, step - 1, steps)
            if per_process:
                batch = pipe.shard_batch(batch, per_process=True)
            began = time.perf_counter()
            state, loss, grad_norm = pipe.train_step_stats(state, batch)
            loss, grad_norm = float(loss), float(grad_norm)
            elapsed = time.perf_counter() - began
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise _non_finite(pipe, state, batch, step, loss, grad_norm, report.saved)
            losses.append(loss)
            stopped = report.after_step(state, step, loss, grad_norm, elapsed, sigterm.raised)
            if stopped:
                break
        if sigterm.raised and stopped is None:
            stopped = "sigterm"  # arrived during the last step's save: training is complete
    return state, losses, stopped


class _Report:
    """After each step: evaluation, metrics (file, bar, callbacks), the stop decision and checkpoint saves.

    Attributes:
      saved: the newest checkpoint saved (or resumed), or ``None``.
      eval_losses: ``(step, eval loss)`` pairs so far.
    """

    def __init__(self, pipe: Pipeline, store: Checkpoints | None, evals: list, callbacks: Sequence[Callable],
                 steps: int, start: int, saved: CheckpointInfo | None, *, metrics_path, progress: bool,
                 log_every: int, eval_every: int | None, checkpoint_every: int | None):
        main = jax.process_index() == 0
        self.pipe, self.store, self.evals, self.callbacks = pipe, store, evals, callbacks
        self.steps, self.start, self.saved, self.eval_losses = steps, start, saved, []
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.log = MetricsFile(metrics_path, start) if metrics_path is not None and main else None
        self.bar = Progress(steps, start, progress and main)
        self.rows = pipe.num_replicas * pipe.num_microbatches * pipe.microbatch_rows  # R, the global batch's rows

    def after_step(self, state: TrainState, step: int, loss: float, grad_norm: float, elapsed: float,
                   sigterm: bool) -> str | None:
        """Reports ``step``; returns why to stop after it (``"sigterm"``, ``"callback"``) or ``None``."""
        last = step == self.steps
        eval_loss = None
        if self.evals and (last or (self.eval_every and step % self.eval_every == 0)):
            eval_loss = _evaluate(self.pipe, state, self.evals)
            self.eval_losses.append((step, eval_loss))
        metrics = StepMetrics(step, loss, elapsed, self.rows / elapsed, grad_norm, eval_loss)
        stop = [callback(metrics) is True for callback in self.callbacks]
        stopped = _agree(sigterm, any(stop))
        if self.log is not None and (step % self.log_every == 0 or last or eval_loss is not None or stopped):
            self.log.write(metrics)
        self.bar.update(metrics, show=step % self.log_every == 0 or last or step == self.start + 1)
        due = last or stopped or (self.checkpoint_every and step % self.checkpoint_every == 0)
        if self.store is not None and due:
            self.saved = self.store.save(self.pipe, state, data_position=step)
        if stopped:
            self.bar.write(f"stopped after step {step} ({stopped})" + (
                f"; checkpoint in {self.saved.path}" if self.store is not None else ""))
        return stopped

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()
        if self.store is not None:
            self.store.close()


def _check_options(*, checkpoint_dir, checkpoint_every, log_every, metrics_path, eval_data, eval_every,
                   eval_steps, callbacks, progress) -> None:
    for name, value in (("checkpoint_dir", checkpoint_dir), ("metrics_path", metrics_path)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}")
    for name, value in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every),
                        ("eval_steps", eval_steps), ("log_every", log_every)):
        if value is None and name != "log_every":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError(
            f"checkpoint_every={checkpoint_every} needs checkpoint_dir: give the folder to save checkpoints in"
        )
    for name, value in (("eval_every", eval_every), ("eval_steps", eval_steps)):
        if value is not None and eval_data is None:
            raise ValueError(f"{name}={value} needs eval_data: give the held-out batches to evaluate")
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence) or callable(callbacks):
        raise TypeError(
            f"callbacks must be a list or tuple of functions, got {type(callbacks).__name__}; "
            "wrap a single function in a list"
        )
    for i, callback in enumerate(callbacks):
        if not callable(callback):
            raise TypeError(f"callbacks[{i}] must be callable, got {type(callback).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")


def _open_data(data, position: int, steps: int) -> tuple[Iterator, Any]:
    """``(batches, example)``: an iterator at batch ``position`` and one batch for the shapes."""
    if not isinstance(data, Iterable) and callable(data):
        batches = _iterate(data(position), f"data({position})")
        example = _next_batch(batches, position, steps) if position < steps else None
        if example is None:
            return batches, _next_batch(_iterate(data(0), "data(0)"), 0, steps)
        return itertools.chain([example], batches), example
    if isinstance(data, Sized) and len(data) < steps:
        raise ValueError(
            f"data has {len(data)} batches but steps={steps}; give an iterable "
            "with at least one batch per step"
        )
    batches = _iterate(data, "data")
    example = _next_batch(batches, 0, steps)
    if position == 0:
        return itertools.chain([example], batches), example
    for used in range(1, position):
        try:
            next(batches)
        except StopIteration:
            raise ValueError(
                f"data ran out after {used} batches while skipping the {position} batches the checkpoint "
                "already used; give data that yields the same batches from the start again"
            ) from None
    return batches, example


def _iterate(data, what: str) -> Iterator:
    try:
        return iter(data)
    except TypeError:
        other = "" if what == "eval_data" else " (or give a function: position -> iterable of batches)"
        raise TypeError(
            f"{what} must be an iterable of (inputs, targets) batches, got {type(data).__name__}{other}"
        ) from None


def _next_batch(batches, step: int, steps: int):
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(
            f"data ran out after {step} batches but steps={steps}; give an "
            "iterable with at least one batch per step"
        ) from None


def _read_eval(pipe: Pipeline, batches: Iterator | None, eval_steps: int | None, sized: bool,
               per_process: bool = False) -> list:
    """The held-out batches, read one at a time and placed: at most ``eval_steps`` of them."""
    if batches is None:
        return []
    limit = eval_steps if eval_steps is not None else None if sized else DEFAULT_EVAL_STEPS
    if limit is not None:
        # One batch past the default limit tells whether the warning is due.
        batches = itertools.islice(batches, limit + (eval_steps is None))
    placed = []
    for i, batch in enumerate(batches):
        if i == limit:
            if eval_steps is None:
                warnings.warn(
                    f"eval_data has no length and more than {DEFAULT_EVAL_STEPS} batches; evaluating on the first "
                    f"{DEFAULT_EVAL_STEPS} (pass eval_steps= to choose how many)", stacklevel=3,
                )
            break
        try:
            placed.append(pipe.shard_batch(batch, per_process=per_process))
        except (TypeError, ValueError) as err:
            raise type(err)(f"eval_data batch {i}: {err}") from err
    if not placed:
        raise ValueError("eval_data is empty; give at least one (inputs, targets) batch")
    return placed


def _global_example(example, count: int) -> tuple[Any, Any]:
    """Shapes of the global batch whose per-process block ``example`` is (``count`` blocks)."""
    if not isinstance(example, (tuple, list)) or len(example) != 2:
        return example  # Pipeline names the error
    return tuple(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct((np.shape(a)[0] * count,) + np.shape(a)[1:], np.asarray(a).dtype)
                     if np.ndim(a) else a, part)
        for part in example
    )


def _evaluate(pipe: Pipeline, state: TrainState, evals: list) -> float:
    return float(np.mean([float(pipe.evaluate(state.params, batch)) for batch in evals]))


def _non_finite(pipe, state, batch, step, loss, grad_norm, saved) -> NonFiniteError:
    """The error for a non-finite step, naming the layers (recomputed at the unchanged state)."""
    _, grads = pipe.loss_and_grad(state.params, batch, state.step)
    names = [spec.name for spec in pipe.placement.specs]

    def bad(trees):
        return [i for i, tree in enumerate(trees) if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree))]

    bad_grads, bad_params = bad(pipe.from_stacks(grads)), bad(pipe.from_stacks(state.params))
    where = "; ".join(
        f"non-finite {what} in layers " + ", ".join(f"{i} ({names[i]})" for i in layers)
        for what, layers in (("parameters", bad_params), ("gradients", bad_grads)) if layers
    ) or "no single layer's gradient is non-finite (the norm overflowed)"
    kept = (f"the last checkpoint (step {saved.step}, {saved.path}) is untouched" if saved
            else "no checkpoint was written")
    message = (
        f"step {step}: the loss is {loss} and the gradient's global norm is {grad_norm}; {where}. "
        f"The update was not applied and {kept}. Check this step's batch, the learning rate and the loss."
        + ("" if bad_params else _integer_inputs_hint(pipe, state, batch))
    )
    return NonFiniteError(message, step, loss, grad_norm, tuple(sorted(set(bad_grads) | set(bad_params))))


def _integer_inputs_hint(pipe: Pipeline, state: TrainState, batch: Any) -> str:
    """Where a batch with integer inputs first turns non-finite: out-of-range ids give NaN, not an error."""
    inputs = batch[0]
    ints = [np.asarray(a) for a in jax.tree.leaves(inputs) if np.issubdtype(np.asarray(a).dtype, np.integer)]
    if not ints or not all(a.size for a in ints):
        return ""
    span = f"[{min(int(a.min()) for a in ints)}, {max(int(a.max()) for a in ints)}]"
    hint = (f" The batch's integer inputs range over {span}: an id outside an embedding's table (e.g. token ids "
            "at or above the vocabulary size, or negative) gives NaN instead of an error; check the ids against "
            "the embedding sizes.")
    try:
        h = inputs
        for i, layer in enumerate(pipe.layers(state.params)):
            h = layer(h)
            if not all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(h)
                       if jnp.issubdtype(leaf.dtype, jnp.inexact)):
                return f" Layer {i} ({type(layer).__name__}) is the first whose output is not finite." + hint
    except Exception:  # noqa: BLE001 - only a hint: a model that does not run whole here gets the general one
        pass
    return hint


def _agree(sigterm: bool, callback: bool) -> str | None:
    """Why to stop after this step, the same on every process (SIGTERM may reach only some)."""
    flags = np.asarray([sigterm, callback])
    if jax.process_count() > 1:
        flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2).any(0)
    return "sigterm" if flags[0] else "callback" if flags[1] else None


class _SigtermFlag:
    """Within ``with``: a SIGTERM sets ``raised`` instead of ending the process.

    The first SIGTERM re-installs the previous handler, so a second one acts
    as before (ends the process). Outside the main thread nothing is
    installed (Python allows signal handlers only there).
    """

    def __init__(self):
        self.raised = False
        self._installed = False
        self._previous = signal.SIG_DFL

    def __enter__(self) -> "_SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._handle)
            self._previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGTERM, self._previous)

    def __exit__(self, *exc) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)


def plan(
    model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]],
    mesh_shape: Sequence[int],
    example_inputs: Any,
    *,
    config: PipelineConfig | None = None,
    devices: Sequence[jax.Device] | None = None,
    **options: Any,
) -> Plan:
    """The plan jaxpipe would run for a model, without compiling or training.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``.
      mesh_shape: ``(D, P)``.
      example_inputs: one global batch of model inputs, ``[R, ...]`` leaves.
      config: the ``PipelineConfig`` to plan.
      devices: devices for the mesh; default ``jax.devices()``.
      **options: ``PipelineConfig`` fields as keywords instead of ``config``
        (``num_microbatches``, ``costs``, ``max_memory_per_device``...);
        ``schedule`` defaults to ``"auto"`` here: the planner picks.

    Returns:
      The ``Plan``; ``print`` it for per-device layers, loads, memory,
      predicted step time of the plain and chosen plan, and the reason.
    """
    rows = check_rows(example_inputs, "example_inputs")
    targets = np.zeros((rows,), np.float32)
    if config is None:
        options.setdefault("schedule", "auto")
    config = PipelineConfig.from_options(config, **options)
    pipe = Pipeline(
        model_fn, mesh_shape, _plan_only_loss, optax.identity(), config.num_microbatches,
        (example_inputs, targets), config=config, devices=devices,
    )
    return pipe.plan


def _plan_only_loss(outputs: Any, targets: Any) -> jax.Array:
    leaves = [leaf for leaf in jax.tree.leaves(outputs) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return sum(jnp.mean(leaf) for leaf in leaves) + 0.0 * jnp.mean(targets) if leaves else jnp.mean(targets)
