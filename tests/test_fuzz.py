"""Fuzz: random meshes, micro-batch counts, batch shapes, dtypes and options thrown at ``train``.

Every call must either train exactly like the plain single-device reference
(``reference.assert_matches_reference``'s float32 tolerances) or raise ``ValueError``/``TypeError`` from one of
jaxpipe's own checks: never another exception, an error from deep inside
JAX, a wrong result or a hang (each call is stopped after ``CALL_LIMIT_S``
seconds, which fails the test). Tiny MLPs and few examples
keep the whole test under a minute.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hypothesis import event, given, settings
from hypothesis import strategies as st
from models_for_tests import mse
from reference import assert_matches_reference, reference_run

import jaxpipe
from jaxpipe import models

OPTIMIZER = optax.sgd(0.05, momentum=0.9)
CALL_LIMIT_S = 120
STEPS = 2


class _Hang(Exception):
    """A call ran past ``CALL_LIMIT_S``."""


@contextlib.contextmanager
def _time_limit(seconds):
    def stop(signum, frame):
        raise _Hang(f"the call ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    filtering = jax.config.jax_traceback_filtering
    jax.config.update("jax_traceback_filtering", "off")  # keep JAX's frames: see where an error was raised
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        jax.config.update("jax_traceback_filtering", filtering)


_BAD = {  # one wrong value per option
    "mesh_shape": [(3, 3), (1, 0), (2,)],
    "num_microbatches": [0, 1.5, True],
    "schedule": ["zigzag"],
    "virtual_stages": [0, 3],
    "executor": ["tick"],
    "remat": ["yes"],
    "costs": [[-1.0], [float("nan")]],
    "unsplittable": [1, (99,)],
    "param_dtype": ["int8"],
    "seed": [1.0],
}


class _MeanOverTokens(nnx.Module):
    """``[R, T, d] -> [R, d]``."""

    def __call__(self, x):
        return x.mean(1)


class _MinusFirstRow(nnx.Module):
    """Mixes rows: the reference must use the same micro-batches."""

    def __call__(self, x):
        return x - x[:1]


def _model(widths, tokens, mixing):
    """An MLP; with ``tokens`` its inputs are ``[R, T, d]``, pooled by a last layer."""

    def model_fn(rngs):
        layers = [models.Dense(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        if mixing:
            layers.insert(len(layers) // 2, _MinusFirstRow())
        if tokens:
            layers.append(_MeanOverTokens())
        return layers

    return model_fn


@st.composite
def _calls(draw):
    """A valid call, or one with a single option made wrong (about half each)."""
    dense = draw(st.integers(1, 4))
    widths = [draw(st.integers(2, 4)) for _ in range(dense + 1)]
    tokens = draw(st.sampled_from([None, 2, 3]))
    mixing = draw(st.booleans())
    layers = dense + bool(tokens) + mixing
    data, pipe = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (1, 3), (1, 4), (2, 2), (2, 4), (4, 2)]))
    m = draw(st.integers(1, 4))
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "balanced", "auto"]))
    options = dict(
        mesh_shape=(data, pipe),
        num_microbatches=m,
        schedule=schedule,
        virtual_stages=draw(st.sampled_from([1, 2])) if schedule == "interleaved" else 1,
        executor=draw(st.sampled_from(["table", "autodiff"])) if schedule == "gpipe" else "table",
        remat=draw(st.sampled_from([None, False, True])),
        costs=draw(st.none() | st.lists(st.sampled_from([0.5, 1.0, 3.0, 6.0]), min_size=layers, max_size=layers)),
        unsplittable=draw(st.sampled_from([(), (0,), (layers - 1,)])),
        param_dtype=draw(st.sampled_from([None, "float32"])),
        seed=draw(st.integers(0, 3)),
    )
    wrong = draw(st.sampled_from([None] * len(_BAD) + sorted(_BAD)))
    if wrong is not None:
        options[wrong] = draw(st.sampled_from(_BAD[wrong]))
    rows = draw(st.sampled_from([data * m, data * m, 2 * data * m, data * m + 1, 0]))
    dtype = draw(st.sampled_from(["float32", "float16", "int32"]))
    later = draw(st.sampled_from(["same"] * 4 + ["more rows", "other width", "other dtype"]
                                 + (["other length"] * 3 if tokens else [])))
    return (widths, tokens, mixing), rows, dtype, later, options


def _batches(widths, tokens, rows, dtype, later, seed=0):
    rng = np.random.default_rng(seed)

    def batch(rows, din, dtype, tokens=tokens):
        shape = (rows,) + ((tokens,) if tokens else ()) + (din,)
        x = rng.normal(size=shape) if dtype != "int32" else rng.integers(-3, 4, size=shape)
        return x.astype(dtype), rng.normal(size=(rows, widths[-1])).astype(np.float32)

    first = batch(rows, widths[0], dtype)
    second = {
        "same": lambda: batch(rows, widths[0], dtype),
        "more rows": lambda: batch(rows + 1, widths[0], dtype),
        "other width": lambda: batch(rows, widths[0] + 1, dtype),
        "other dtype": lambda: batch(rows, widths[0], "int32" if dtype != "int32" else "float32"),
        "other length": lambda: batch(rows, widths[0], dtype, 2 if tokens == 3 else 3),
    }[later]()
    return [first, second]


def _raised_by_jaxpipe(err: BaseException) -> bool:
    """Whether the innermost frame that raised ``err`` is jaxpipe's (a check, not a crash inside JAX)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jaxpipe{os.sep}" in frames[-1].filename and "site-packages" not in frames[-1].filename


@settings(max_examples=10, deadline=None)
@given(call=_calls())
def test_train_matches_the_reference_or_raises_a_value_or_type_error(call):
    (widths, tokens, mixing), rows, dtype, later, options = call
    model_fn = _model(widths, tokens, mixing)
    data = _batches(widths, tokens, rows, dtype, later)
    try:
        with _time_limit(CALL_LIMIT_S):
            result = jaxpipe.train(model_fn, data=data, loss_fn=mse, optimizer=OPTIMIZER, steps=STEPS,
                                   progress=False, **options)
    except (ValueError, TypeError) as err:
        assert str(err), f"{type(err).__name__} without a message"
        assert _raised_by_jaxpipe(err), f"not one of jaxpipe's checks: {type(err).__name__}: {err}"
        event(f"raised {type(err).__name__}: {str(err)[:60]}")
        return
    event("trained")
    # It trained: it must be plain training on these batches.
    microbatches = options["mesh_shape"][0] * options["num_microbatches"] if mixing else 1
    ref_losses, _, ref_params = reference_run(model_fn, data, mse, OPTIMIZER, seed=options["seed"],
                                              microbatches=microbatches)
    params = result.pipeline.from_stacks(result.state.params)
    assert_matches_reference(result.losses, ref_losses, params, ref_params)
    assert all(jnp.dtype(leaf.dtype) == jnp.float32 for leaf in jax.tree.leaves(params))
    assert [type(layer) for layer in result.layers] == [type(layer) for layer in model_fn(nnx.Rngs(0))]
