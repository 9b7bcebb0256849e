"""Streaming full ranking (`cprec.eval.topk`) against the dense path, ties and history included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from topk_fixtures import integer_fixture, random_fixture
from torchrun_job import torchrun

from cprec.eval.inputs import EvalUser
from cprec.eval.metrics import target_ranks
from cprec.eval.ranking import DomainTask, evaluate, rank_task
from cprec.eval.topk import EmbeddingScorer, ItemShard, rank_users, shard_range, stream_rank

HERE = Path(__file__).parent


def dense_ranks(users, items, targets, history):
    scores = users @ items.t()
    exclude = torch.zeros(scores.shape, dtype=torch.bool)
    for b, h in enumerate(history):
        exclude[b, torch.from_numpy(h)] = True
    return target_ranks(scores, torch.from_numpy(targets), exclude).numpy()


def dense_topk(users, items, history, k):
    """Reference top-k: history left out, score descending, lower column first among ties."""
    scores = (users @ items.t()).numpy().astype(np.float64)
    scores = np.where(np.isnan(scores), np.inf, scores)
    vals = np.full((len(users), k), -np.inf)
    ids = np.full((len(users), k), -1, dtype=np.int64)
    for b, h in enumerate(history):
        keep = np.setdiff1d(np.arange(items.shape[0]), h)
        order = keep[np.lexsort((keep, -scores[b, keep]))][:k]
        vals[b, : len(order)], ids[b, : len(order)] = scores[b, order], order
    return vals, ids


def test_topk_fixture_has_exact_ties_with_targets_and_across_the_k_th_place():
    users, items, targets, history = integer_fixture()
    scores = users @ items.t()
    t = scores[torch.arange(len(users)), torch.from_numpy(targets)]
    tied_with_target = ((scores == t.unsqueeze(1)).sum(1) > 1).sum()
    assert tied_with_target >= 20  # pessimistic ties matter for many users
    top = scores.sort(dim=1, descending=True).values
    assert (top[:, 4] == top[:, 5]).sum() >= 20  # many ties straddle the 5th place


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 203, 1000])
@pytest.mark.parametrize("batch_size", [1, 16, 70])
def test_topk_streaming_ranks_equal_dense_with_ties_and_history(chunk, batch_size):
    users, items, targets, history = integer_fixture()  # 203 items: no chunk above divides it but 1/203
    want = dense_ranks(users, items, targets, history)
    ranks, _, _ = rank_users(users, ItemShard.of(items), targets, history, batch_size, chunk)
    np.testing.assert_array_equal(ranks, want)


@pytest.mark.parametrize("chunk", [7, 64, 100, 1000])
@pytest.mark.parametrize("k", [1, 5, 50, 250])
def test_topk_lists_equal_dense_sort_with_ties_and_history(chunk, k):
    users, items, targets, history = integer_fixture()
    want_v, want_i = dense_topk(users, items, history, k)  # k=250 > candidates: empty slots
    _, vals, ids = rank_users(users, ItemShard.of(items), targets, history, 16, chunk, k)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(vals, want_v)
    for b, h in enumerate(history):
        assert not set(ids[b].tolist()) & set(h.tolist())  # history never in a user's top-k


@pytest.mark.parametrize("chunk", [13, 256])
def test_topk_streaming_ranks_equal_dense_on_random_float_embeddings(chunk):
    users, items, targets, history = random_fixture()
    want = dense_ranks(users, items, targets, history)
    ranks, _, ids = rank_users(users, ItemShard.of(items), targets, history, 32, chunk, 10)
    np.testing.assert_array_equal(ranks, want)
    np.testing.assert_array_equal(ids, dense_topk(users, items, history, 10)[1])


def test_topk_nan_scores_follow_the_dense_rule():
    users, items, targets, history = random_fixture()
    items[[3, 50, 51]] = float("nan")  # NaN items beat every target
    users[[0, 9]] = float("nan")  # a NaN target score ranks last among the user's candidates
    targets[5] = 50
    want = dense_ranks(users, items, targets, history)
    ranks, vals, ids = rank_users(users, ItemShard.of(items), targets, history, 8, 40, 3)
    np.testing.assert_array_equal(ranks, want)
    assert ranks[0] == items.shape[0] - len(history[0])
    want_v, want_i = dense_topk(users, items, history, 3)  # NaN sorts first, as +inf
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(vals, want_v)


def test_topk_target_inside_its_own_history_is_counted_once():
    users, items, targets, history = integer_fixture()
    dup = [np.unique(np.concatenate([h, [t], h[:2]])) for h, t in zip(history, targets)]
    want = dense_ranks(users, items, targets, dup)  # the dense rule never masks the target
    ranks, _, _ = rank_users(users, ItemShard.of(items), targets, dup, 16, 64)
    np.testing.assert_array_equal(ranks, want)


def test_topk_shard_ranges_cover_the_catalogue():
    for n in (0, 1, 5, 203):
        for world in (1, 2, 3, 8):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1


def test_topk_a_slice_without_a_process_group_is_refused():
    users, items, targets, history = integer_fixture()
    half = ItemShard(items[:100], 0, len(items))
    with pytest.raises(ValueError, match="without a process group"):
        stream_rank(users[:4], items[targets[:4]], half, targets[:4], history[:4], 64)


def _task(targets, history, n_items) -> DomainTask:
    users = [EvalUser(f"u{i}", "A", [], "x") for i in range(len(targets))]
    return DomainTask("A", np.arange(n_items), users, targets, history)


class StreamingOnly(EmbeddingScorer):
    """An embedding scorer whose dense scores are off: the full protocol must not ask for them."""

    def __call__(self, task, batch):
        raise AssertionError("the full protocol asked an embedding scorer for dense scores")


def test_topk_embedding_scorer_ranks_the_full_protocol_like_the_dense_path():
    users, items, targets, history = integer_fixture()
    task = _task(targets, history, len(items))
    scorer = EmbeddingScorer({"A": users}, {"A": ItemShard.of(items)}, chunk=50)
    streaming = StreamingOnly(scorer.users, scorer.items, chunk=50)
    dense = lambda tk, b: scorer(tk, b)  # noqa: E731  (a plain ScoreFn: no rank_full)
    want = rank_task(task, dense, batch_size=16)
    np.testing.assert_array_equal(rank_task(task, streaming, batch_size=16), want)
    ks = [1, 5, 10]
    assert evaluate({"A": task}, streaming, ks) == evaluate({"A": task}, dense, ks)
    # The sampled protocol keeps the dense path (same scores, same negatives).
    s1 = evaluate({"A": task}, scorer, ks, "sampled", 20)
    assert s1 == evaluate({"A": task}, dense, ks, "sampled", 20)


@pytest.mark.dist
def test_topk_two_rank_sharded_ranking_equals_single_process(tmp_path):
    out = tmp_path / "dist_topk.pt"
    proc = torchrun([str(HERE / "topk_dist_worker.py"), str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    got = torch.load(out, weights_only=False)
    for name, fixture in (("integer", integer_fixture), ("random", random_fixture)):
        users, items, targets, history = fixture()
        ranks, vals, ids = rank_users(users, ItemShard.of(items), targets, history, 16, 37, 20)
        np.testing.assert_array_equal(got[name]["ranks"], dense_ranks(users, items, targets, history))
        np.testing.assert_array_equal(got[name]["ranks"], ranks)
        np.testing.assert_array_equal(got[name]["ids"], ids)
        np.testing.assert_array_equal(got[name]["vals"], vals)
    np.testing.assert_array_equal(got["scorer_ranks"], dense_ranks(*integer_fixture()))
    assert got["shard_sizes"] == [102, 101]  # each rank held about half of the 203 items
