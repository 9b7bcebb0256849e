"""Ranking metrics as pure functions: target rank with pessimistic ties, then Recall/NDCG/MRR@K.

Every user has exactly one held-out target item. Given the scores of all candidate items for a
user, the *rank* of the target is

    rank = 1 + |{ j : j != target, j not excluded, score_j >= score_target }|

so an item scoring *equal* to the target is counted as ranked above it (pessimistic ties: a model
that gives every item the same score gets the worst rank, not a lucky one). A NaN score counts as
beating the target; a NaN target score ranks the target last among the candidates.

From the rank (1-based) and a cut-off K:

    Recall@K = 1[rank <= K]                       (= hit rate @K with a single target)
    NDCG@K   = 1[rank <= K] / log2(rank + 1)      (ideal DCG is 1 with a single relevant item)
    MRR@K    = 1[rank <= K] / rank

Reported values are means over users. "Overall" numbers pool the users of all domains (each user
weighs the same), which is what ``metrics_from_ranks`` does when given the concatenated ranks.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("recall", "ndcg", "mrr")


def target_ranks(
    scores: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    exclude: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """1-based rank of each user's target among the non-excluded candidates, ties pessimistic.

    Args:
        scores: float [U, I], higher = better.
        targets: int [U], the target column of each row.
        exclude: bool [U, I] or None; True marks items that are not candidates (the user's history,
            or everything outside the sampled set). The target column is never excluded, whatever
            this mask says.

    Returns:
        int64 [U] ranks in 1..(number of candidates).
    """
    scores = torch.as_tensor(scores)
    targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [users, items], got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must be [{scores.shape[0]}], got shape {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"target index out of range [0, {scores.shape[1]})")
    rows = torch.arange(scores.shape[0], device=scores.device)
    t = scores[rows, targets].unsqueeze(1)
    beats = (scores >= t) | torch.isnan(scores) | torch.isnan(t)
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.bool, device=scores.device)
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude must match scores {tuple(scores.shape)}, got {tuple(exclude.shape)}")
        beats &= ~exclude
    beats[rows, targets] = False
    return 1 + beats.sum(dim=1)


def recall_at_k(ranks: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Per-user Recall@K = 1[rank <= K] (one target per user, so also the hit rate)."""
    r = _as_ranks(ranks)
    return (r <= k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Per-user NDCG@K = 1[rank <= K] / log2(rank + 1)."""
    r = _as_ranks(ranks)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def mrr_at_k(ranks: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Per-user reciprocal rank cut at K: 1[rank <= K] / rank."""
    r = _as_ranks(ranks)
    return np.where(r <= k, 1.0 / r, 0.0)


_FUNCS = {"recall": recall_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k}


def per_user(ranks: np.ndarray | torch.Tensor, metric: str, k: int) -> np.ndarray:
    """Per-user values of ``metric@k`` (metric: recall, ndcg or mrr)."""
    if metric not in _FUNCS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    return _FUNCS[metric](ranks, k)


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Mean Recall/NDCG/MRR at every K, keyed ``"recall@10"`` etc. Empty ranks give NaN."""
    r = _as_ranks(ranks)
    out: dict[str, float] = {}
    for name in METRICS:
        for k in ks:
            out[f"{name}@{k}"] = float(_FUNCS[name](r, k).mean()) if len(r) else float("nan")
    return out


def _as_ranks(ranks: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if len(r) and r.min() < 1:
        raise ValueError("ranks are 1-based; got a rank < 1")
    return r
