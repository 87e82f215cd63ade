"""Measured per-layer costs: forward and backward time on the current device.

The balanced planner cuts the layer line by time, so it needs each layer's
forward and backward time on one micro-batch, measured where the pipeline will
run (``docs/design.md``, "Fractional (row-split) cuts"). ``profile`` runs every
layer on a real micro-batch (the outputs of the layers before it), times a
jitted forward and a jitted backward (the vjp given the forward's residuals)
with ``warmup`` untimed calls then the median of ``repeats`` timed ones, and
records XLA's flop estimate, parameter bytes and output bytes beside them.
It times each layer again at fewer rows (``piece_fractions`` of a
micro-batch), since a fractional cut runs a split layer's pieces on part of
the rows and a matmul on fewer rows is less efficient per row
(``Profile.piece_scale``).
Identical layers are measured once. A ``Profile`` saves to and loads from
JSON, so costs can be cached and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .costs import layer_flops
from .layers import LayerSpec, apply_layer, split_layers
from .tracing import keep_costly, trace_boundaries


PROFILE_FORMAT = 3  # 3: piece rows timed; the last backward at least the backward without the loss
PIECE_FRACTIONS = (0.25, 0.5, 0.75)  # of a micro-batch's rows, for the pieces of split layers


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Costs of one layer on one micro-batch.

    Attributes:
      index: position of the layer in the model's layer list.
      name: the layer's class name.
      forward_s: median wall seconds of the jitted forward.
      backward_s: median wall seconds of the jitted backward: the vjp with
        respect to the parameters and the float inputs (the first layer: the
        parameters only, as every executor runs it), given the forward's
        residuals (no recomputation of the forward).
      flops: XLA's estimate of forward + backward flops, or ``None``.
      param_bytes: bytes of the layer's parameters.
      activation_bytes: bytes of the layer's output for one micro-batch.
      piece_forward_s: forward seconds at each of ``Profile.piece_rows``
        rows (empty: not measured, e.g. outputs without rows first).
      piece_backward_s: backward seconds at each of them.
    """

    index: int
    name: str
    forward_s: float
    backward_s: float
    flops: float | None
    param_bytes: int
    activation_bytes: int
    piece_forward_s: tuple[float, ...] = ()
    piece_backward_s: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Profile:
    """Per-layer costs of a model on one device, for micro-batches of a given size.

    Attributes:
      layers: one ``LayerCost`` per layer, in order.
      microbatch_rows: rows per micro-batch the costs were measured with.
      device: the device kind measured on, e.g. ``"cpu"`` or ``"NVIDIA H100 80GB HBM3"``.
      with_loss: whether the last layer's backward includes the loss and
        its gradient (``profile(..., loss_fn=...)``), as the executor's
        last stage runs them.
      piece_rows: the fewer row counts each layer was timed at, ascending.
    """

    layers: tuple[LayerCost, ...]
    microbatch_rows: int
    device: str
    with_loss: bool = False
    piece_rows: tuple[int, ...] = ()

    def forward(self) -> np.ndarray:
        """``[L]`` forward seconds per layer."""
        return np.asarray([c.forward_s for c in self.layers], dtype=np.float64)

    def backward(self) -> np.ndarray:
        """``[L]`` backward seconds per layer."""
        return np.asarray([c.backward_s for c in self.layers], dtype=np.float64)

    def total(self) -> np.ndarray:
        """``[L]`` forward + backward seconds per layer."""
        return self.forward() + self.backward()

    def piece_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``[L, B + 1]`` forward and backward cost of a piece of ``r`` rows, as a fraction of the layer's.

        Linear between the measured row counts (``piece_rows`` and B) and
        through zero below the smallest; ``r / B`` for a layer without
        piece times. A fractional cut prices a piece by it instead of by
        its share of rows (``partition.stage_loads``).
        """
        B = self.microbatch_rows
        r = np.arange(B + 1, dtype=np.float64)

        def scale(full: float, pieces: tuple) -> np.ndarray:
            if len(pieces) != len(self.piece_rows) or not pieces or full <= 0:
                return r / B
            return np.interp(r, [0.0, *self.piece_rows, B], [0.0, *(t / full for t in pieces), 1.0])

        return (np.stack([scale(c.forward_s, c.piece_forward_s) for c in self.layers]),
                np.stack([scale(c.backward_s, c.piece_backward_s) for c in self.layers]))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the profile to ``path`` as JSON."""
        layers = [dataclasses.asdict(c) for c in self.layers]
        with open(path, "w") as f:
            json.dump({"format": PROFILE_FORMAT, "microbatch_rows": self.microbatch_rows, "device": self.device,
                       "with_loss": self.with_loss, "piece_rows": list(self.piece_rows), "layers": layers},
                      f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Reads a profile written by ``save``.

        Raises:
          ValueError: if the file is not a saved profile, or one of an older
            format (measured differently: profile again).
        """
        with open(path) as f:
            try:
                data = json.load(f)
                layers = tuple(
                    LayerCost(**{**c, "piece_forward_s": tuple(c.get("piece_forward_s", ())),
                                 "piece_backward_s": tuple(c.get("piece_backward_s", ()))})
                    for c in data["layers"]
                )
                profile = cls(layers, int(data["microbatch_rows"]), str(data["device"]),
                              bool(data.get("with_loss", False)), tuple(int(r) for r in data.get("piece_rows", ())))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{os.fspath(path)} is not a saved jaxpipe Profile: {err}") from err
        if data.get("format", 1) != PROFILE_FORMAT:
            raise ValueError(
                f"{os.fspath(path)} holds a profile of format {data.get('format', 1)}, this jaxpipe reads "
                f"format {PROFILE_FORMAT} (format 3 times pieces at fewer rows and never prices the last "
                "backward with its loss below it without; format 2 the first layer's backward without the "
                "input gradient); profile the model again"
            )
        return profile

    def __str__(self) -> str:
        head = f"{'layer':>5}  {'name':<16}{'fwd ms':>10}{'bwd ms':>10}{'GFLOP':>10}{'param MB':>10}{'act MB':>10}"
        lines = [f"Profile on {self.device}, {self.microbatch_rows} rows per micro-batch", head]
        for c in self.layers:
            gflop = "n/a" if c.flops is None else f"{c.flops / 1e9:.4f}"
            lines.append(
                f"{c.index:>5}  {c.name[:15]:<16}{c.forward_s * 1e3:>10.3f}{c.backward_s * 1e3:>10.3f}"
                f"{gflop:>10}{c.param_bytes / 1e6:>10.3f}{c.activation_bytes / 1e6:>10.3f}"
            )
        flops = [c.flops for c in self.layers]
        total_flops = "n/a" if None in flops else f"{sum(flops) / 1e9:.4f}"
        lines.append(
            f"{'total':>5}  {'':<16}{self.forward().sum() * 1e3:>10.3f}{self.backward().sum() * 1e3:>10.3f}"
            f"{total_flops:>10}{sum(c.param_bytes for c in self.layers) / 1e6:>10.3f}{'':>10}"
        )
        return "\n".join(lines)


def _time(fn: Callable, args: tuple, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn(*args)``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def _nbytes(tree: Any) -> int:
    return int(sum(np.prod(a.shape, dtype=np.int64) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def _is_float(a: Any) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating)


def _layer_key(spec: LayerSpec, params: Any, x: Any) -> tuple:
    """What makes two layers interchangeable: class, code, shapes and constant state."""
    rest = [
        (np.shape(a), str(np.asarray(a).dtype), hashlib.sha1(np.asarray(a).tobytes()).hexdigest())
        for a in jax.tree.leaves(spec.rest)
    ]
    x = str(jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), x))
    dtypes = tuple(str(leaf.dtype) for leaf in jax.tree.leaves(params))
    return (spec.name, spec.shapes, dtypes, x, repr(spec.graphdef), str(rest))


def _compile(spec: LayerSpec, x: Any, input_grad: bool) -> tuple[Callable, Callable, Callable]:
    """Jitted ``forward(params, x) -> out``, ``residuals(params, floats, ints) ->
    (float outputs, vjp)`` (``floats``, ``ints``: the float and other leaves of
    ``x``) and ``backward(vjp, cotangents) -> (d params, d floats)``, or ``d
    params`` alone without ``input_grad``."""
    leaves, treedef = jax.tree.flatten(x)
    is_float = [_is_float(leaf) for leaf in leaves]

    def merged(floats, ints):
        fl, it = iter(floats), iter(ints)
        return jax.tree.unflatten(treedef, [next(fl) if f else next(it) for f in is_float])

    def residuals(params, floats, ints):
        def float_out(p, f):
            return [o for o in jax.tree.leaves(apply_layer(spec, p, merged(f, ints))) if _is_float(o)]

        if input_grad:
            return jax.vjp(keep_costly(float_out), params, floats)
        return jax.vjp(keep_costly(lambda p: float_out(p, floats)), params)

    forward = jax.jit(lambda p, x_: apply_layer(spec, p, x_))
    backward = jax.jit(lambda vjp, cotangents: vjp(cotangents))
    return forward, jax.jit(residuals), backward


def _fused_last(spec: LayerSpec, loss_fn: Callable, input_grad: bool) -> Callable:
    """Jitted ``(params, x, targets) -> gradients`` of the loss through the last layer, as one program."""
    def loss(p, x, targets):
        return loss_fn(apply_layer(spec, p, x), targets)

    def grads(p, x, targets):
        if input_grad:
            return jax.grad(keep_costly(loss), argnums=(0, 1))(p, x, targets)
        return jax.grad(keep_costly(loss))(p, x, targets)

    return jax.jit(grads)


def _rows(tree: Any, rows: int) -> Any:
    return jax.tree.map(lambda a: a[:rows], tree)


def _has_rows(tree: Any, rows: int) -> bool:
    return all(np.ndim(a) > 0 and np.shape(a)[0] == rows for a in jax.tree.leaves(tree))


def _measure(compiled: tuple, params: Any, x: Any, warmup: int, repeats: int) -> tuple[float, float]:
    """Median forward and backward seconds of a layer (``_compile``'s functions) on input ``x``."""
    forward, residuals, backward = compiled
    leaves = jax.tree.leaves(x)
    outs, vjp = residuals(params, [a for a in leaves if _is_float(a)], [a for a in leaves if not _is_float(a)])
    cotangents = [jnp.asarray(np.ones(o.shape, o.dtype)) for o in outs]
    return _time(forward, (params, x), warmup, repeats), _time(backward, (vjp, cotangents), warmup, repeats)


def _check(microbatch_rows: int, sample: Any, repeats: int, warmup: int) -> None:
    for name, value, low in (("microbatch_rows", microbatch_rows, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    leaves = jax.tree.leaves(sample)
    if not leaves:
        raise ValueError("sample_inputs is empty; give one batch of model inputs, [rows, ...]")
    for path, leaf in jax.tree_util.tree_leaves_with_path(sample):
        shape = np.shape(leaf)
        if not shape or shape[0] < microbatch_rows:
            at = jax.tree_util.keystr(path)
            raise ValueError(
                f"sample_inputs has a leaf{' at ' + at if at else ''} of shape {tuple(shape)}; "
                f"every leaf needs at least microbatch_rows={microbatch_rows} rows first"
            )


def profile(
    layers: Sequence[nnx.Module] | Callable[[nnx.Rngs], Sequence[nnx.Module]],
    sample_inputs: Any,
    microbatch_rows: int,
    *,
    repeats: int = 5,
    warmup: int = 2,
    cache: str | os.PathLike | None = None,
    seed: int = 0,
    loss_fn: Callable | None = None,
    sample_targets: Any = None,
    piece_fractions: Sequence[float] = PIECE_FRACTIONS,
) -> Profile:
    """Measures each layer's forward and backward time on one micro-batch.

    Layer ``i`` runs on the output of layers ``0..i-1`` applied to the first
    ``microbatch_rows`` rows of ``sample_inputs``, so its input values are
    realistic and integer inputs stay integers. Its forward ``(params, x) ->
    out`` and its backward (the vjp of its float outputs with respect to its
    parameters and float inputs, cotangent ones, given the forward's
    residuals saved under the executors' ``tracing.keep_costly`` policy; the
    first layer's with respect to its parameters only, since no executor
    computes the model input's gradient) are jitted and timed on the default device: ``warmup`` untimed
    calls, then the median of ``repeats`` timed ones. Layers with the same
    class, code, parameter shapes, constant state and input shapes are
    measured once and share their costs.

    Args:
      layers: the model's layers in order (what a ``model_fn`` returns), or a
        ``model_fn`` ``(nnx.Rngs) -> list[nnx.Module]``, called with
        ``nnx.Rngs(seed)``.
      sample_inputs: one batch of model inputs, an array or pytree whose
        leaves are ``[rows, ...]`` with ``rows >= microbatch_rows``.
      microbatch_rows: B, rows per micro-batch.
      repeats: timed calls per measurement (>= 1).
      warmup: untimed calls before timing (>= 0); compilation happens before.
      cache: a JSON file path. If it holds a profile of the same layers
        (names, parameter and output bytes), rows and device kind, it is
        returned without measuring; otherwise the new profile is saved there.
      seed: seed for ``model_fn``'s ``nnx.Rngs`` when ``layers`` is one.
      loss_fn: ``(outputs, targets) -> []``; with ``sample_targets`` (the
        targets of ``sample_inputs``' rows), the last layer's backward is
        timed as the executor's last stage runs it: its forward, the loss
        and both gradients in one program, less its forward time, but never
        less than its backward without the loss (the difference of two
        timings is noisy; XLA fuses an LM head's log-softmax into the
        head's backward, so timing the loss apart over-prices it).
      sample_targets: targets for ``loss_fn``, ``[rows, ...]`` leaves.
      piece_fractions: fractions of ``microbatch_rows`` to time every layer
        at again (rounded, at least one row; ``()``: none), for the pieces
        a fractional cut runs (``Profile.piece_scale``).

    Returns:
      The ``Profile``: per-layer seconds, flops, parameter and output bytes.

    Raises:
      TypeError: if ``layers`` is neither a list of ``nnx.Module`` nor a
        ``model_fn``, or an integer argument is not an int.
      ValueError: if there are no layers, ``microbatch_rows``, ``repeats``,
        ``warmup`` or a piece fraction (in (0, 1)) is out of range, the sample has fewer rows than
        ``microbatch_rows``, or a layer fails on its input.
    """
    if callable(layers) and not isinstance(layers, (nnx.Module, Sequence)):
        layers = layers(nnx.Rngs(seed))
    if isinstance(layers, (str, bytes, nnx.Module)) or not isinstance(layers, Sequence):
        raise TypeError(
            "layers must be a list of nnx.Module layers in order, or a model_fn "
            f"returning one, got {type(layers).__name__}"
        )
    if not layers:
        raise ValueError("layers is empty; give the model's non-empty list of nnx.Module layers")
    _check(microbatch_rows, sample_inputs, repeats, warmup)
    bad = [f for f in piece_fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1]
    if bad:
        raise ValueError(f"piece_fractions={tuple(piece_fractions)}: {bad} are not in (0, 1); e.g. (0.25, 0.5)")
    piece_rows = tuple(sorted({max(1, round(f * microbatch_rows)) for f in piece_fractions} - {microbatch_rows}))
    with_loss = loss_fn is not None
    if with_loss and sample_targets is None:
        raise ValueError("profile(loss_fn=...) needs sample_targets, the targets of sample_inputs' rows")
    specs, params, _ = split_layers(layers)
    x = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:microbatch_rows]), sample_inputs)
    structs = trace_boundaries(specs, params, x)
    device = jax.devices()[0].device_kind
    param_bytes = [_nbytes(p) for p in params]
    act_bytes = [_nbytes(s) for s in structs[1:]]

    if cache is not None and os.path.exists(cache):
        try:
            cached = Profile.load(cache)
        except ValueError:
            cached = None
        if cached is not None and (
            (cached.microbatch_rows, cached.with_loss, cached.device, cached.piece_rows)
            == (microbatch_rows, with_loss, device, piece_rows)
            and [(c.name, c.param_bytes, c.activation_bytes) for c in cached.layers]
            == [(s.name, pb, ab) for s, pb, ab in zip(specs, param_bytes, act_bytes)]
        ):
            return cached

    measured: dict[tuple, tuple] = {}
    costs = []
    for index, (spec, p, struct, pb, ab) in enumerate(zip(specs, params, structs, param_bytes, act_bytes)):
        input_grad = index > 0
        key = (*_layer_key(spec, p, struct), input_grad)
        if key not in measured:
            compiled = _compile(spec, struct, input_grad)
            fwd_s, bwd_s = _measure(compiled, p, x, warmup, repeats)
            pieces = [_measure(compiled, p, _rows(x, r), warmup, repeats) for r in piece_rows] \
                if _has_rows(x, microbatch_rows) else []
            measured[key] = (compiled[0], fwd_s, bwd_s, layer_flops(spec, p, struct, input_grad), pieces)
        # An identical layer's compiled forward serves: same code and constants.
        forward, fwd_s, bwd_s, flops, pieces = measured[key]
        costs.append(LayerCost(spec.index, spec.name, fwd_s, bwd_s, flops, pb, ab,
                               tuple(f for f, _ in pieces), tuple(b for _, b in pieces)))
        x_last, x = x, forward(p, x)
    if with_loss:
        targets = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:microbatch_rows]), sample_targets)
        fused, last = _fused_last(specs[-1], loss_fn, input_grad=len(specs) > 1), costs[-1]

        def with_loss_s(rows: int, forward_s: float, backward_s: float) -> float:
            fused_s = _time(fused, (params[-1], _rows(x_last, rows), _rows(targets, rows)), warmup, repeats)
            return max(backward_s, fused_s - forward_s)

        costs[-1] = dataclasses.replace(
            last, backward_s=with_loss_s(microbatch_rows, last.forward_s, last.backward_s),
            piece_backward_s=tuple(with_loss_s(r, f, b) for r, f, b in
                                   zip(piece_rows, last.piece_forward_s, last.piece_backward_s)),
        )
    result = Profile(tuple(costs), microbatch_rows, device, with_loss, piece_rows)
    if cache is not None:
        result.save(cache)
    return result
