"""Metric functions against hand-computed cases (ties, masking, K beyond the catalogue)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cprec.eval.metrics import metrics_from_ranks, mrr_at_k, ndcg_at_k, recall_at_k, target_ranks


def test_rank_is_one_plus_items_scoring_higher():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.1, 0.0]])
    # row 0: target col 2 (0.5): only 0.9 beats it -> rank 2. Row 1: target col 0 is the best -> 1.
    assert target_ranks(scores, torch.tensor([2, 0])).tolist() == [2, 1]


def test_ties_are_pessimistic():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    # two other items tie with the target: both count as above it -> rank 3, not 1.
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3]
    # all-equal scores give the worst rank: the number of candidates
    assert target_ranks(torch.zeros(1, 6), torch.tensor([0])).tolist() == [6]


def test_masked_items_do_not_count_and_target_is_never_masked():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    exclude = torch.tensor([[True, False, True, False, False]])
    # target col 3 (0.6): higher are cols 0, 1, 2; cols 0 and 2 are masked -> rank 2
    assert target_ranks(scores, torch.tensor([3]), exclude).tolist() == [2]
    # a mask on the target itself is ignored (a repeat purchase is still a valid target)
    exclude_t = torch.tensor([[True, False, True, True, False]])
    assert target_ranks(scores, torch.tensor([3]), exclude_t).tolist() == [2]


def test_nan_scores_are_pessimistic():
    scores = torch.tensor([[0.2, float("nan"), 0.1], [float("nan"), 0.3, 0.2]])
    # row 0: target 0.2 beaten by the NaN -> 2; row 1: NaN target ranks last among 3 -> 3
    assert target_ranks(scores, torch.tensor([0, 0])).tolist() == [2, 3]


def test_numpy_input_and_bad_shapes():
    assert target_ranks(np.array([[1.0, 2.0]]), np.array([0])).tolist() == [2]
    with pytest.raises(ValueError, match="target index"):
        target_ranks(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="exclude"):
        target_ranks(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bool))


def test_recall_ndcg_mrr_by_hand():
    ranks = np.array([1, 2, 5, 11])
    assert recall_at_k(ranks, 5).tolist() == [1, 1, 1, 0]
    assert ndcg_at_k(ranks, 5).tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(6), 0.0])
    assert mrr_at_k(ranks, 5).tolist() == pytest.approx([1.0, 0.5, 0.2, 0.0])
    m = metrics_from_ranks(ranks, [1, 5, 10])
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["recall@5"] == pytest.approx(0.75)
    assert m["recall@10"] == pytest.approx(0.75)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0.2) / 4)
    assert set(m) == {f"{n}@{k}" for n in ("recall", "ndcg", "mrr") for k in (1, 5, 10)}


def test_k_larger_than_catalogue_counts_every_user():
    scores = torch.tensor([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    ranks = target_ranks(scores, torch.tensor([2, 0]))
    assert ranks.tolist() == [3, 3]
    m = metrics_from_ranks(ranks, [50])
    assert m["recall@50"] == 1.0
    assert m["ndcg@50"] == pytest.approx(0.5)  # 1/log2(4)
    assert m["mrr@50"] == pytest.approx(1 / 3)


def test_empty_and_invalid_ranks():
    assert math.isnan(metrics_from_ranks([], [10])["recall@10"])
    with pytest.raises(ValueError, match="1-based"):
        recall_at_k(np.array([0, 1]), 5)
