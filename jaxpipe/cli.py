"""The ``jaxpipe`` command line: ``plan``, ``simulate`` and ``train``.

``jaxpipe plan`` prints where a model's layers would go, ``jaxpipe simulate``
also draws the chosen schedule's timeline, ``jaxpipe train`` trains a model
given as ``MODULE:FUNCTION``. Bad input ends with a one-line message and exit
status 2, as argparse does for bad options; ``--traceback`` shows the full
Python traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

SCHEDULES = ("auto", "balanced", "gpipe", "1f1b", "interleaved", "zb_h1")
OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
# jaxpipe.train keywords set by the option of the same name, passed only when given.
_TRAIN_OPTIONS = ("checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_every", "metrics_path")
_EXAMPLES = {
    "plan": """\
example:
  jaxpipe plan jaxpipe.models:demo_lm --mesh 1,4 --microbatches 16 \\
      --input-shape 64,128 --input-dtype int32""",
    "simulate": """\
example:
  jaxpipe simulate jaxpipe.models:demo_lm --mesh 1,4 --microbatches 8 \\
      --input-shape 32,128 --input-dtype int32 --out timeline.png""",
    "train": """\
examples:
  # the demo LM (32k vocabulary, slow on CPU) on synthetic tokens, mesh (2, 4)
  jaxpipe train jaxpipe.models:demo_lm --mesh 2,4 --microbatches 2 --steps 10 --log-every 5
  # your model, data and loss; checkpoints every 100 steps
  jaxpipe train mypkg.model:layers --data mypkg.data:batches --loss mypkg.model:loss \\
      --mesh 1,4 --schedule balanced --microbatches 8 --steps 1000 --lr 3e-4 \\
      --checkpoint-dir ckpt --checkpoint-every 100 --metrics-path metrics.jsonl""",
}


class _UsageError(Exception):
    """Bad command-line input, reported as one line."""


def _load(spec: str) -> Callable:
    """Imports ``MODULE:FUNCTION`` (the current directory is importable).

    Args:
      spec: e.g. ``"jaxpipe.models:demo_lm"``.

    Returns:
      The callable.

    Raises:
      ValueError: if ``spec`` is malformed, cannot be imported, or does not
        name a callable.
    """
    module, _, name = spec.partition(":")
    if not module or not name or ":" in name:
        raise ValueError(f"expected MODULE:FUNCTION (e.g. jaxpipe.models:demo_lm), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any failure in the user's module is bad input
        raise ValueError(f"cannot import {module!r} (from {spec!r}): {type(error).__name__}: {error}") from error
    target = found
    for part in name.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module!r} has no attribute {name!r} (from {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r} is a {type(target).__name__}, not a function")
    return target


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _mesh(text: str) -> tuple[int, int]:
    values = _ints(text)
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected DATA,PIPE as two integers >= 1 (e.g. 2,4), got {text!r}")
    return values[0], values[1]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _subparser(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name, help=summary, description=textwrap.fill(description, 88), epilog=_EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("model",
                     help="MODULE:FUNCTION, a model_fn taking nnx.Rngs and returning the list of layers")
    sub.add_argument("--mesh", type=_mesh, metavar="D,P", default=(1, 1),
                     help="DATA,PIPE: data replicas x pipe devices (default 1,1)")
    sub.add_argument("--microbatches", dest="num_microbatches", type=_positive, metavar="M", default=1,
                     help="M, micro-batches per data replica (default 1)")
    sub.add_argument("--virtual-stages", type=_positive, metavar="V", default=1,
                     help="V, chunks per device for interleaved (default 1)")
    sub.add_argument("--cut", choices=("integer", "fractional"), default="integer",
                     help="whole layers per stage, or equal loads with layers split by rows (default integer)")
    sub.add_argument("--host-devices", type=_positive, metavar="N", default=8,
                     help="fake CPU devices when there is no accelerator (default 8)")
    sub.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    return sub


def _plan_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--input-shape", type=_ints, metavar="R,...", required=True,
                     help="global batch input shape, rows first (e.g. 64,128)")
    sub.add_argument("--input-dtype", default="float32", metavar="DTYPE",
                     help="input dtype (default float32; int32 for token ids)")
    sub.add_argument("--schedule", choices=SCHEDULES, default="auto", help="default auto: the planner picks")
    sub.add_argument("--max-memory-mib", type=_positive_number, metavar="MIB", default=None,
                     help="memory limit per device for auto (MiB)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpipe",
        description="Pipeline + data parallel training for JAX/Flax. "
                    "Run 'jaxpipe COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan = _subparser(
        commands, "plan", "print the plan (layers per device, loads, memory, predicted step time)",
        "Print how jaxpipe would place a model on a (data, pipe) mesh, without training: the layers "
        "(or row ranges of split layers) on each pipe device, their load and memory, the predicted "
        "step time of every candidate schedule and why the chosen one won.",
    )
    _plan_options(plan)
    plan.set_defaults(run=_run_plan)

    simulate = _subparser(
        commands, "simulate", "print the plan and draw its schedule's timeline as a PNG",
        "Print the plan as 'jaxpipe plan' does, then simulate one training step of the chosen "
        "schedule with the plan's per-stage costs and draw its timeline (one row per pipe device, "
        "forward and backward boxes per micro-batch) to --out.",
    )
    _plan_options(simulate)
    simulate.add_argument("--out", default="timeline.png", metavar="PATH",
                          help="PNG path for the timeline (default timeline.png)")
    simulate.set_defaults(run=_run_simulate)

    train = _subparser(
        commands, "train", "train a model (MODULE:FUNCTION) with pipeline + data parallelism",
        "Train a model with jaxpipe.train. Without --data and --loss it trains a language model on "
        "synthetic arithmetic-progression tokens (jaxpipe.data.progression_batches) with next-token "
        "cross-entropy (jaxpipe.models.lm_loss), so 'jaxpipe train jaxpipe.models:demo_lm' runs as is. "
        "A --data function is called as FUNCTION(rows=R, seed=SEED) and returns an iterable of "
        "(inputs, targets) global batches of R rows; a --loss function maps (outputs, targets) of "
        "one micro-batch to a scalar mean.",
    )
    train.add_argument("--schedule", choices=SCHEDULES, default="gpipe", help="default gpipe")
    train.add_argument("--steps", type=_positive, metavar="N", default=100,
                       help="optimizer steps (default 100)")
    train.add_argument("--batch-size", type=_positive, metavar="R", default=None,
                       help="R, rows per global batch, a multiple of DATA x M (default 8 x DATA x M)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="default adamw")
    train.add_argument("--lr", type=_positive_number, default=1e-3, help="learning rate (default 1e-3)")
    train.add_argument("--clip-norm", type=_positive_number, metavar="NORM", default=None,
                       help="clip gradients to this global norm")
    train.add_argument("--seed", type=int, metavar="SEED", default=0,
                       help="seed of the parameters and of the data (default 0)")
    train.add_argument("--data", default=None, metavar="MODULE:FUNCTION",
                       help="MODULE:FUNCTION giving (inputs, targets) batches (default: synthetic tokens)")
    train.add_argument("--loss", default="jaxpipe.models:lm_loss", metavar="MODULE:FUNCTION",
                       help="MODULE:FUNCTION (default jaxpipe.models:lm_loss)")
    train.add_argument("--vocab", type=_positive, metavar="V", default=None,
                       help="vocabulary of the default data (default: the model's jaxpipe.models.Embed)")
    train.add_argument("--seq-len", type=_positive, metavar="T", default=None,
                       help="tokens per row of the default data (default: the model's jaxpipe.models.Embed)")
    train.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                       help="save checkpoints here (after the last step too) and resume from the newest one "
                            "there, on any mesh or schedule; --steps counts the resumed steps")
    train.add_argument("--checkpoint-every", type=_positive, metavar="N", default=None,
                       help="also save every N steps")
    train.add_argument("--keep-checkpoints", type=_positive, metavar="K", default=None,
                       help="keep the newest K (default 3)")
    train.add_argument("--log-every", type=_positive, metavar="N", default=None,
                       help="write metrics and refresh the progress numbers every N steps (default 10)")
    train.add_argument("--metrics-path", default=None, metavar="PATH",
                       help="JSON-lines metrics file (default CHECKPOINT_DIR/metrics.jsonl with --checkpoint-dir)")
    train.add_argument("--eval-every", type=_positive, metavar="N", default=None,
                       help="evaluate every N steps (and after the last) on held-out batches: "
                            "the data with seed SEED+1")
    train.add_argument("--eval-batches", type=_positive, metavar="K", default=2,
                       help="held-out batches for --eval-every (default 2)")
    train.add_argument("--quiet", action="store_true",
                       help="no progress bar and no plan; print the final line only")
    train.set_defaults(run=_run_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxpipe`` command.

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
      The exit status (0). Bad input exits with status 2 and a one-line
      message on stderr.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    # XLA reads this when the first backend starts, which has not happened yet.
    flag = f"--xla_force_host_platform_device_count={args.host_devices}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    try:
        return args.run(args)
    except (_UsageError, ValueError, TypeError, OSError) as error:
        if args.traceback:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"jaxpipe {args.command}: error: {message}", file=sys.stderr)
        return 2


def _check_devices(args) -> None:
    import jax

    needed, devices = args.mesh[0] * args.mesh[1], jax.devices()
    if needed > len(devices):
        hint = f"; pass --host-devices {needed} for fake CPU devices" if devices[0].platform == "cpu" else ""
        raise _UsageError(
            f"--mesh {args.mesh[0]},{args.mesh[1]} needs {needed} devices but {len(devices)} "
            f"{devices[0].platform} devices are available{hint}"
        )


def _config(args) -> Any:
    """The ``PipelineConfig`` of the options: those named like its fields, and ``--max-memory-mib``."""
    from .config import FIELDS, PipelineConfig

    options = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if getattr(args, "max_memory_mib", None) is not None:
        options["max_memory_per_device"] = args.max_memory_mib * 2**20
    return PipelineConfig(**options)


def _plan(args) -> Any:
    import numpy as np

    from .train import plan

    _check_devices(args)
    inputs = np.zeros(args.input_shape, args.input_dtype)
    return plan(_load(args.model), args.mesh, inputs, config=_config(args))


def _run_plan(args) -> int:
    print(_plan(args))
    return 0


def _run_simulate(args) -> int:
    from .plot import plot_timeline
    from .schedule import make_schedule
    from .simulate import simulate

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise _UsageError(f"--out {args.out}: the folder {folder} does not exist; create it or give another path")
    plan = _plan(args)
    chosen = plan.chosen
    # The table the executor runs (fused 1F1B warm-up), as the planner predicted it.
    table = make_schedule(chosen.schedule, len(chosen.loads), plan.num_microbatches, chosen.virtual_stages,
                          fused=True)
    sim = simulate(table, chosen.costs)
    path = plot_timeline(sim, args.out, title=chosen.label)
    print(plan)
    print(f"timeline: {path}  (simulated step {sim.makespan:.4g} {plan.unit}, bubble {sim.bubble_fraction:.1%})")
    return 0


def _optimizer(args):
    import optax

    make = {"adamw": optax.adamw, "adam": optax.adam, "sgd": optax.sgd, "lion": optax.lion}[args.optimizer]
    optimizer = make(args.lr)
    if args.clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(args.clip_norm), optimizer)
    return optimizer


def _data_source(args, model_fn, rows: int) -> Callable[[int], Any]:
    """``seed -> iterable of (inputs, targets)`` of ``rows`` rows: --data, or synthetic tokens."""
    if args.data is not None:
        make = _load(args.data)
        return lambda seed: make(rows=rows, seed=seed)
    from flax import nnx

    from .data import progression_batches
    from .models import Embed

    vocab, seq_len = args.vocab, args.seq_len
    if vocab is None or seq_len is None:
        try:
            first = nnx.eval_shape(lambda: list(model_fn(nnx.Rngs(args.seed))))[0]
        except (TypeError, IndexError) as error:
            raise _UsageError(
                f"{args.model} must be a model_fn, (nnx.Rngs) -> list of nnx.Module layers; calling it "
                f"failed: {error}"
            ) from None
        if not isinstance(first, Embed):
            raise _UsageError(
                f"the default data (synthetic tokens) needs --vocab and --seq-len, since {args.model}'s first "
                f"layer is a {type(first).__name__}, not a jaxpipe.models.Embed; or give --data MODULE:FUNCTION"
            )
        vocab = vocab or first.tokens.num_embeddings
        seq_len = seq_len or first.positions.shape[0]
    return lambda seed: progression_batches(rows, seq_len, vocab, seed=seed)


def _train_kwargs(args, source: Callable[[int], Any]) -> dict[str, Any]:
    """The ``jaxpipe.train`` options the user gave (the others keep train's defaults)."""
    kwargs = {name: getattr(args, name) for name in _TRAIN_OPTIONS if getattr(args, name) is not None}
    if args.eval_every is not None:
        # Held-out batches: the same data source with the next seed.
        kwargs["eval_data"] = list(itertools.islice(source(args.seed + 1), args.eval_batches))
        kwargs["eval_every"] = args.eval_every
    if args.quiet:
        kwargs["progress"] = False
    return kwargs


def _run_train(args) -> int:
    from .train import train

    model_fn, loss_fn = _load(args.model), _load(args.loss)
    _check_devices(args)
    rows = args.batch_size or 8 * args.mesh[0] * args.num_microbatches
    source = _data_source(args, model_fn, rows)
    kwargs = _train_kwargs(args, source)
    start = time.perf_counter()
    result = train(
        model_fn, args.mesh, data=source(args.seed), loss_fn=loss_fn, optimizer=_optimizer(args),
        steps=args.steps, config=_config(args), **kwargs,
    )
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(result.plan)
    print(_summary(result, elapsed))
    return 0


def _summary(result, elapsed: float) -> str:
    """One line: steps run, losses, evaluation, stop reason, checkpoint."""
    first = result.start_step
    losses = result.losses
    if not losses:
        text = f"nothing to train: the checkpoint is at step {first}, --steps is reached"
    else:
        text = (f"trained steps {first + 1}-{first + len(losses)} in {elapsed:.1f} s: "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if result.eval_losses:
        step, loss = result.eval_losses[-1]
        text += f"; eval loss {loss:.4f} at step {step}"
    if result.stopped:
        text += f"; stopped early ({result.stopped})"
    if result.checkpoint is not None:
        text += f"; checkpoint {result.checkpoint.path} (step {result.checkpoint.step})"
    return text


if __name__ == "__main__":
    sys.exit(main())
