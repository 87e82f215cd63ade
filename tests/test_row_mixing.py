"""The row-mixing probe: layers whose rows depend on other rows are found, row-independent ones are not.

Decisions are exact booleans; each layer here either truly mixes rows (its
output on a row block differs from the same rows of its output on the whole
micro-batch for generic inputs) or truly does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpipe.layers import split_layers
from jaxpipe.row_mixing import mixes_rows, probe_input


class Fn(nnx.Module):
    """``f(linear(x))``; ``gate`` is a parameter that starts at zero."""

    def __init__(self, f, din=8, dout=8, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.gate = nnx.Param(jnp.zeros(()))
        self.f = f

    def __call__(self, x):
        return self.f(self, self.linear(x))


class EmbedThen(nnx.Module):
    """An embedding of ``[B, T]`` ids followed by ``f``."""

    def __init__(self, f, vocab=11, *, rngs):
        self.embed = nnx.Embed(vocab, 8, rngs=rngs)
        self.f = f

    def __call__(self, ids):
        return self.f(self.embed(ids))


def _decide(layer, x):
    specs, params, _ = split_layers([layer])
    return mixes_rows(specs[0], params[0], x)


FLOAT_IN = jax.ShapeDtypeStruct((6, 8), jnp.float32)
IDS = np.random.default_rng(0).integers(0, 11, size=(6, 5)).astype(np.int32)
PERM = np.array([2, 0, 1, 5, 3, 4])

MIXING = {
    "minus batch mean": lambda s, y: y - y.mean(0),
    "minus first row": lambda s, y: y - y[:1],
    "cumulative sum over rows": lambda s, y: jnp.cumsum(y, 0),
    "rows reversed": lambda s, y: y[::-1],
    "rows gathered by index": lambda s, y: y[PERM],
    "rows rolled": lambda s, y: jnp.roll(y, 1, 0),
    "plus batch max": lambda s, y: y + y.max(0),
    "divided by the row count": lambda s, y: y / y.shape[0],
    "zero-initialised gate on the batch mean": lambda s, y: y + s.gate * y.mean(0),
}
INDEPENDENT = {
    "linear": lambda s, y: y,
    "tanh": lambda s, y: jnp.tanh(y),
    "layer norm over features": lambda s, y: (y - y.mean(-1, keepdims=True)) / (y.std(-1, keepdims=True) + 1e-5),
    "softmax over features": lambda s, y: jax.nn.softmax(y, -1),
    "first feature subtracted": lambda s, y: y - y[:, :1],
}


@pytest.mark.parametrize("name", MIXING)
def test_row_mixing_layers_are_found(name):
    assert _decide(Fn(MIXING[name], rngs=nnx.Rngs(0)), FLOAT_IN)


@pytest.mark.parametrize("name", INDEPENDENT)
def test_row_independent_layers_may_be_split(name):
    assert not _decide(Fn(INDEPENDENT[name], rngs=nnx.Rngs(0)), FLOAT_IN)


@pytest.mark.parametrize("name", ["minus batch mean", "minus first row", "cumulative sum over rows"])
def test_row_mixing_after_an_embedding_is_found(name):
    """Integer inputs vary per row (zeros everywhere made every row alike)."""
    f = MIXING[name]
    assert _decide(EmbedThen(lambda h: f(None, h), rngs=nnx.Rngs(0)), IDS)
    assert _decide(EmbedThen(lambda h: f(None, h), rngs=nnx.Rngs(0)), jax.ShapeDtypeStruct(IDS.shape, IDS.dtype))


def test_an_embedding_and_attention_over_the_sequence_may_be_split():
    assert not _decide(EmbedThen(lambda h: h, rngs=nnx.Rngs(0)), IDS)
    attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0))
    assert not _decide(EmbedThen(lambda h: attention(h, h), rngs=nnx.Rngs(0)), IDS)
    assert not _decide(nnx.LayerNorm(8, rngs=nnx.Rngs(0)), FLOAT_IN)


def test_a_layer_returning_other_rows_counts_as_mixing():
    assert _decide(Fn(lambda s, y: y[:2], rngs=nnx.Rngs(0)), FLOAT_IN)
    assert _decide(Fn(lambda s, y: y.sum(0), rngs=nnx.Rngs(0)), FLOAT_IN)


def test_probe_integers_stay_in_the_example_range_and_rows_differ():
    ids = np.array([[3, 3], [7, 5], [4, 4], [6, 6]], np.int32)
    probe = probe_input(ids, 4, np.random.default_rng(0))
    assert probe.dtype == np.int32 and probe.shape == (4, 2)
    assert probe.min() >= 3 and probe.max() <= 7
    assert len({tuple(row) for row in probe.tolist()}) == 4  # 5 values for 4 rows: all rows differ
    same = probe_input(np.zeros((4, 1), np.int32), 4, np.random.default_rng(0))
    assert same.ravel().tolist() == [0, 0, 1, 1]  # two values: not its own reversal or rotation


# Property: a chain of row-independent steps with at most one row-mixing step
# inside mixes rows exactly when that step is there.

_PRE = {
    "tanh": lambda y: jnp.tanh(y),
    "square": lambda y: y * y + y,
    "feature softmax": lambda y: jax.nn.softmax(y, -1) * y.shape[-1] + y,
    "feature centring": lambda y: y - y.mean(-1, keepdims=True) + 0.5 * y,
    "attention over axis 1": lambda y: jax.nn.softmax(y @ jnp.swapaxes(y, -1, -2), -1) @ y + y,
}
_POST = {"tanh": jnp.tanh, "affine": lambda y: 1.5 * y - 0.25, "cube": lambda y: y**3 + y}
_MIX = {
    "batch mean": lambda y: y - y.mean(0),
    "first row": lambda y: y - y[:1],
    "cumsum": lambda y: jnp.cumsum(y, 0),
    "reversed": lambda y: y[::-1],
    "rolled": lambda y: jnp.roll(y, 1, 0),
    "batch max": lambda y: y + y.max(0),
    "batch sum": lambda y: y * jnp.sum(y, 0),
}


class Chain(nnx.Module):
    def __init__(self, din, dout, ints, pre, mix, post, *, rngs):
        self.embed = nnx.Embed(din, dout, rngs=rngs) if ints else None
        self.linear = nnx.Linear(dout if ints else din, dout, rngs=rngs)
        self.steps = (pre, mix, post)

    def __call__(self, x):
        h = self.linear(self.embed(x) if self.embed is not None else x)
        pre, mix, post = self.steps
        for name in pre:
            h = _PRE[name](h)
        if mix is not None:
            h = _MIX[mix](h)
        for name in post:
            h = _POST[name](h)
        return h


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(2, 6),
    middle=st.sampled_from([(), (1,), (3,)]),
    din=st.integers(2, 5),
    dout=st.integers(2, 5),
    ints=st.booleans(),
    pre=st.lists(st.sampled_from(sorted(_PRE)), max_size=2),
    mix=st.none() | st.sampled_from(sorted(_MIX)),
    post=st.lists(st.sampled_from(sorted(_POST)), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_the_probe_finds_exactly_the_chains_that_mix_rows(rows, middle, din, dout, ints, pre, mix, post, seed):
    pre = [name for name in pre if middle or name != "attention over axis 1"]
    layer = Chain(din, dout, ints, tuple(pre), mix, tuple(post), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    shape = (rows,) + middle + (() if ints else (din,))
    if ints:
        x = rng.integers(0, din, size=shape).astype(np.int32)
        x.flat[0], x.flat[-1] = 0, din - 1  # the example holds the whole vocabulary's range
    else:
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
    specs, params, _ = split_layers([layer])
    assert mixes_rows(specs[0], params[0], x, seed=seed) == (mix is not None)
