"""Placing batches on the mesh: one global batch, or each process's own rows.

A global batch of ``R`` rows is laid out as ``[D, M, B, ...]``: data replica
``d`` trains on rows ``[d * R / D, (d + 1) * R / D)``, its micro-batch ``m``
on the ``m``-th ``B`` of them.

Per-process data (``Pipeline.shard_batch(batch, per_process=True)``,
``jaxpipe.train(..., data_per_process=True)``): each process passes only the
rows of the data replicas its devices belong to, and the global array is
assembled with ``jax.make_array_from_process_local_data``, so no host holds
all rows. ``data_shard`` says which rows those are: the processes fall into
``count`` groups, group ``index`` holding replicas
``[index * D / count, (index + 1) * D / count)``, so a process passes global
rows ``[index * R / count, (index + 1) * R / count)``, ``R / count`` rows. With
one replica per process (mesh ``(np, P)`` over ``np`` processes of ``P``
devices) that is process ``i``'s block ``[i * R / np, (i + 1) * R / np)``.
Processes whose devices form one replica together (a pipeline spanning
processes, e.g. mesh ``(1, 2)`` over 2 processes) are one group and pass the
same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from . import distributed
from .mesh import make_mesh


class DataShard(NamedTuple):
    """Which block of every global batch this process passes.

    Attributes:
      index: this process's block, ``0 <= index < count``.
      count: the number of blocks: distinct groups of data replicas held by
        processes (1 on a single process).
    """

    index: int
    count: int

    def rows(self, global_rows: int) -> slice:
        """The slice of a global batch of ``global_rows`` rows this process passes.

        Raises:
          ValueError: if ``global_rows`` does not divide into ``count`` blocks.
        """
        if global_rows % self.count:
            raise ValueError(
                f"a global batch of {global_rows} rows does not divide into {self.count} per-process blocks"
            )
        size = global_rows // self.count
        return slice(self.index * size, (self.index + 1) * size)


def data_shard(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> DataShard:
    """The block of each global batch this process passes with ``data_per_process``.

    Joins the job first when the environment describes one
    (``distributed.auto_initialize``), so it may be the script's first call.

    Args:
      mesh_shape: ``(D, P)``, as given to ``train`` or ``Pipeline``.
      devices: as given to ``train`` or ``Pipeline``; default ``jax.devices()``.

    Returns:
      A ``DataShard``; e.g. a grain loader reads every ``count``-th record
      from ``index`` (``dataset[index::count]``) in batches of ``R / count``.

    Raises:
      ValueError: as ``mesh_shard``.
    """
    distributed.auto_initialize()
    return mesh_shard(make_mesh(mesh_shape, devices))


def mesh_shard(mesh: Mesh) -> DataShard:
    """``shard_of`` for this process on a ``(data, pipe)`` mesh."""
    grid = np.vectorize(lambda device: device.process_index, otypes=[int])(mesh.devices)
    return shard_of(grid, jax.process_index())


def shard_of(process_grid: np.ndarray, process: int) -> DataShard:
    """The block a process passes, from the ``[D, P]`` grid of its devices' process ids.

    Args:
      process_grid: ``[D, P]`` process id of each mesh device.
      process: the process asked about.

    Returns:
      ``DataShard(index, count)``: groups of processes holding the same data
      replicas, ordered by replica.

    Raises:
      ValueError: if ``process`` holds no device of the mesh, or the
        processes' replicas do not form equal, disjoint, contiguous groups
        (then a process's rows are not one block of the global batch).
    """
    grid = np.asarray(process_grid)
    replicas = {int(p): tuple(d for d in range(grid.shape[0]) if p in grid[d]) for p in np.unique(grid)}
    if process not in replicas:
        raise ValueError(
            f"process {process} holds no device of the {tuple(grid.shape)} mesh, so it has no rows to pass; "
            "use a mesh over every process's devices, or pass global batches (data_per_process=False)"
        )
    groups = sorted(set(replicas.values()))
    size = len(groups[0])
    expected = [tuple(range(k * size, (k + 1) * size)) for k in range(len(groups))]
    if groups != expected:
        raise ValueError(
            f"the processes hold data replicas {groups} of the {tuple(grid.shape)} mesh (process ids "
            f"{grid.tolist()}); per-process data needs each process's replicas to be one contiguous "
            "block, the same size for all; use make_mesh's default device order or pass global batches"
        )
    return DataShard(groups.index(replicas[process]), len(groups))


def place_batch(
    batch: Any, sharding: NamedSharding, layout: tuple[int, int, int], per_process: bool = False
) -> Any:
    """A batch pytree as global ``[D, M, B, ...]`` arrays sharded over ``data``.

    Args:
      batch: a pytree of ``[R, ...]`` leaves, the global batch; or with
        ``per_process`` this process's ``R / count`` rows (see ``data_shard``).
      sharding: the ``data``-axis sharding of a ``(data, pipe)`` mesh.
      layout: ``(D, M, B)``.
      per_process: whether ``batch`` holds this process's rows only.

    Returns:
      The placed pytree.

    Raises:
      ValueError: if a leaf's rows differ from what this process must pass.
    """
    replicas, microbatches, rows = layout
    shard = mesh_shard(sharding.mesh) if per_process else DataShard(0, 1)
    local = replicas // shard.count
    expected = local * microbatches * rows
    for leaf in jax.tree.leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != expected:
            where = (
                f"this process's rows {shard.rows(replicas * microbatches * rows)} of each "
                f"{replicas * microbatches * rows}-row global batch ({expected} rows)"
                if per_process and shard.count > 1 else f"{expected} rows"
            )
            raise ValueError(
                f"this pipeline was built for batches of {where}, got a leaf of shape {list(np.shape(leaf))}"
            )
    if not per_process:
        return jax.tree.map(
            lambda a: jax.device_put(np.asarray(a).reshape(layout + np.shape(a)[1:]), sharding), batch
        )
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(
            sharding, np.asarray(a).reshape((local, microbatches, rows) + np.shape(a)[1:]),
            layout + np.shape(a)[1:],
        ),
        batch,
    )
