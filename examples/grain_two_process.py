"""A grain loader feeding a two-process run; each process reads only its rows.

    pip install -e ".[data]"
    python -m jaxpipe.launch --nproc 2 -- python examples/grain_two_process.py

The script never calls ``jaxpipe.distributed.initialize()``:
``jaxpipe.data_shard`` (and ``jaxpipe.train``) join the job the launcher
describes. Every process builds the same ``grain.MapDataset`` over token rows
the project makes (arithmetic progressions, ``jaxpipe.data``), shuffles it
with one seed, keeps every ``count``-th record from its block ``index`` and
batches ``ROWS / count`` of them, so its batch ``g`` is block ``index`` of
global batch ``g`` (``global_batches`` builds the same global batches in one
process). With the default mesh ``(2, 1)`` each process is one data replica
and reads half of every batch; with ``--mesh 1,2`` both processes hold the
one replica (one pipe device each) and read the same rows.

``--out FILE`` saves (from process 0) the losses, the first global batch as
the mesh holds it, and the trained parameters, for ``tests/test_data_per_process.py``.
"""

from __future__ import annotations

import argparse

import grain
import numpy as np
import optax

import jaxpipe
from jaxpipe import models
from jaxpipe.data import progression_batches

ROWS, SEQ, VOCAB, STEPS, MICROBATCHES = 16, 8, 16, 3, 2
MODEL = models.transformer_lm(vocab=VOCAB, seq_len=SEQ, dim=32, heads=2, blocks=2)
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


class TokenRows:
    """Random access to ``(inputs[i], targets[i])``: what ``grain.MapDataset.source`` reads."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs[index], self.targets[index]


def loader(shard: jaxpipe.DataShard) -> grain.MapDataset:
    """This process's batches: ``STEPS`` batches of ``ROWS / shard.count`` rows."""
    inputs, targets = next(progression_batches(ROWS * STEPS, SEQ, VOCAB, seed=0))
    records = grain.MapDataset.source(TokenRows(inputs, targets)).shuffle(seed=0)
    return records[shard.index :: shard.count].batch(ROWS // shard.count, drop_remainder=True)


def global_batches(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The global batches ``count`` processes feed together: their blocks in process-block order."""
    parts = [loader(jaxpipe.DataShard(index, count)) for index in range(count)]
    return [
        tuple(np.concatenate([part[step][k] for part in parts]) for k in range(2)) for step in range(STEPS)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default="2,1", help="data,pipe (default 2,1)")
    parser.add_argument("--out", default=None, help="save losses, first batch and parameters here")
    args = parser.parse_args()
    mesh = tuple(int(v) for v in args.mesh.split(","))

    shard = jaxpipe.data_shard(mesh)  # joins the job; which rows of each batch this process reads
    result = jaxpipe.train(
        MODEL, mesh, data=loader(shard), data_per_process=True, loss_fn=models.lm_loss, optimizer=OPTIMIZER,
        steps=STEPS, num_microbatches=MICROBATCHES, progress=False,
    )

    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    print(f"process {jax.process_index()} of {jax.process_count()} read rows {shard.rows(ROWS)} of each "
          f"{ROWS}-row batch; losses {[round(v, 4) for v in result.losses]}", flush=True)
    if args.out:
        placed = result.pipeline.shard_batch(loader(shard)[0], per_process=True)
        first = [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in placed]
        params = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(result.layers, nnx.Param))]
        if jax.process_index() == 0:
            np.savez(args.out, np.asarray(result.losses), *[a.reshape((ROWS,) + a.shape[3:]) for a in first], *params)


if __name__ == "__main__":
    main()
