"""Small ready-made layer lists: MLPs, a transformer LM and a conv net.

Used by the quickstart, the tests and the experiments. Each builder returns a
``model_fn``: ``(nnx.Rngs) -> list[nnx.Module]``, the layers in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

ModelFn = Callable[[nnx.Rngs], list[nnx.Module]]


class Dense(nnx.Module):
    """``Linear`` followed by an optional GELU: ``[B, din] -> [B, dout]``."""

    def __init__(self, din: int, dout: int, *, activate: bool = True, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.activate = activate

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.linear(x)
        return jax.nn.gelu(y) if self.activate else y


def mlp(widths: Sequence[int]) -> ModelFn:
    """An MLP with layer widths ``widths`` (``len(widths) - 1`` layers).

    Args:
      widths: ``[din, h1, ..., dout]``; the last layer has no activation.

    Returns:
      A ``model_fn``.
    """

    def model_fn(rngs: nnx.Rngs) -> list[nnx.Module]:
        n = len(widths) - 1
        return [
            Dense(widths[i], widths[i + 1], activate=i < n - 1, rngs=rngs) for i in range(n)
        ]

    return model_fn


class ResidualBlock(nnx.Module):
    """``x + W2 tanh(W1 x)``: ``[B, D] -> [B, D]`` through a hidden layer of ``hidden`` units."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jnp.tanh(self.up(x)))


def residual_mlp(dim: int, hidden: int, blocks: int) -> ModelFn:
    """``blocks`` residual MLP blocks of width ``dim`` with ``hidden`` units each.

    Returns:
      A ``model_fn``.
    """

    def model_fn(rngs: nnx.Rngs) -> list[nnx.Module]:
        return [ResidualBlock(dim, hidden, rngs=rngs) for _ in range(blocks)]

    return model_fn


class Embed(nnx.Module):
    """Token and position embedding: ``[B, T] int32 -> [B, T, d]``."""

    def __init__(self, vocab: int, seq_len: int, dim: int, *, rngs: nnx.Rngs):
        self.tokens = nnx.Embed(vocab, dim, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.tokens(ids) + self.positions[...][: ids.shape[1]]


class Block(nnx.Module):
    """Pre-norm causal transformer block: ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads = heads
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Head(nnx.Module):
    """Final norm and vocabulary projection: ``[B, T, d] -> [B, T, vocab]`` logits."""

    def __init__(self, dim: int, vocab: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.norm(x))


def transformer_lm(vocab: int, seq_len: int, dim: int, heads: int, blocks: int) -> ModelFn:
    """A decoder-only language model: ``Embed``, ``blocks`` x ``Block``, ``Head``.

    Returns:
      A ``model_fn`` whose first boundary is int token ids ``[B, T]`` and whose
      output is float logits ``[B, T, vocab]``.
    """

    def model_fn(rngs: nnx.Rngs) -> list[nnx.Module]:
        return (
            [Embed(vocab, seq_len, dim, rngs=rngs)]
            + [Block(dim, heads, rngs=rngs) for _ in range(blocks)]
            + [Head(dim, vocab, rngs=rngs)]
        )

    return model_fn


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy: logits ``[B, T, V]``, targets ``[B, T]`` int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class ConvDown(nnx.Module):
    """3x3 convolution and ReLU: ``[B, H, W, C] -> [B, H/s, W/s, C']`` for stride s."""

    def __init__(self, cin: int, cout: int, stride: int = 2, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=(stride, stride), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class Classifier(nnx.Module):
    """Global average pool and linear classifier: ``[B, H, W, C] -> [B, classes]``."""

    def __init__(self, channels: int, classes: int, *, rngs: nnx.Rngs):
        self.out = nnx.Linear(channels, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(x.mean(axis=(1, 2)))


def conv_net(channels: Sequence[int], classes: int, strides: Sequence[int] | None = None) -> ModelFn:
    """A conv net: ``len(channels) - 1`` convolutions, then a classifier.

    Args:
      channels: ``[c_in, c1, ..., c_last]``.
      classes: number of output classes.
      strides: one stride per convolution (default 2 everywhere), so boundary
        shapes shrink spatially and change channel count along the net.

    Returns:
      A ``model_fn``.
    """
    strides = tuple(strides or (2,) * (len(channels) - 1))
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides={strides} needs one entry per convolution ({len(channels) - 1})")

    def model_fn(rngs: nnx.Rngs) -> list[nnx.Module]:
        convs = [
            ConvDown(channels[i], channels[i + 1], strides[i], rngs=rngs)
            for i in range(len(channels) - 1)
        ]
        return convs + [Classifier(channels[-1], classes, rngs=rngs)]

    return model_fn


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy: logits ``[B, C]``, integer labels ``[B]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def demo_lm(rngs: nnx.Rngs) -> list[nnx.Module]:
    """A ready ``model_fn`` for the command line: vocab 32000, seq 128, dim 256, 6 blocks."""
    return transformer_lm(32000, 128, 256, 4, 6)(rngs)
