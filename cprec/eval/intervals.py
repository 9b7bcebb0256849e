"""How sure a metric is: bootstrap intervals over users, and paired differences between two models.

Every reported metric is a mean over users of a per-user value computed from the target's rank
(``metrics.per_user``). With a few hundred users per domain, recall@10 moves by several points
between resamples of the users, so a table of means alone invites reading noise as progress. Two
questions get answered here, both by resampling users with replacement (percentile bootstrap,
seeded, so a report is reproducible):

- ``interval``: the 95% interval of one model's mean on one domain.
- ``paired_difference``: the interval of (model A − model B) over the *same* users. Pairing removes
  the variation between users that both models share, so it is much tighter than comparing two
  separate intervals; a difference whose interval contains 0 is *within noise* and is marked so.

Pure functions of rank arrays; numpy only.
"""

from __future__ import annotations

import numpy as np

from cprec.eval.metrics import per_user

CONFIDENCE = 0.95
RESAMPLES = 2000


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    # Chunked so 2,000 resamples of 100k users never allocate more than ~100 MB at once.
    out, chunk = [], max(1, 10_000_000 // max(n, 1))
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out)


def interval(
    ranks, metric: str, k: int, *, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> dict:
    """``{"mean", "low", "high", "n"}`` of ``metric@k`` over users (percentile bootstrap)."""
    values = per_user(np.asarray(ranks), metric, k)
    if len(values) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    means = _bootstrap_means(values, resamples, seed)
    a = (1 - confidence) / 2
    return {
        "mean": float(values.mean()),
        "low": float(np.quantile(means, a)),
        "high": float(np.quantile(means, 1 - a)),
        "n": int(len(values)),
    }


def paired_difference(
    ranks_a,
    ranks_b,
    metric: str,
    k: int,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """``{"diff", "low", "high", "relative", "significant", "n"}`` of mean(A) − mean(B), same users.

    ``relative`` is diff / mean(B) (None when B is 0); ``significant`` is False when the interval
    contains 0 (the difference is within the noise of the test set).
    """
    a = per_user(np.asarray(ranks_a), metric, k)
    b = per_user(np.asarray(ranks_b), metric, k)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same users: {len(a)} vs {len(b)} ranks")
    if len(a) == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "relative": None,
                "significant": False, "n": 0}  # fmt: skip
    d = a - b
    means = _bootstrap_means(d, resamples, seed)
    q = (1 - confidence) / 2
    low, high = float(np.quantile(means, q)), float(np.quantile(means, 1 - q))
    base = float(b.mean())
    return {
        "diff": float(d.mean()),
        "low": low,
        "high": high,
        "relative": float(d.mean()) / base if base > 0 else None,
        "significant": bool(low > 0 or high < 0),
        "n": int(len(d)),
    }
