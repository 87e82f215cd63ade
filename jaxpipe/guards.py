"""Guards on what callers pass to a built ``Pipeline``: batches and states.

A batch must have the example batch's structure and, leaf by leaf, its
per-row shape and dtype (a shorter sequence would otherwise be zero-padded
on the wire); a state must be this pipeline's and not donated to an earlier
step (reusing a donated buffer crashes the process). Each check names the
leaf, what it is and what it should be.
"""

from __future__ import annotations

from typing import Any

import jax
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
