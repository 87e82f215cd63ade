"""The ``jaxpipe`` command line: ``jaxpipe plan`` prints a model's plan without training."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np


def _load(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected MODULE:FUNCTION (e.g. jaxpipe.models:demo_lm), got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxpipe`` command."""
    parser = argparse.ArgumentParser(prog="jaxpipe", description="Pipeline + data parallel training for JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser(
        "plan",
        help="print the plan (layers per device, loads, memory, predicted step time) for a model",
        description=(
            "Print how jaxpipe would place a model on a (data, pipe) mesh, without training. "
            "Example: jaxpipe plan jaxpipe.models:demo_lm --mesh 1,4 --microbatches 16 "
            "--input-shape 64,128 --input-dtype int32"
        ),
    )
    plan.add_argument("model", help="MODULE:FUNCTION, a model_fn taking nnx.Rngs and returning the layers")
    plan.add_argument("--mesh", type=_ints, default=(1, 1), help="data,pipe (default 1,1)")
    plan.add_argument("--microbatches", type=int, default=1, help="M, micro-batches per data replica")
    plan.add_argument("--input-shape", type=_ints, required=True, help="global batch input shape, rows first")
    plan.add_argument("--input-dtype", default="float32", help="input dtype (default float32)")
    plan.add_argument("--schedule", default="auto", help="auto (default), balanced, gpipe, 1f1b, interleaved")
    plan.add_argument("--virtual-stages", type=int, default=1, help="V for --schedule interleaved")
    plan.add_argument("--max-memory-mib", type=float, default=None, help="memory limit per device for auto")
    plan.add_argument("--host-devices", type=int, default=8, help="fake CPU devices when no accelerator (default 8)")
    args = parser.parse_args(argv)

    # XLA reads this when the first backend starts, which has not happened yet.
    flag = f"--xla_force_host_platform_device_count={args.host_devices}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    from .train import plan

    inputs = np.zeros(args.input_shape, args.input_dtype)
    result = plan(
        _load(args.model), tuple(args.mesh), inputs, num_microbatches=args.microbatches,
        schedule=args.schedule, virtual_stages=args.virtual_stages,
        max_memory_per_device=None if args.max_memory_mib is None else args.max_memory_mib * 2**20,
    )
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
