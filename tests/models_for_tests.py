"""The test models and their synthetic data, shared by the test modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpipe import models


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model_fn: Callable
    loss_fn: Callable
    make_batch: Callable  # (rng: np.random.Generator, rows) -> (inputs, targets)


def _mlp_batch(rng, rows):
    return (rng.normal(size=(rows, 6)).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32))


def _lm_batch(rng, rows, vocab=11, seq=6):
    start = rng.integers(0, vocab, size=(rows, 1))
    stride = rng.integers(1, 4, size=(rows, 1))
    seq_ids = (start + stride * np.arange(seq + 1)) % vocab
    return seq_ids[:, :-1].astype(np.int32), seq_ids[:, 1:].astype(np.int32)


def _conv_batch(rng, rows):
    return (rng.normal(size=(rows, 16, 16, 3)).astype(np.float32), rng.integers(0, 3, size=(rows,)).astype(np.int32))


class DictIn(nnx.Module):
    """Takes ``{"x": [B, 6] float, "ids": [B, 3] int}``; returns a tuple carrying the ids on."""

    def __init__(self, *, rngs):
        self.linear = nnx.Linear(6, 8, rngs=rngs)
        self.embed = nnx.Embed(7, 8, rngs=rngs)

    def __call__(self, batch):
        h = jax.nn.tanh(self.linear(batch["x"]) + self.embed(batch["ids"]).sum(1))
        return h, batch["ids"]


class CarryIds(nnx.Module):
    """``(h [B, d], ids [B, 3] int) -> (h' [B, d'], ids)``: an int leaf crosses devices."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.embed = nnx.Embed(7, dout, rngs=rngs)

    def __call__(self, carry):
        h, ids = carry
        return jax.nn.tanh(self.linear(h) + self.embed(ids).mean(1)), ids


class DictOut(nnx.Module):
    def __init__(self, din, *, rngs):
        self.mean = nnx.Linear(din, 2, rngs=rngs)
        self.logits = nnx.Linear(din, 3, rngs=rngs)

    def __call__(self, carry):
        h, _ = carry
        return {"mean": self.mean(h), "logits": self.logits(h)}


def _dict_model(rngs):
    return [DictIn(rngs=rngs)] + [CarryIds(8, 8, rngs=rngs) for _ in range(6)] + [DictOut(8, rngs=rngs)]


def _dict_loss(outputs, targets):
    reg = jnp.mean(targets["weight"][:, None] * (outputs["mean"] - targets["y"]) ** 2)
    labels = jax.nn.one_hot(targets["label"], 3)
    return reg - jnp.mean(jnp.sum(labels * jax.nn.log_softmax(outputs["logits"]), -1))


def _dict_batch(rng, rows):
    inputs = {"x": rng.normal(size=(rows, 6)).astype(np.float32), "ids": rng.integers(0, 7, size=(rows, 3)).astype(np.int32)}
    targets = {
        "y": rng.normal(size=(rows, 2)).astype(np.float32),
        "weight": rng.uniform(0.5, 1.5, size=(rows,)).astype(np.float32),
        "label": rng.integers(0, 3, size=(rows,)).astype(np.int32),
    }
    return inputs, targets


class DropDense(nnx.Module):
    """``Linear``, GELU and ``nnx.Dropout`` (with its own RNG stream): ``[B, din] -> [B, dout]``."""

    def __init__(self, din, dout, rate, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        return self.drop(jax.nn.gelu(self.linear(x)))


def dropout_mlp(rate):
    """Six layers, dropout in layers 0, 2 and 4 (never split), plain ``Dense`` between them (splittable)."""

    def model_fn(rngs):
        return [
            DropDense(6, 16, rate, rngs=rngs), models.Dense(16, 8, rngs=rngs), DropDense(8, 12, rate, rngs=rngs),
            models.Dense(12, 8, rngs=rngs), DropDense(8, 8, rate, rngs=rngs), models.Dense(8, 5, activate=False, rngs=rngs),
        ]

    return model_fn


class DropEmbed(nnx.Module):
    """``models.Embed`` followed by dropout."""

    def __init__(self, vocab, seq_len, dim, rate, *, rngs):
        self.embed = models.Embed(vocab, seq_len, dim, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, ids):
        return self.drop(self.embed(ids))


class DropBlock(nnx.Module):
    """``models.Block`` with dropout on the attention weights and on the MLP branch (two streams)."""

    def __init__(self, dim, heads, rate, *, rngs):
        self.block = models.Block(dim, heads, rngs=rngs)
        self.attn_drop = nnx.Dropout(rate, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        blk = self.block
        b, t, d = x.shape
        q, k, v = jnp.split(blk.qkv(blk.norm1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, blk.heads, d // blk.heads) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // blk.heads).astype(x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        weights = self.attn_drop(jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1))
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        x = x + blk.proj(attn)
        return x + self.drop(blk.down(jax.nn.gelu(blk.up(blk.norm2(x)))))


def dropout_lm(rate, vocab=11, seq_len=6, dim=8, heads=2, blocks=3):
    """A transformer LM with dropout after the embedding and inside every block."""

    def model_fn(rngs):
        return (
            [DropEmbed(vocab, seq_len, dim, rate, rngs=rngs)]
            + [DropBlock(dim, heads, rate, rngs=rngs) for _ in range(blocks)]
            + [models.Head(dim, vocab, rngs=rngs)]
        )

    return model_fn


CASES = {
    "mlp": Case("mlp", models.mlp([6, 16, 8, 12, 4, 10, 7, 9, 5]), mse, _mlp_batch),
    "lm": Case("lm", models.transformer_lm(vocab=11, seq_len=6, dim=8, heads=2, blocks=6), models.lm_loss, _lm_batch),
    "conv": Case(
        "conv",
        models.conv_net([3, 4, 6, 8, 6, 8, 5, 4], classes=3, strides=(2, 1, 2, 1, 2, 1, 1)),
        models.classification_loss,
        _conv_batch,
    ),
    "dict": Case("dict", _dict_model, _dict_loss, _dict_batch),
}


def batches(case: Case, rows: int, steps: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [case.make_batch(rng, rows) for _ in range(steps)]


class TiedHead(nnx.Module):
    """Final norm and logits from the embedding's own matrix (GPT-2's weight tying): ``[B, T, d] -> [B, T, V]``.

    Holds the embedding layer's ``nnx.Embed`` (``tokens``) and computes
    ``tokens.attend(h)``, or, with ``param=True``, holds only its
    ``nnx.Param`` and computes ``h @ embedding.T``.
    """

    def __init__(self, tokens: nnx.Embed, dim: int, *, param: bool = False, rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        if param:
            self.embedding = tokens.embedding
        else:
            self.tokens = tokens

    def __call__(self, x):
        h = self.norm(x)
        if hasattr(self, "tokens"):
            return self.tokens.attend(h)
        return h @ self.embedding[...].T


def tied_lm(vocab=11, seq_len=6, dim=8, heads=2, blocks=2, param=False):
    """A GPT-style LM whose head reuses the embedding matrix: ``models.Embed``, blocks, ``TiedHead``."""

    def model_fn(rngs):
        embed = models.Embed(vocab, seq_len, dim, rngs=rngs)
        blocks_ = [models.Block(dim, heads, rngs=rngs) for _ in range(blocks)]
        return [embed, *blocks_, TiedHead(embed.tokens, dim, param=param, rngs=rngs)]

    return model_fn
