"""What the loader skipped (``train.loader.on_corrupt=skip``), gathered over ranks for every output.

Skipped shards (missing, truncated, sha256 mismatch) and samples (bad ids or meta) are counted by
each rank's loader (``PackedLoader.stats``; the counts live in its state, so they run on across a
resume). ``gather`` collects them from every rank; the trainer writes the result to
``metrics.jsonl`` and MLflow at each log step (``loader/skipped_shards``, ``loader/skipped_samples``,
and ``.../rank_N`` for each rank that skipped anything), to ``trainer_state.json`` of every
checkpoint (``loader_skipped``), and logs a summary at the end of the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


@dataclass
class SkipCounts:
    """Per-rank (shards, samples) skipped so far, rank order."""

    per_rank: list[tuple[int, int]]

    @property
    def shards(self) -> int:
        return sum(s for s, _ in self.per_rank)

    @property
    def samples(self) -> int:
        return sum(m for _, m in self.per_rank)

    def metrics(self) -> dict[str, float]:
        """Totals always (a 0 says nothing was skipped); per-rank values for ranks that skipped."""
        out = {"loader/skipped_shards": float(self.shards), "loader/skipped_samples": float(self.samples)}
        for rank, (s, m) in enumerate(self.per_rank):
            if s or m:
                out[f"loader/skipped_shards/rank_{rank}"] = float(s)
                out[f"loader/skipped_samples/rank_{rank}"] = float(m)
        return out

    def state(self) -> dict:
        """The ``loader_skipped`` entry of ``trainer_state.json``."""
        return {
            "shards": self.shards,
            "samples": self.samples,
            "per_rank": {str(r): {"shards": s, "samples": m} for r, (s, m) in enumerate(self.per_rank)},
        }

    def log_summary(self, on_corrupt: str) -> None:
        if not (self.shards or self.samples):
            log.info("loader: no shard or sample skipped (train.loader.on_corrupt=%s)", on_corrupt)
            return
        ranks = ", ".join(f"rank {r}: {s} + {m}" for r, (s, m) in enumerate(self.per_rank) if s or m)
        log.warning(
            "loader skipped %d shard(s) and %d sample(s) in this run, counted from its start "
            "(shards + samples by rank: %s); see the warnings above and the loader/skipped_* metrics",
            self.shards,
            self.samples,
            ranks,
        )


def gather(loader, device=None) -> SkipCounts:
    """Every rank's skip counts (a collective: all ranks call it at the same point). ``device``: where
    the all-reduce runs (the engine's device: NCCL reduces CUDA tensors only)."""
    stats = loader.stats()
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    t = torch.zeros(world, 2, dtype=torch.float64, device=device)
    t[rank, 0], t[rank, 1] = float(stats["skipped_shards"]), float(stats["skipped_samples"])
    if tdist.is_initialized():
        tdist.all_reduce(t)
    return SkipCounts([(int(s), int(m)) for s, m in t.tolist()])
