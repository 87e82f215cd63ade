"""Trained layers from a checkpoint, on one device: no mesh, no pipeline.

Checkpoints store parameters per layer (``checkpoint.py``), independent of
the mesh, schedule and cut that trained them, so inference needs only the
model: ``model_fn`` builds the layers (their structure and non-parameter
constants) and the checkpoint fills in the parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .checkpoint import Checkpoints, _check_layers, layers_meta
from .layers import merge_layers, model_graph, split_layers


def load_layers(
    model_fn: Callable[[nnx.Rngs], Sequence[nnx.Module]],
    checkpoint_dir: str | os.PathLike,
    step: int | None = None,
    seed: int = 0,
) -> list[nnx.Module]:
    """The layers ``model_fn`` builds, with the parameters of a checkpoint.

    Args:
      model_fn: ``(nnx.Rngs) -> list[nnx.Module]``, the function that built
        the trained model.
      checkpoint_dir: the folder ``jaxpipe.train`` (or ``Checkpoints.save``)
        wrote.
      step: which checkpoint; default the newest complete one.
      seed: seed of the ``nnx.Rngs`` given to ``model_fn``; only
        non-parameter state (constants) depends on it.

    Returns:
      The layers, as ``model_fn`` returns them, with the checkpoint's
      parameters (in the dtype they were trained in) on JAX's default device;
      equal to ``TrainResult.layers`` of the run that saved it (objects the
      layers shared, such as tied weights, shared again).

    Raises:
      ValueError: if ``checkpoint_dir`` is not a folder, holds no such
        checkpoint, or holds another model (layer count, names or parameter
        shapes).
      TypeError: as ``Pipeline`` for layers it cannot train.
    """
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path (str or os.PathLike), got {type(checkpoint_dir).__name__}")
    directory = os.path.abspath(os.fspath(checkpoint_dir))
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint_dir={directory!r} is not a folder; give the folder training saved to")
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    layers = model_fn(nnx.Rngs(seed))
    specs, _, _ = split_layers(layers)
    store = Checkpoints(directory, keep=None)
    try:
        saved, params = store.read_params(step)
        where = store.info(step).path
    finally:
        store.close()
    _check_layers(saved, layers_meta(specs), where)
    return merge_layers(model_graph(layers), [
        jax.tree.unflatten(spec.own_structure, [jnp.asarray(leaf) for leaf in leaves])
        for spec, leaves in zip(specs, params)
    ])
