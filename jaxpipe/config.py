"""``PipelineConfig``: every build option of ``Pipeline``, declared, checked and documented once.

``Pipeline``, ``jaxpipe.train``, ``jaxpipe.plan`` and the command line all
build one ``PipelineConfig`` (``from_options`` collects the same names as
keyword arguments) and pass it on whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .calibrate import check_calibration
from .layers import check_float_dtype
from .schedule import SCHEDULE_NAMES

SCHEDULES = SCHEDULE_NAMES + ("balanced", "auto")
CUTS = ("integer", "fractional")
EXECUTORS = ("table", "autodiff")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How a ``Pipeline`` cuts, orders and runs a model: every build option.

    Checked on construction (``TypeError`` or ``ValueError`` naming the value
    and what would be right). ``schedule="balanced"`` is stored as
    ``schedule="1f1b"`` with ``cut="fractional"``; dtypes are stored as
    ``np.dtype``, ``partition`` and ``unsplittable`` as tuples of ints, a
    ``costs`` sequence as a tuple of floats. Checks that need the model (the
    layer count, a partition's sum) are made when the pipeline is built.

    Attributes:
      num_microbatches: M, micro-batches per data replica per step.
      schedule: the order of work, a table from ``schedule.py``:
        ``"gpipe"`` (Huang et al. 2019), ``"1f1b"`` (PipeDream-Flush,
        Narayanan et al. 2021), ``"interleaved"`` (Megatron-LM interleaved
        1F1B, needs M a multiple of P), ``"zb_h1"`` (zero-bubble 1F1B, Qi et
        al. 2024: each stage's backward runs as B, the input gradient, and
        W, the weight gradient, split from one trace; Ws fill the cool-down,
        ``split_backward.py``), ``"balanced"`` (``"1f1b"`` with
        ``cut="fractional"``), or ``"auto"`` (the planner predicts every cut,
        order and V and picks the fastest; see ``Pipeline.plan``).
        ``cut="fractional"`` with ``"zb_h1"`` is balanced + zero bubble.
      virtual_stages: V, chunks per device for ``"interleaved"``.
      cut: ``"integer"``: whole layers per stage, cut to minimise the
        largest stage's cost. ``"fractional"``: every stage gets the same
        cost; a layer straddling a cut is split by micro-batch rows between
        neighbouring devices (each holds a copy of its parameters), so a
        heavy layer may span several devices and the model may have fewer
        layers than pipe devices.
      partition: ``[V * P]`` layers per stage for ``cut="integer"``
        (default: the min-max cut of the costs).
      costs: per-layer costs for the cuts and the planner: a ``Profile``
        (measured seconds, ``profile(...)``), ``[L]`` numbers, or ``None``
        for XLA's forward+backward flop estimate.
      unsplittable: layers a fractional cut must not split (layers whose
        outputs mix rows, or that draw random numbers, are added
        automatically).
      max_memory_per_device: bytes; ``"auto"`` only picks plans predicted to
        fit.
      executor: ``"table"`` (default): the schedule-table executor; each
        tick a device runs up to one forward and one backward (``ticks.py``),
        and a stage's forward saves its residuals for its backward.
        ``"autodiff"`` (GPipe only): the forward scan differentiated by JAX.
      remat: rematerialise: store only each stage's input and recompute its
        forward in the backward (less memory, one more forward per
        micro-batch). ``None``: False, except that ``"auto"`` may choose it.
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
      calibration: the machine's executor overheads (``jaxpipe.calibrate``,
        a ``Calibration`` or the path of a saved one): the planner then
        predicts step times in seconds, pricing each tick's fixed time and
        data movement, the weight-gradient adds and the update, and flop
        estimates are converted with its measured matmul rate. ``None``:
        predictions count compute only.
    """

    num_microbatches: int = 1
    schedule: str = "gpipe"
    virtual_stages: int = 1
    cut: str = "integer"
    partition: Sequence[int] | None = None
    costs: Any = None
    unsplittable: Sequence[int] = ()
    max_memory_per_device: float | None = None
    executor: str = "table"
    remat: bool | None = None
    param_dtype: Any = None
    compute_dtype: Any = None
    seed: int = 0
    calibration: Any = None

    def __post_init__(self):
        _check_int(self.seed, "seed", minimum=None)
        if self.remat is not None and not isinstance(self.remat, (bool, np.bool_)):
            raise TypeError(f"remat must be True, False or None, got {self.remat!r}")
        _check_memory(self.max_memory_per_device)
        _check_int(self.num_microbatches, "num_microbatches", minimum=1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.cut not in CUTS:
            raise ValueError(f"cut={self.cut!r} is not one of {CUTS}")
        if self.schedule == "balanced":
            self._set(schedule="1f1b", cut="fractional")
        if self.cut == "fractional" and self.executor == "autodiff":
            raise ValueError("cut='fractional' (schedule='balanced') needs executor='table'")
        _check_int(self.virtual_stages, "virtual_stages", minimum=None)
        if self.virtual_stages < 1 or (self.virtual_stages > 1 and self.schedule != "interleaved"):
            raise ValueError(
                f"virtual_stages={self.virtual_stages} with schedule={self.schedule!r}: use "
                "virtual_stages >= 1, and more than 1 only with schedule='interleaved'"
            )
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r} is not one of {EXECUTORS}")
        if self.executor == "autodiff" and self.schedule != "gpipe":
            raise ValueError(
                f"executor='autodiff' runs GPipe only, got schedule={self.schedule!r}; "
                "use executor='table' for it"
            )
        self._set(
            seed=int(self.seed), num_microbatches=int(self.num_microbatches),
            virtual_stages=int(self.virtual_stages), remat=None if self.remat is None else bool(self.remat),
            param_dtype=check_float_dtype(self.param_dtype, "param_dtype"),
            compute_dtype=check_float_dtype(self.compute_dtype, "compute_dtype"),
            partition=_check_partition(self.partition, self.cut, self.schedule),
            costs=_check_costs(self.costs), unsplittable=_check_unsplittable(self.unsplittable),
            calibration=check_calibration(self.calibration),
        )

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, config: PipelineConfig | None = None, **options: Any) -> PipelineConfig:
        """The config of a call taking a ``PipelineConfig`` or its fields as keyword arguments.

        Args:
          config: a config, or ``None`` to build one from ``options``.
          **options: ``PipelineConfig`` fields; with ``config`` they must agree
            with it (e.g. ``Pipeline``'s positional ``num_microbatches``).

        Raises:
          TypeError: for a name that is no field, or a ``config`` that is no
            ``PipelineConfig``.
          ValueError: for options that contradict ``config``, or bad values.
        """
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown option {', '.join(unknown)}; the pipeline options are {', '.join(FIELDS)}")
        if config is None:
            return cls(**options)
        if not isinstance(config, PipelineConfig):
            raise TypeError(f"config must be a jaxpipe.PipelineConfig or None, got {type(config).__name__}")
        given = dataclasses.replace(config, **options)
        if any(not _same(getattr(given, name), getattr(config, name)) for name in options):
            raise ValueError(
                f"options {options} contradict config={config}; give each option once, in config or as a keyword"
            )
        return config


FIELDS = tuple(field.name for field in dataclasses.fields(PipelineConfig))


def _same(a: Any, b: Any) -> bool:
    """Whether two checked option values are equal (``False`` where ``==`` gives no truth value)."""
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError):
        return False


def _check_int(value: Any, name: str, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_memory(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"max_memory_per_device must be a number of bytes, got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"max_memory_per_device must be a positive number of bytes, got {value!r}")


def _check_partition(partition: Any, cut: str, schedule: str) -> tuple[int, ...] | None:
    if partition is None:
        return None
    if isinstance(partition, (str, bytes)) or not isinstance(partition, Sequence) or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in partition
    ):
        raise TypeError(f"partition must be a sequence of ints (layers per pipe device), got {partition!r}")
    if cut == "fractional" or schedule == "auto":
        who = "schedule='auto'" if schedule == "auto" else "cut='fractional' (schedule='balanced')"
        raise ValueError(f"{who} computes its own cut; drop partition={partition!r}, or use cut='integer' with it")
    return tuple(int(n) for n in partition)


def _check_costs(costs: Any) -> Any:
    if costs is None or (hasattr(costs, "forward") and hasattr(costs, "backward")):
        return costs
    try:
        values = np.asarray(costs, np.float64)
    except (TypeError, ValueError):
        values = None
    if isinstance(costs, (str, bytes)) or values is None or values.ndim != 1:
        raise TypeError(f"costs must be a Profile, [L] numbers (one per layer) or None, got {costs!r}")
    return tuple(float(v) for v in values)


def _check_unsplittable(ids: Any) -> tuple:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"unsplittable must be a sequence of layer indices, e.g. ({ids!r},) or [1, 3], got {ids!r}")
    return tuple(ids)
