"""Bootstrap intervals and paired differences over users."""

from __future__ import annotations

import numpy as np
import pytest

from cprec.eval.intervals import interval, paired_difference


def test_interval_covers_the_mean_and_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    small = rng.integers(1, 40, size=200)
    large = rng.integers(1, 40, size=5000)
    a, b = interval(small, "recall", 10), interval(large, "recall", 10)
    assert a["low"] <= a["mean"] <= a["high"] and a["n"] == 200
    assert (b["high"] - b["low"]) < (a["high"] - a["low"]) / 3  # ~ 1/sqrt(25) as wide
    assert a["mean"] == pytest.approx(np.mean(small <= 10))


def test_interval_is_reproducible_and_degenerate_when_constant():
    r = np.full(50, 3)
    out = interval(r, "recall", 10)
    assert out["low"] == out["high"] == out["mean"] == 1.0
    assert interval([5, 20, 1], "ndcg", 10) == interval([5, 20, 1], "ndcg", 10)


def test_paired_difference_marks_noise_and_real_gains():
    rng = np.random.default_rng(1)
    base = rng.integers(1, 100, size=400)
    better = np.maximum(1, base - 30)  # every user's target moves up by 30 places
    gain = paired_difference(better, base, "recall", 10)
    assert gain["diff"] > 0 and gain["significant"] and gain["low"] > 0
    noisy = base.copy()
    noisy[:2] = 1  # two users better: within noise
    small = paired_difference(noisy, base, "recall", 10)
    assert not small["significant"] and small["low"] <= 0 <= small["high"]
    assert small["relative"] == pytest.approx(small["diff"] / np.mean(base <= 10))


def test_paired_difference_needs_the_same_users():
    with pytest.raises(ValueError, match="same users"):
        paired_difference([1, 2, 3], [1, 2], "recall", 10)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference([1], [1], "hits", 10)
