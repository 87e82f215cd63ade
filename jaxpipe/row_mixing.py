"""Whether a layer's output rows depend on other rows: the probe behind fractional cuts.

A fractional cut runs a layer on a block of a micro-batch's rows on one
device and on the other rows on the next. That is exact only if every output
row depends on its own input row alone (dense layers, attention within a
row, convolutions, embeddings, layer norm over features); a layer that
centres over the batch, subtracts a row from the others, sums over rows or
gathers rows by index must stay whole.

The check is numerical and cannot pass by accident on degenerate inputs:

* every input row is random: float leaves normal, integer leaves uniform over
  the range of values the example batch holds (valid token ids stay valid:
  an id below the example's largest is below the vocabulary size), with the
  first element of each row set so that rows differ (all of them where the
  range has as many values as there are rows);
* the layer runs on the whole micro-batch and on each row alone, and every
  row of every output leaf must agree;
* it runs with the layer's parameters and again with perturbed ones, so a
  mixing term whose weight starts at zero (a zero-initialised gate) is found.

A layer that fails on a single row, or returns other than one output row per
input row, counts as mixing (it cannot be split). Limit: a layer whose only
input is one integer per row, with fewer distinct values in the example than
rows, can reorder equal rows unseen (no input could show it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .layers import LayerSpec, apply_layer


def probe_input(x: Any, rows: int, rng: np.random.Generator) -> Any:
    """A random input of ``rows`` rows shaped like ``x``'s leaves, different in every row.

    Args:
      x: the layer's input: arrays (integer leaves give the range of valid
        values) or shape structs (integers then drawn from ``{0, 1}``).
      rows: B, rows of the probe.
      rng: the random generator.

    Returns:
      A pytree of NumPy arrays with ``[B, ...]`` leaves.
    """

    def leaf(a):
        shape, dtype = (rows,) + tuple(a.shape[1:]), np.dtype(a.dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            return rng.normal(size=shape).astype(dtype)
        if dtype == np.bool_:
            low, high = 0, 1
        elif isinstance(a, (np.ndarray, jax.Array)) and a.size:
            low, high = int(np.min(a)), int(np.max(a))
        else:
            low, high = 0, 1
        if high == low:
            low, high = max(low - 1, 0), max(low - 1, 0) + 1
        values = rng.integers(low, high + 1, size=shape)
        if values.ndim and values.size:
            values.reshape(rows, -1)[:, 0] = low + _distinct_firsts(high - low + 1, rows, rng)
        return values.astype(dtype)

    return jax.tree.map(leaf, x)


def _distinct_firsts(values: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows]`` offsets in ``[0, values)`` for each row's first element.

    All different when there are enough values (then no reordering of rows
    leaves the input unchanged); otherwise non-decreasing and not constant
    (never its own reversal or rotation, and every row differs from some other).
    """
    if values >= rows:
        return rng.permutation(values)[:rows]
    return np.arange(rows) * values // rows


def _perturbed(params: Any, rng: np.random.Generator) -> Any:
    def leaf(p):
        p = np.asarray(p)
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        scale = float(np.std(p.astype(np.float32))) + 0.1 if p.size else 1.0
        return (p + scale * rng.normal(size=p.shape)).astype(p.dtype)

    return jax.tree.map(leaf, params)


def _agree(whole: Any, rows_alone: Any, rows: int) -> bool:
    """Whether the per-row run gives the whole run's leaves, every row, up to float rounding."""
    a_leaves, b_leaves = jax.tree.leaves(whole), jax.tree.leaves(rows_alone)
    if jax.tree.structure(whole) != jax.tree.structure(rows_alone):
        return False
    for a, b in zip(a_leaves, b_leaves):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 0 or a.shape[0] != rows or a.shape != b.shape:
            return False
        if jnp.issubdtype(a.dtype, jnp.inexact):
            tol = max(1e-4, 16 * float(jnp.finfo(a.dtype).eps))
            wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
            finite = np.abs(wide_a[np.isfinite(wide_a)])
            scale = max(1.0, float(finite.max())) if finite.size else 1.0
            if not np.allclose(wide_b, wide_a, rtol=tol, atol=tol * scale, equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return True


def _whole_and_row_by_row(spec: LayerSpec):
    """``(params, x) -> (whole, rows alone)``: the layer on ``x`` and on each row of it as a one-row batch."""

    def whole(params, x):
        return apply_layer(spec, params, x)

    def one(params, row):
        return whole(params, jax.tree.map(lambda a: a[None], row))

    both = jax.jit(lambda p, x: (whole(p, x), jax.vmap(one, in_axes=(None, 0))(p, x)))
    apart, single = jax.jit(whole), jax.jit(one)

    def run(params, x):
        try:
            out, alone = both(params, x)
        except Exception:  # noqa: BLE001 - no batching rule: run the rows one by one
            rows = jax.tree.leaves(x)[0].shape[0]
            out = apart(params, x)
            outs = [single(params, jax.tree.map(lambda a: a[i], x)) for i in range(rows)]
            alone = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
        if any(a.ndim < 2 or a.shape[1] != 1 for a in jax.tree.leaves(alone)):
            raise ValueError("the layer does not return one output row per input row")
        return out, jax.tree.map(lambda a: a[:, 0], alone)

    return run


def probe_layer(spec: LayerSpec, params: Any, x: Any, rows: int, rng: np.random.Generator) -> tuple[bool, Any]:
    """Whether one layer mixes rows, and its output on the probe (for the next layer's probe).

    Args:
      spec: the layer.
      params: its parameter tree.
      x: its input (arrays or shape structs; see ``probe_input``).
      rows: B, rows per micro-batch.
      rng: the random generator.

    Returns:
      ``(mixes, output)``: ``output`` is the layer on the probe input with its
      own parameters, or ``None`` if it failed.
    """
    probe = probe_input(x, rows, rng)
    run = _whole_and_row_by_row(spec)
    output = None
    for variant in (params, _perturbed(params, rng)):
        try:
            whole, alone = run(variant, probe)
        except Exception:  # noqa: BLE001 - a layer that fails on one row cannot be split
            return True, output
        output = whole if output is None else output
        if not _agree(whole, alone, rows):
            return True, output
    return False, output


def mixes_rows(spec: LayerSpec, params: Any, x: Any, seed: int = 0, rows: int | None = None) -> bool:
    """Whether a layer's output rows depend on other rows of its input.

    Args:
      spec: the layer.
      params: its parameter tree.
      x: its input, ``[B, ...]`` leaves: shape structs, or arrays whose
        integer leaves give the range of valid values.
      seed: NumPy seed for the random probe.
      rows: B; default ``x``'s leading dimension.

    Returns:
      True if the rows mix (the layer must not be split), False otherwise.
    """
    rows = jax.tree.leaves(x)[0].shape[0] if rows is None else rows
    if rows < 2:
        return False
    return probe_layer(spec, params, x, rows, np.random.default_rng(seed))[0]


def mixing_layers(
    specs: Sequence[LayerSpec], params: Sequence[Any], inputs: Any, rows: int, seed: int = 0
) -> tuple[int, ...]:
    """The layers whose output rows depend on other rows, probed one after the other.

    Each layer's probe takes its integer value ranges from the previous
    layer's output on its probe (the first from ``inputs``), so token ids
    carried through the model stay valid.

    Args:
      specs: the layers.
      params: their parameter trees.
      inputs: the model's example inputs (arrays; integer leaves give the
        valid ranges), or shape structs.
      rows: B, rows per micro-batch.
      seed: NumPy seed for the probes.

    Returns:
      The indices of the layers that mix rows, ascending.
    """
    if rows < 2:
        return ()
    rng = np.random.default_rng(seed)
    mixing, x = [], inputs
    for i, (spec, p) in enumerate(zip(specs, params)):
        mixes, out = probe_layer(spec, p, x, rows, rng)
        if mixes:
            mixing.append(i)
        x = out if out is not None else jax.eval_shape(lambda v, p=p, spec=spec: apply_layer(spec, p, v), x)
    return tuple(mixing)
