"""Ranking protocols: who is ranked against what, per domain.

A ``DomainTask`` holds one domain's candidates (its whole catalogue, from items.parquet) and the
eval users whose target lies in that domain. Any model is evaluated through a *score function*
``score_fn(task, batch) -> Tensor[B, I]`` giving the scores of all the domain's items for a batch of
the task's users; ranks then come from ``metrics.target_ranks``. A score function that can rank
a task's whole catalogue itself has a ``rank_full(task, batch_size) -> ranks`` method, which the
full protocol uses instead: embedding scorers (`cprec.eval.topk.EmbeddingScorer`) stream over item
chunks, sharded over ranks, without a dense [B, I] matrix or mask, and give the same ranks.

Protocols:
- **full**: every item of the domain's catalogue is a candidate, except the user's history items
  of that domain (masked; the target itself is never masked, even when it was bought before).
- **sampled (N=...)**: the target plus N items drawn uniformly without replacement from the
  domain's catalogue minus the history and the target (all of them if fewer remain); seeded per
  domain so every model sees the same negatives. Sampled numbers are optimistic and not comparable
  to full-ranking numbers — reports label them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cprec.eval.inputs import EvalInputs, EvalUser
from cprec.eval.metrics import metrics_from_ranks, target_ranks


@dataclass
class DomainTask:
    domain: str
    rows: np.ndarray
    """Catalogue rows of the candidates (column j of a score matrix = catalogue row rows[j])."""
    users: list[EvalUser]
    targets: np.ndarray
    """Column of each user's target."""
    history_cols: list[np.ndarray]
    """Columns of each user's in-domain history items, the target's column removed."""

    @property
    def n_items(self) -> int:
        return len(self.rows)


ScoreFn = Callable[[DomainTask, np.ndarray], torch.Tensor]


def _domain_rng(seed: int, domain: str, salt: int = 0) -> np.random.Generator:
    # Seeded by (seed, domain) so a domain's sample does not depend on which other domains exist.
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), salt])


def build_tasks(inputs: EvalInputs, max_users: int = 0, seed: int = 0) -> dict[str, DomainTask]:
    """One task per domain that has eval users; ``max_users`` > 0 keeps a seeded sample per domain."""
    cat = inputs.catalogue
    tasks = {}
    for domain in inputs.domains:
        users = [u for u in inputs.users if u.domain == domain]
        if not users:
            continue
        if max_users and len(users) > max_users:
            keep = np.sort(_domain_rng(seed, domain).choice(len(users), max_users, replace=False))
            users = [users[i] for i in keep]
        rows = np.asarray(cat.domain_rows(domain), dtype=np.int64)
        col = {int(r): j for j, r in enumerate(rows)}
        targets, hist = [], []
        for u in users:
            t = col[cat.index[u.target]]
            h = {col[c] for c in (cat.index.get(i) for i in u.history) if c is not None and c in col}
            h.discard(t)
            targets.append(t)
            hist.append(np.fromiter(sorted(h), dtype=np.int64, count=len(h)))
        tasks[domain] = DomainTask(domain, rows, users, np.asarray(targets, dtype=np.int64), hist)
    return tasks


def cold_counts(inputs: EvalInputs, tasks: dict[str, DomainTask]) -> dict[str, dict[str, int]]:
    """Per domain: candidates and targets, and how many of them are *cold* (in no training
    sequence: only their text can place them)."""
    cat = inputs.catalogue
    seen = {cat.index[i] for _, items, _ in inputs.train_sequences for i in items if i in cat.index}
    out = {}
    for d, task in tasks.items():
        targets = [cat.index[u.target] for u in task.users]
        out[d] = {
            "candidates": task.n_items,
            "cold_candidates": sum(1 for r in task.rows.tolist() if r not in seen),
            "targets": len(targets),
            "cold_targets": sum(1 for r in targets if r not in seen),
        }
    return out


def sample_candidates(task: DomainTask, n_negatives: int, seed: int) -> list[np.ndarray]:
    """Per user: sorted columns of the target + up to N negatives outside history and target."""
    rng = _domain_rng(seed, task.domain, salt=1)
    out = []
    for t, h in zip(task.targets, task.history_cols):
        allowed = np.ones(task.n_items, dtype=bool)
        allowed[h] = False
        allowed[t] = False
        pool = np.flatnonzero(allowed)
        neg = pool if len(pool) <= n_negatives else rng.choice(pool, n_negatives, replace=False)
        out.append(np.sort(np.concatenate([neg, [t]])))
    return out


def rank_task(
    task: DomainTask,
    score_fn: ScoreFn,
    protocol: str = "full",
    n_negatives: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """Ranks (1-based, pessimistic ties) of every user's target under the protocol."""
    if protocol not in ("full", "sampled"):
        raise ValueError(f"unknown protocol {protocol!r} (full or sampled)")
    if protocol == "full" and hasattr(score_fn, "rank_full"):
        return np.asarray(score_fn.rank_full(task, batch_size), dtype=np.int64)
    sampled = sample_candidates(task, n_negatives, seed) if protocol == "sampled" else None
    ranks = []
    for start in range(0, len(task.users), batch_size):
        batch = np.arange(start, min(start + batch_size, len(task.users)))
        scores = score_fn(task, batch).float()
        if scores.shape != (len(batch), task.n_items):
            raise ValueError(
                f"score function returned {tuple(scores.shape)}, expected {(len(batch), task.n_items)}"
            )
        if sampled is None:
            exclude = torch.zeros(scores.shape, dtype=torch.bool)
            for b, i in enumerate(batch):
                exclude[b, torch.from_numpy(task.history_cols[i])] = True
        else:
            exclude = torch.ones(scores.shape, dtype=torch.bool)
            for b, i in enumerate(batch):
                exclude[b, torch.from_numpy(sampled[i])] = False
        exclude = exclude.to(scores.device)
        r = target_ranks(scores, torch.from_numpy(task.targets[batch]), exclude)
        ranks.append(r.cpu().numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def evaluate(
    tasks: dict[str, DomainTask],
    score_fn: ScoreFn,
    ks: list[int],
    protocol: str = "full",
    n_negatives: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    ranks_out: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics per domain plus ``overall`` (users of all domains pooled, each weighing the same).

    ``ranks_out``, when given, receives each domain's per-user target ranks (task user order), from
    which intervals and paired differences are computed (``cprec.eval.intervals``).
    """
    per_domain, all_ranks = {}, []
    for domain, task in tasks.items():
        r = rank_task(task, score_fn, protocol, n_negatives, seed, batch_size)
        per_domain[domain] = metrics_from_ranks(r, ks)
        all_ranks.append(r)
        if ranks_out is not None:
            ranks_out[domain] = r
    per_domain["overall"] = metrics_from_ranks(np.concatenate(all_ranks) if all_ranks else [], ks)
    return per_domain


def protocol_label(protocol: str, n_negatives: int) -> str:
    """Human label written into reports: ``full ranking`` or ``sampled (N=1000 negatives)``."""
    return "full ranking" if protocol == "full" else f"sampled (N={n_negatives} negatives)"
