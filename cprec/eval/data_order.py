"""Fine-tuning data order as a pure function of the step, shared by both objectives.

Step s of a rank reads batch ``s mod batches_per_epoch`` of epoch ``s // batches_per_epoch``, the
epoch's order a permutation seeded by (seed, rank, epoch); an incomplete tail batch is dropped.
Negatives are drawn from generators seeded by (seed, rank, step). A resumed run therefore needs no
replay: the state at step s is the step number.
"""

from __future__ import annotations

import numpy as np


def seed_words(*parts: int) -> list[int]:
    return [p & 0xFFFFFFFF for p in parts]  # numpy seed sequences take non-negative words


def batch_rows(step: int, n: int, batch_size: int, seed: int, rank: int) -> np.ndarray:
    """Indices (into this rank's examples) of the batch of ``step``: a pure function of its arguments."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng(seed_words(seed, rank, epoch)).permutation(n)
    return order[k * batch_size : (k + 1) * batch_size]
