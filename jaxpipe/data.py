"""Synthetic data the project makes itself, for demos, tests and benchmarks.

Nothing is downloaded: every batch comes from a seeded NumPy generator.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def progression_batches(
    rows: int, seq_len: int, vocab: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless next-token batches of arithmetic progressions modulo ``vocab``.

    Each row is ``a, a + d, a + 2d, ...`` (mod ``vocab``) with a random start
    ``a`` and step ``d`` in ``[1, 4]``. The first token cannot be predicted,
    the second only up to the step, every later one exactly: a small LM learns
    it in a few hundred steps, so the loss falls clearly from ``ln(vocab)``.

    Args:
      rows: rows per global batch (R).
      seq_len: tokens per row (T).
      vocab: vocabulary size.
      seed: NumPy seed.

    Yields:
      ``(inputs, targets)``, both ``[R, T]`` int32: targets are inputs shifted
      by one token.

    Raises:
      ValueError: if a size is below 1 or ``vocab`` below 5.
    """
    if rows < 1 or seq_len < 1:
        raise ValueError(f"rows and seq_len must be >= 1, got rows={rows}, seq_len={seq_len}")
    if vocab < 5:
        raise ValueError(f"vocab must be >= 5 so steps 1..4 differ, got {vocab}")
    rng = np.random.default_rng(seed)
    positions = np.arange(seq_len + 1)
    while True:
        start = rng.integers(0, vocab, size=(rows, 1))
        step = rng.integers(1, 5, size=(rows, 1))
        tokens = ((start + step * positions) % vocab).astype(np.int32)
        yield tokens[:, :-1], tokens[:, 1:]
