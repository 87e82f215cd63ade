"""The (data, pipe) device mesh every jaxpipe program runs on."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"
PIPE_AXIS = "pipe"


def check_mesh_shape(mesh_shape: Sequence[int]) -> tuple[int, int]:
    """Validates a ``(D, P)`` mesh shape and returns it as a tuple of ints.

    Args:
      mesh_shape: ``(data, pipe)``: D data-parallel replicas of a pipeline of P
        devices.

    Returns:
      ``(D, P)``.

    Raises:
      TypeError: if ``mesh_shape`` is not a pair of integers.
      ValueError: if either entry is smaller than 1.
    """
    if isinstance(mesh_shape, (str, bytes)) or not isinstance(mesh_shape, Sequence):
        raise TypeError(
            f"mesh_shape must be a pair (data, pipe) of ints, got {mesh_shape!r}"
        )
    if len(mesh_shape) != 2 or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in mesh_shape
    ):
        raise TypeError(
            f"mesh_shape must be a pair (data, pipe) of ints, got {mesh_shape!r}"
        )
    data, pipe = int(mesh_shape[0]), int(mesh_shape[1])
    if data < 1 or pipe < 1:
        raise ValueError(
            f"mesh_shape entries must be >= 1, got (data={data}, pipe={pipe})"
        )
    return data, pipe


def make_mesh(
    mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a mesh with axes ``("data", "pipe")``.

    A mesh that needs fewer devices than there are uses the first ``D * P``
    devices, so ``(1, 1)`` runs anywhere. Pipe neighbours are adjacent in the
    device list, which keeps the point-to-point traffic of the pipeline local
    on multi-host systems (hosts hold consecutive devices).

    Args:
      mesh_shape: ``(D, P)``.
      devices: the devices to use; defaults to ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``[D, P]``.

    Raises:
      ValueError: if ``D * P`` exceeds the number of devices.
    """
    data, pipe = check_mesh_shape(mesh_shape)
    devices = list(jax.devices() if devices is None else devices)
    strangers = [d for d in devices if not isinstance(d, jax.Device)]
    if strangers:
        raise TypeError(f"devices must be jax.Device objects (e.g. jax.devices()[:4]), got {strangers[0]!r}")
    twice = sorted({str(d) for d in devices if devices.count(d) > 1})
    if twice:
        raise ValueError(
            f"devices lists {', '.join(twice)} more than once; every mesh position needs its own device: give "
            "distinct devices, e.g. jax.devices()[:n]"
        )
    needed = data * pipe
    if needed > len(devices):
        processes = jax.process_count()
        raise ValueError(
            f"mesh_shape=({data}, {pipe}) needs {needed} devices but only "
            f"{len(devices)} are available ({devices[0].platform if devices else 'none'}"
            f"{f', {processes} processes' if processes > 1 else ''}); "
            f"use a mesh with data * pipe <= {len(devices)}; or run several processes, e.g. "
            f"`python -m jaxpipe.launch --nproc {needed} -- python your_script.py` on this machine "
            "(one CPU device each; jaxpipe joins them into one job), or one per host on a cluster; "
            f"or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before "
            "importing jax"
        )
    grid = np.array(devices[:needed], dtype=object).reshape(data, pipe)
    return Mesh(grid, (DATA_AXIS, PIPE_AXIS))
