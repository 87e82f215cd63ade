"""GPT-2 small, end to end: 12 blocks, width 768, 12 heads, 50257-token vocabulary.

Trains a few steps on a (data=2, pipe=4) mesh of 8 fake CPU devices (or real
accelerators when present) with ``schedule="auto"``, bfloat16 compute,
dropout 0.1 and checkpoints, on text every Python installation has: the
standard library's own source files, tokenised by bytes (ids 0-255 of the
GPT-2-sized vocabulary; nothing is downloaded). Prints the plan the planner
chose, the loss and the time of every step; a second run resumes from the
last checkpoint.

``python examples/gpt2_small.py [--steps 4] [--seq 64] [--rows 16]
[--checkpoint-dir DIR]``; ``--blocks``, ``--dim``, ``--heads`` and
``--vocab`` shrink the model (the defaults are GPT-2 small's).
"""

import argparse
import os
import sys

# 8 fake CPU devices, set before jax is imported (appended to existing flags).
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import pathlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxpipe  # noqa: E402
from jaxpipe import models  # noqa: E402

DROPOUT = 0.1


class Embedding(nnx.Module):
    """Token and learned position embeddings, then dropout: ``[B, T] ids -> [B, T, D]``."""

    def __init__(self, vocab: int, seq_len: int, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.tokens = nnx.Embed(vocab, dim, embedding_init=init, rngs=rngs)
        self.positions = nnx.Embed(seq_len, dim, embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
        self.dropout = nnx.Dropout(DROPOUT, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h_BxTxD = self.tokens(ids) + self.positions(jnp.arange(ids.shape[1]))[None]
        return self.dropout(h_BxTxD)


class Block(nnx.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP, dropout on both residual branches."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(DROPOUT, rngs=rngs)

    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(jnp.ones(h_BxTxD.shape[:2]))
        h_BxTxD = h_BxTxD + self.dropout(self.attention(self.norm1(h_BxTxD), mask=mask))
        return h_BxTxD + self.dropout(self.down(nnx.gelu(self.up(self.norm2(h_BxTxD)))))


class Head(nnx.Module):
    """Final layer norm and the output projection to the vocabulary (untied)."""

    def __init__(self, dim: int, vocab: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        return self.out(self.norm(h_BxTxD))


def gpt2(vocab: int, seq_len: int, dim: int, heads: int, blocks: int):
    """``model_fn`` for jaxpipe: the GPT-2 layers as a list."""

    def model_fn(rngs: nnx.Rngs) -> list[nnx.Module]:
        return ([Embedding(vocab, seq_len, dim, rngs=rngs)]
                + [Block(dim, heads, rngs=rngs) for _ in range(blocks)]
                + [Head(dim, vocab, rngs=rngs)])

    return model_fn


def stdlib_bytes(limit: int = 4_000_000) -> np.ndarray:
    """The Python standard library's ``.py`` sources as one byte sequence (``uint8``), sorted by path."""
    root = pathlib.Path(os.__file__).parent
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= limit:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def byte_batches(text: np.ndarray, rows: int, seq_len: int, seed: int):
    """``step -> batches``: random windows of ``text``; targets are the inputs shifted by one byte.

    Batch ``t`` depends only on ``seed`` and ``t``, so a resumed run reads
    the batches the first run would have read.
    """
    def batches(start_step: int):
        step = start_step
        while True:
            rng = np.random.default_rng([seed, step])
            starts = rng.integers(0, len(text) - seq_len - 1, size=rows)
            window_RxT1 = np.stack([text[s: s + seq_len + 1] for s in starts]).astype(np.int32)
            yield window_RxT1[:, :-1], window_RxT1[:, 1:]
            step += 1

    return batches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    parser.add_argument("--rows", type=int, default=16, help="global batch rows (2 replicas x 4 micro-batches x 2)")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--checkpoint-dir", default=None, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="gpt2_small_")
    text = stdlib_bytes()
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; text: {len(text):,} bytes "
          f"of Python standard library source; checkpoints in {checkpoint_dir}")

    def show(metrics) -> None:
        print(f"step {metrics.step:3d}  loss {metrics.loss:.3f}  {metrics.step_time_s:7.2f} s", flush=True)

    start = time.perf_counter()
    result = jaxpipe.train(
        gpt2(args.vocab, args.seq, args.dim, args.heads, args.blocks),
        mesh_shape=(2, 4),
        data=byte_batches(text, args.rows, args.seq, seed=0),
        loss_fn=models.lm_loss,
        optimizer=optax.adamw(3e-4, weight_decay=0.1),
        steps=args.steps,
        num_microbatches=4,
        schedule="auto",
        compute_dtype=jnp.bfloat16,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=max(1, args.steps // 2),
        callbacks=[show],
        progress=False,
    )
    elapsed = time.perf_counter() - start
    pipe = result.pipeline
    params = sum(leaf.size for layer in result.layers for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    print(pipe.plan)
    print(f"{params / 1e6:.1f} M parameters; steps {result.start_step + 1}-{args.steps} in {elapsed:.0f} s "
          f"(planning, profiling and compilation included); checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
