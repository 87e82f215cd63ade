"""Per-machine overheads that turn per-layer costs into a step time in seconds.

Per-layer costs (a ``Profile``, or XLA's flop estimate) price the compute.
A step on real processes also pays for what the table executor does around
it (``executor.py``), which the planner prices with three measured constants:

* ``tick_s``, a fixed time per tick: the scan step, the lane switches, the
  sends' latency;
* ``send_s``, a time per byte sent to another device: every tick each
  device sends ``SENDS`` messages (the activation and the gradient), and
  every step each extra parameter copy of a split layer is merged into its
  owner and synced back (``COPY_SENDS`` passes over its bytes);
* ``byte_s``, a time per byte of data movement: every tick each device
  writes the arrivals and residuals into their buffer slots, reads a slot
  per lane and sends two messages (``SLOT_PASSES`` message-sized and
  residual-slot-sized passes); every backward adds its stage's weight
  gradient into the accumulators (``ACCUMULATE_PASSES`` passes over the
  parameter bytes of each piece: a split layer's piece adds a full-size
  gradient); once per step the optimizer update (``UPDATE_PASSES``).

``calibrate`` measures them where it runs: first directly (``send_s`` by
timing ``ppermute`` messages between the pipe devices, ``byte_s`` by
timing a gradient-sized in-place add, ``flop_s`` by a timed matmul); then
it trains six small probe pipelines (many cheap ticks; wide cheap messages;
wide weights at few rows; compute; saved residuals; a split layer),
profiles their layers, and fits ``tick_s``, ``send_s`` and ``byte_s`` to
their measured steps through the planner's own
prediction (``prediction.predict``), so the fit and the plan price alike;
each probe's remaining error is kept (``Calibration.residual``).
Compute is priced as profiled: a layer's forward and backward inside a
scan, a ``lax.switch`` and an accumulator ran 1.01-1.05x of its time jitted
alone on CPU (experiment 10). A fourth constant, ``flop_s``, converts flop
estimates into seconds. The result is cached as JSON, like a ``Profile``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from .profile import _time as median_seconds

CALIBRATION_FORMAT = 1

# Passes over the bytes the executor moves (see the module docstring). A slot write is a read of the
# slot, a select and a write; each lane reads its slots; messages are sent and tied to both lanes.
# A backward's weight gradient is written in its profiled time already; adding it into the
# accumulator reads the accumulator once more.
SLOT_PASSES = {"message": 8.0, "residual": 4.0}
SENDS = 2.0
COPY_SENDS = 2.0
ACCUMULATE_PASSES = 1.0
UPDATE_PASSES = 4.0


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured overheads of the table executor on one machine.

    Attributes:
      tick_s: fixed seconds per executor tick.
      send_s: seconds per byte sent to another pipe device.
      byte_s: seconds per byte of data movement on a device.
      flop_s: seconds per flop of a dense matmul (forward and backward),
        which converts XLA flop estimates into seconds.
      device: the device kind measured on.
      num_devices: P, the pipe devices of the probe pipelines.
      process_count: processes that ran them.
      residual: ``[N]`` relative error of the fit on each probe, (predicted
        - measured) / measured.
    """

    tick_s: float
    send_s: float
    byte_s: float
    flop_s: float
    device: str
    num_devices: int
    process_count: int
    residual: tuple = ()

    def __post_init__(self):
        for name in ("tick_s", "send_s", "byte_s", "flop_s"):
            value = getattr(self, name)
            number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
            if not number or not np.isfinite(value) or value < 0:
                raise ValueError(f"Calibration.{name} must be a finite number >= 0 (seconds), got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("num_devices", "process_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Calibration.{name} must be an int >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "residual", tuple(float(r) for r in self.residual))

    def step_overhead(self, num_ticks: int, message_bytes: float, residual_slot_bytes: float,
                      update_bytes: float, num_devices: int, copy_bytes: float = 0.0) -> float:
        """Seconds a step spends outside the stages' compute, beside their accumulation.

        Args:
          num_ticks: T, ticks of the packed table.
          message_bytes: bytes of one message (an activation slot).
          residual_slot_bytes: bytes of one residual slot (0 with remat).
          update_bytes: parameter bytes of the device with the most.
          num_devices: P (with one, nothing is sent).
          copy_bytes: bytes of the split layers' extra parameter copies.
        """
        moved = SLOT_PASSES["message"] * message_bytes + SLOT_PASSES["residual"] * residual_slot_bytes
        sent = SENDS * message_bytes if num_devices > 1 else 0.0
        per_tick = self.tick_s + self.send_s * sent + self.byte_s * moved
        return (num_ticks * per_tick + self.byte_s * UPDATE_PASSES * update_bytes
                + self.send_s * COPY_SENDS * copy_bytes)

    def accumulate(self, param_bytes: np.ndarray) -> np.ndarray:
        """Seconds a backward spends adding weight gradients of ``param_bytes`` into its accumulators."""
        return self.byte_s * ACCUMULATE_PASSES * np.asarray(param_bytes, np.float64)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the calibration as JSON."""
        data = {"format": CALIBRATION_FORMAT, **dataclasses.asdict(self)}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Reads a calibration written by ``save``.

        Raises:
          ValueError: if the file is not a calibration of this format.
        """
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{os.fspath(path)} is not a saved jaxpipe Calibration: {err}") from err
        if not isinstance(data, dict) or data.pop("format", None) != CALIBRATION_FORMAT:
            raise ValueError(
                f"{os.fspath(path)} is not a jaxpipe Calibration of format {CALIBRATION_FORMAT}; calibrate again")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{os.fspath(path)} is not a saved jaxpipe Calibration: {err}") from err

    def __str__(self) -> str:
        fit = ", ".join(f"{r:+.0%}" for r in self.residual)
        return (f"Calibration on {self.process_count} process(es), P={self.num_devices}, {self.device}: "
                f"{self.tick_s * 1e6:.0f} us per tick, {_rate(self.send_s):.2f} GB/s sent, "
                f"{_rate(self.byte_s):.2f} GB/s moved, {_rate(self.flop_s):.1f} GFLOP/s matmul"
                + (f" (fit error per probe: {fit})" if fit else ""))


def _rate(seconds_per_unit: float) -> float:
    return 1e-9 / seconds_per_unit if seconds_per_unit else float("inf")


def check_calibration(value: Any) -> Calibration | None:
    """``None``, a ``Calibration``, or a path to a saved one (loaded)."""
    if value is None or isinstance(value, Calibration):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Calibration.load(value)
    raise TypeError(f"calibration must be a jaxpipe.Calibration, a path to a saved one, or None, got {value!r}")


def matmul_seconds_per_flop(size: int = 512, repeats: int = 5) -> float:
    """Seconds per flop of a ``[size, size] @ [size, size]`` forward and backward on the default device."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)

    @jax.jit
    def step(w, x):
        return jax.grad(lambda w_, x_: jnp.sum(jnp.tanh(x_ @ w_)), argnums=(0, 1))(w, x)

    return median_seconds(step, (a, a), 1, repeats) / (3 * 2 * size**3)


def moved_seconds_per_byte(mbytes: int = 16, loops: int = 8) -> float:
    """Seconds per byte of one pass of an in-place add of ``mbytes`` MB (a gradient accumulation), in a scan."""
    n = mbytes * 2**20 // 4
    acc, grad = jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)

    @jax.jit
    def run(acc, grad):
        return lax.scan(lambda a, i: (a + grad * i, None), acc, jnp.arange(loops, dtype=jnp.float32))[0]

    return median_seconds(run, (acc, grad), 1, 5) / (3 * 4 * n * loops)  # read acc, read grad, write acc


def sent_seconds_per_byte(mesh: Any, mbytes: int = 4, loops: int = 8) -> float:
    """Seconds per byte sent by a ``ppermute`` to the next pipe device (a message), in a scan; 0 for P = 1."""
    from jax.sharding import PartitionSpec

    from .mesh import PIPE_AXIS

    num_devices = mesh.devices.shape[1]
    if num_devices < 2:
        return 0.0
    n = mbytes * 2**20 // 4
    pairs = [(p, (p + 1) % num_devices) for p in range(num_devices)]

    def body(x):
        return lax.scan(lambda c, _: (lax.ppermute(c, PIPE_AXIS, pairs) * 1.0001, None), x, None, length=loops)[0]

    spec = PartitionSpec(None, PIPE_AXIS)
    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    x = jax.device_put(np.ones((mesh.devices.shape[0], n * num_devices), np.float32),
                       jax.sharding.NamedSharding(mesh, spec))
    return median_seconds(run, (x,), 1, 5) / (4 * n * loops)


class _Scale(nnx.Module):
    """``x * scale + shift``: a wide message for almost no compute (the messages probe)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.shift = nnx.Param(jnp.zeros((width,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale + self.shift


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean((outputs - targets) ** 2)


def _probes(num_devices: int) -> dict[str, tuple[Any, int, int, str]]:
    """``name -> (model_fn, rows per micro-batch, width, schedule)``: steps dominated by one overhead each."""
    from .models import mlp, residual_mlp

    P = num_devices
    return {
        "ticks": (mlp([128] * (2 * P + 1)), 32, 128, "1f1b"),
        "messages": (lambda rngs: [_Scale(4096, rngs=rngs) for _ in range(2 * P)], 512, 4096, "1f1b"),
        "weights": (mlp([1536] * (P + 1)), 8, 1536, "1f1b"),
        "compute": (mlp([768] * (2 * P + 1)), 256, 768, "1f1b"),
        "residuals": (residual_mlp(256, 2048, 2 * P), 64, 256, "1f1b"),
        "split": (mlp([768] * (P + 2)), 48, 768, "balanced"),
    }


def _measure(pipe: Any, batch: tuple, steps: int, warmup: int) -> float:
    """Median seconds of ``pipe``'s training step (every process runs it; process 0's times count)."""
    from jax.experimental import multihost_utils

    state, placed = pipe.init(), pipe.shard_batch(batch)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        state, loss = pipe.train_step(state, placed)
        jax.block_until_ready((state, loss))
        if step >= warmup:
            times.append(time.perf_counter() - start)
    median = np.asarray([statistics.median(times)], np.float32)
    if jax.process_count() > 1:
        median = multihost_utils.broadcast_one_to_all(median)
    return float(median[0])


def predicted_step(pipe: Any, calibration: Calibration, profile: Any = None) -> float:
    """Seconds the planner predicts for ``pipe``'s stages and order under ``calibration``.

    Args:
      pipe: a built ``Pipeline``.
      calibration: the overheads.
      profile: a ``Profile`` of the same layers to price them by, instead
        of the costs the pipeline was cut with (e.g. flop estimates).
    """
    from .build import in_seconds
    from .prediction import predict

    chosen, costs = pipe.plan.chosen, pipe.layer_costs
    if profile is not None:
        forward, backward = np.asarray(profile.forward()), np.asarray(profile.backward())
        piece_scale = profile.piece_scale() if profile.piece_rows else None
    else:
        (forward, backward), piece_scale = in_seconds(costs, calibration)[:2], costs.piece_scale
    return predict(
        chosen.stages, chosen.schedule, chosen.virtual_stages, chosen.cut, forward,
        backward, pipe.num_devices, pipe.num_microbatches, pipe.microbatch_rows,
        list(costs.param_bytes), costs.message_bytes, None, list(costs.residual_bytes), chosen.remat,
        calibration=calibration, boundary_bytes=list(costs.boundary_bytes) or None, piece_scale=piece_scale,
    ).step_time


def fit(runs: list[tuple[Any, float]], measured: Calibration) -> Calibration:
    """``measured`` with the ``tick_s``, ``send_s`` and ``byte_s`` that best predict the runs' steps.

    Relative least squares, every constant >= 0. The prediction is linear
    in ``tick_s`` and ``send_s``, and in ``byte_s`` up to the tick maximum
    its weight-gradient adds sit in, linearised at the directly measured
    rate: data movement inside the tick loop (slices and updates of buffer
    slots) costs more per byte than the streaming add that measures it, and
    a message more than a bare ``ppermute``. A constant the probes cannot
    separate (fitted 0) keeps its direct measurement.

    Args:
      runs: ``(pipeline, measured seconds)`` pairs; the pipelines' costs are in seconds.
      measured: the directly measured constants (``tick_s`` is ignored).

    Returns:
      The ``Calibration``, with each run's relative error in ``residual``.

    Raises:
      ValueError: if ``runs`` is empty.
    """
    if not runs:
        raise ValueError("fit needs at least one (pipeline, measured seconds) run")
    steps = np.asarray([m for _, m in runs])
    unit_byte = measured.byte_s or 1e-10
    units = ({"tick_s": 1.0}, {"send_s": 1.0}, {"byte_s": unit_byte})
    zero = dataclasses.replace(measured, tick_s=0.0, send_s=0.0, byte_s=0.0, residual=())
    base = np.asarray([predicted_step(pipe, zero) for pipe, _ in runs])
    features = np.stack([
        np.asarray([predicted_step(pipe, dataclasses.replace(zero, **unit)) for pipe, _ in runs]) - base
        for unit in units
    ], axis=1) / steps[:, None]
    target = (steps - base) / steps
    direct = {1: measured.send_s, 2: 1.0}  # send_s and byte_s (in units of the measured rate) as measured
    fixed: dict[int, float] = {}
    while True:
        free = [c for c in range(3) if c not in fixed]
        solution = np.zeros(3)
        solution[list(fixed)] = list(fixed.values())
        solution[free] = _nonnegative_least_squares(features[:, free], target - features @ solution)
        unseparated = [c for c in free if c in direct and solution[c] == 0.0]
        if not unseparated:
            break
        fixed.update({c: direct[c] for c in unseparated})
    error = features @ solution - target
    tick_s, send_s, byte_scale = (float(x) for x in solution)
    return dataclasses.replace(measured, tick_s=tick_s, send_s=send_s, byte_s=byte_scale * unit_byte,
                               residual=tuple(error))


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin |a x - b|`` over ``x >= 0``: the best unconstrained solution on each subset of columns."""
    best = np.zeros(a.shape[1])
    for subset in range(1, 2 ** a.shape[1]):
        keep = [k for k in range(a.shape[1]) if subset >> k & 1]
        x = np.zeros(a.shape[1])
        x[keep] = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
        if np.all(x >= 0) and np.sum((a @ x - b) ** 2) < np.sum((a @ best - b) ** 2):
            best = x
    return best


def calibrate(mesh_shape: tuple[int, int] = (1, 2), *, cache: str | os.PathLike | None = None,
              steps: int = 8, warmup: int = 2, verbose: bool = False) -> Calibration:
    """Measures the executor's overheads on this machine (every process must call it).

    Times the per-flop, per-byte-moved and per-byte-sent rates directly,
    then trains the probe pipelines (``_probes``) on ``mesh_shape`` with
    their layers' profiled costs, times ``steps`` steps each after
    ``warmup``, and fits ``tick_s`` (``fit``). About two minutes on 2 CPU
    processes.

    Args:
      mesh_shape: ``(data, pipe)`` of the probes: calibrate with the pipe
        size and processes the pipelines will use.
      cache: a JSON path. A calibration there for the same device kind, pipe
        size and process count is returned without measuring; otherwise the
        new one is saved there (by process 0).
      steps, warmup: timed and untimed steps per probe.
      verbose: print each probe's measured and fitted step.

    Returns:
      The ``Calibration``.
    """
    import optax

    from .pipeline import Pipeline
    from .profile import profile

    device = jax.devices()[0].device_kind
    num_devices = int(mesh_shape[1])
    if cache is not None and os.path.exists(cache):
        try:
            cached = Calibration.load(cache)
        except ValueError:
            cached = None
        if cached is not None and (cached.device, cached.num_devices, cached.process_count) == (
                device, num_devices, jax.process_count()):
            return cached
    from .mesh import make_mesh

    rates = np.asarray([matmul_seconds_per_flop(), moved_seconds_per_byte(),
                        sent_seconds_per_byte(make_mesh(mesh_shape))], np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rates = np.asarray(multihost_utils.broadcast_one_to_all(rates.astype(np.float32)), np.float64)
    flop_s, byte_s, send_s = (float(r) for r in rates)
    measured = Calibration(0.0, send_s, byte_s, flop_s, device, num_devices, jax.process_count())
    rng = np.random.default_rng(0)
    runs = []
    for name, (model_fn, rows, width, schedule) in _probes(num_devices).items():
        num_mb = 8 * num_devices if name == "ticks" else 2 * num_devices
        batch = tuple(rng.normal(size=(num_mb * rows, width)).astype(np.float32) for _ in range(2))
        costs = profile(model_fn, batch[0], rows, repeats=5, warmup=2, loss_fn=_mse, sample_targets=batch[1])
        pipe = Pipeline(model_fn, mesh_shape, _mse, optax.sgd(1e-6), num_mb, batch,
                        schedule=schedule, costs=costs)
        runs.append((pipe, _measure(pipe, batch, steps, warmup)))
    result = fit(runs, measured)
    if verbose and jax.process_index() == 0:
        for (pipe, measured), name, error in zip(runs, _probes(num_devices), result.residual):
            print(f"  probe {name}: measured {measured * 1e3:.1f} ms, fitted {measured * (1 + error) * 1e3:.1f} ms")
        print(result)
    if cache is not None and jax.process_index() == 0:
        result.save(cache)
    return result
