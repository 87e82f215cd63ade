"""Guards on what callers pass to a ``Pipeline``: batches, states, the loss.

A batch must be a pair ``(inputs, targets)`` whose leaves share their rows,
a multiple of ``D * M`` (``check_batch``, ``batch_rows``); after the build it
must have the example batch's structure and, leaf by leaf, its
per-row shape and dtype (a shorter sequence would otherwise be zero-padded
on the wire); a state must be this pipeline's and not donated to an earlier
step (reusing a donated buffer crashes the process). Each check names the
leaf, what it is and what it should be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def batch_signature(inputs: Any, targets: Any) -> Any:
    """The per-row shape and dtype of every leaf of ``(inputs, targets)``, as shape structs."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jax.dtypes.canonicalize_dtype(_dtype(a))), (inputs, targets)
    )


def check_batch_like(signature: Any, inputs: Any, targets: Any, lead: tuple[int, ...]) -> None:
    """Raises if a batch's leaves differ from ``signature`` (``batch_signature`` of the example).

    Args:
      signature: the example batch's ``batch_signature``.
      inputs: the batch's inputs.
      targets: the batch's targets.
      lead: the leading dimensions every leaf must have before its per-row
        shape: ``(R,)`` for a global batch, ``(D, M, B)`` for a placed one.

    Raises:
      ValueError: naming the first leaf whose structure, shape or dtype
        differs, with the expected and the given shape and dtype.
    """
    given = (inputs, targets)
    if jax.tree.structure(given) != jax.tree.structure(signature):
        raise ValueError(
            f"the batch's structure {jax.tree.structure(given)} differs from the example batch's "
            f"{jax.tree.structure(signature)}; every batch must have the example batch's leaves"
        )
    for (path, want), leaf in zip(jax.tree_util.tree_leaves_with_path(signature), jax.tree.leaves(given)):
        shape, dtype = tuple(np.shape(leaf)), jax.dtypes.canonicalize_dtype(_dtype(leaf))
        if shape != lead + want.shape or dtype != want.dtype:
            name = ("inputs", "targets")[path[0].idx] + jax.tree_util.keystr(path[1:])
            raise ValueError(
                f"batch leaf {name} is {dtype}{list(shape)}, but this pipeline was built for "
                f"{want.dtype}{list(lead + want.shape)} (the example batch's shape and dtype); give "
                "batches shaped like the example batch"
            )


def check_state_like(expected: Any, given: Any, what: str) -> None:
    """Raises if ``given`` (a state or its params) is donated or shaped unlike ``expected``.

    Args:
      expected: the pipeline's state or params as shape structs.
      given: what the caller passed.
      what: its name in messages, e.g. ``"state"``.

    Raises:
      ValueError: if a leaf's buffer was donated to an earlier step, or the
        structure or a leaf's shape or dtype is not this pipeline's.
    """
    leaves = jax.tree_util.tree_leaves_with_path(given)
    donated = [path for path, leaf in leaves if _deleted(leaf)]
    if donated:
        raise ValueError(
            f"{what} was donated to an earlier train_step (its buffer {what}{jax.tree_util.keystr(donated[0])} now "
            "belongs to the state that call returned); pass the state the last train_step returned: "
            "state, loss = pipe.train_step(state, batch)"
        )
    if jax.tree.structure(given) != jax.tree.structure(expected):
        raise ValueError(
            f"{what} is not a state of this Pipeline: its structure {jax.tree.structure(given)} differs from "
            f"{jax.tree.structure(expected)}; use the state this Pipeline's init, train_step or from_layers "
            "returned (move a state between pipelines with to_layers and from_layers)"
        )
    for (path, leaf), want in zip(leaves, jax.tree.leaves(expected)):
        shape, dtype = tuple(np.shape(leaf)), _dtype(leaf)
        if shape != want.shape or dtype != want.dtype:
            raise ValueError(
                f"{what} is not a state of this Pipeline: {what}{jax.tree_util.keystr(path)} is "
                f"{dtype}{list(shape)}, this Pipeline's is {want.dtype}{list(want.shape)}; use the state this "
                "Pipeline's init, train_step or from_layers returned (move a state between pipelines with "
                "to_layers and from_layers)"
            )


def _deleted(leaf: Any) -> bool:
    """Whether ``leaf`` is an array whose buffer is gone (a tracer, under ``jit``, is not)."""
    try:
        return isinstance(leaf, jax.Array) and leaf.is_deleted()
    except jax.errors.ConcretizationTypeError:
        return False


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def check_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, or a TypeError."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "each batch must be a pair (inputs, targets) of arrays or pytrees of "
            f"arrays, got {type(batch).__name__}"
        )
    return batch[0], batch[1]


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


def batch_rows(inputs: Any, targets: Any, num_replicas: int, num_microbatches: int) -> int:
    """R, the rows of a batch, checked to agree between inputs and targets and to divide into ``D * M``."""
    rows = check_rows(inputs, "inputs")
    if check_rows(targets, "targets") != rows:
        raise ValueError(
            f"inputs have {rows} rows but targets have {check_rows(targets, 'targets')}; "
            "they must match"
        )
    per_step = num_replicas * num_microbatches
    if rows == 0:
        raise ValueError(
            f"the global batch has 0 rows; give at least data={num_replicas} x num_microbatches="
            f"{num_microbatches} = {per_step} rows (one per micro-batch), a multiple of {per_step}"
        )
    if rows % per_step:
        raise ValueError(
            f"the global batch has {rows} rows, which does not divide into "
            f"data={num_replicas} replicas x num_microbatches="
            f"{num_microbatches}; use a batch of a multiple of {per_step} rows"
        )
    return rows


def check_loss(loss_fn: Callable, outputs: Any, targets: Any) -> None:
    """Raises a ValueError unless ``loss_fn`` maps one micro-batch's outputs and targets to a float scalar."""
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
