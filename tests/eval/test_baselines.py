"""Popularity and SASRec baselines on tiny data."""

from __future__ import annotations

import copy
from dataclasses import fields, replace

import pytest
import torch

from cprec.config.sections import EvalConfig
from cprec.eval.baselines import (
    SASRec,
    SASRecConfig,
    eval_field,
    popularity_counts,
    popularity_score_fn,
    popularity_scores,
    sasrec_config,
    sasrec_key,
    sasrec_score_fn,
    train_sasrec,
    validation_metrics,
)
from cprec.eval.inputs import Catalogue, load_inputs, load_split_users
from cprec.eval.ranking import build_tasks, evaluate


def test_popularity_counts_and_deterministic_ties():
    items = ["a2", "a1", "a3", "b1"]
    cat = Catalogue(items, ["A", "A", "A", "B"], items, items)
    train = [("u1", ["a1", "a3", "b1"], ["A", "A", "B"]), ("u2", ["a3", "a2", "zz"], ["A", "A", "A"])]
    counts = popularity_counts(train, cat)
    assert counts.tolist() == [1, 1, 2, 1]  # zz is not in the catalogue
    scores = popularity_scores(counts, cat)
    # a3 (2) first; then the count-1 items by id: a1, a2, b1
    order = sorted(range(4), key=lambda r: -scores[r])
    assert [items[r] for r in order] == ["a3", "a1", "a2", "b1"]
    assert len(set(scores.tolist())) == 4  # strict order: no ties left for the metric


def test_popularity_ranks_domain_items(tiny_prepared):
    inputs = load_inputs(tiny_prepared, "test")
    tasks = build_tasks(inputs)
    counts = popularity_counts(inputs.train_sequences, inputs.catalogue)
    fn = popularity_score_fn(popularity_scores(counts, inputs.catalogue))
    s = fn(tasks["B"], torch.arange(3).numpy())
    assert s.shape == (3, tasks["B"].n_items)
    res = evaluate(tasks, fn, [5, 50])
    assert set(res) == {"A", "B", "overall"}
    assert res["A"]["recall@50"] == 1.0  # K beyond the 12-item catalogue


def test_sasrec_learns_the_next_item_pattern(tiny_prepared):
    inputs = load_inputs(tiny_prepared, "test")
    cfg = SASRecConfig(hidden=32, max_len=10, epochs=30, batch_size=16, n_negatives=20, dropout=0.1, lr=5e-3)
    model, stats = train_sasrec(inputs.train_sequences, inputs.catalogue, cfg)
    losses = stats["epoch_losses"]
    assert len(losses) == 30 and losses[-1] < 0.6 * losses[0]
    tasks = build_tasks(inputs)
    sas = evaluate(tasks, sasrec_score_fn(model, inputs.catalogue), [1, 5])
    counts = popularity_counts(inputs.train_sequences, inputs.catalogue)
    pop = evaluate(tasks, popularity_score_fn(popularity_scores(counts, inputs.catalogue)), [1, 5])
    # the data follows i -> i+1 within a run, which popularity cannot see
    assert sas["overall"]["mrr@5"] > pop["overall"]["mrr@5"] + 0.2
    assert sas["overall"]["recall@1"] >= 0.4


def test_sasrec_state_dict_round_trip_and_causality():
    cfg = SASRecConfig(hidden=16, max_len=8, layers=1, dropout=0.0)
    m = SASRec(10, cfg).eval()
    m2 = SASRec(10, cfg).eval()
    m2.load_state_dict(m.state_dict())
    seq = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(m(seq), m2(seq))
    # position 1 must not see positions 2.. (changing a later item leaves earlier states alone)
    other = torch.tensor([[1, 2, 7, 9]])
    assert torch.allclose(m(seq)[0, :2], m(other)[0, :2], atol=1e-6)
    assert not torch.allclose(m(seq)[0, 2], m(other)[0, 2])


def _valid_tasks(prepared, inputs):
    users, skipped = load_split_users(prepared, "valid", inputs.catalogue)
    assert not skipped
    return build_tasks(replace(inputs, users=users))


def test_sasrec_early_stopping_stops_on_a_plateau(tiny_prepared):
    inputs = load_inputs(tiny_prepared, "test")
    valid = _valid_tasks(tiny_prepared, inputs)
    # lr 0: the weights never move, so validation NDCG@10 is the same every epoch: a plateau.
    cfg = SASRecConfig(
        hidden=16, max_len=10, epochs=20, patience=2, eval_every=1, lr=0.0, batch_size=16, n_negatives=8
    )
    model, stats = train_sasrec(inputs.train_sequences, inputs.catalogue, cfg, valid)
    assert stats["epochs_run"] == 3 and stats["best_epoch"] == 1 and stats["stopped_early"]
    assert [h["epoch"] for h in stats["valid_history"]] == [1, 2, 3]
    assert len({h["ndcg@10"] for h in stats["valid_history"]}) == 1
    assert stats["valid_users"] == 16 and stats["early_stopping"] == "on validation ndcg@10"

    # eval_every=3: evaluations at epochs 3, 6, 9 -> best 3, stop after 9.
    cfg = replace(cfg, eval_every=3)
    _, stats = train_sasrec(inputs.train_sequences, inputs.catalogue, cfg, valid)
    assert [h["epoch"] for h in stats["valid_history"]] == [3, 6, 9]
    assert stats["epochs_run"] == 9 and stats["best_epoch"] == 3

    # No validation users: no early stopping, every epoch runs, the last one is kept.
    _, stats = train_sasrec(inputs.train_sequences, inputs.catalogue, replace(cfg, epochs=4), None)
    assert stats["epochs_run"] == 4 and stats["best_epoch"] == 4 and not stats["stopped_early"]
    assert stats["early_stopping"].startswith("off") and stats["valid_history"] == []


def test_sasrec_is_tested_from_its_best_epoch(tiny_prepared):
    inputs = load_inputs(tiny_prepared, "test")
    valid = _valid_tasks(tiny_prepared, inputs)
    cfg = SASRecConfig(
        hidden=16,
        max_len=10,
        epochs=60,
        patience=2,
        eval_every=1,
        batch_size=16,
        n_negatives=8,
        lr=1e-2,
        dropout=0.1,
    )
    seen: dict[int, tuple[dict, dict]] = {}

    def keep(epoch, metrics, model):
        seen[epoch] = (metrics, copy.deepcopy(model.state_dict()))

    model, stats = train_sasrec(inputs.train_sequences, inputs.catalogue, cfg, valid, on_eval=keep)
    best, last = stats["best_epoch"], stats["epochs_run"]
    assert stats["stopped_early"] and last == max(seen) and last - best == cfg.patience
    values = [seen[e][0]["ndcg@10"] for e in sorted(seen)]
    assert best == 1 + values.index(max(values))  # the first epoch with the highest NDCG@10
    assert stats["best_valid_ndcg@10"] == max(values) > seen[last][0]["ndcg@10"] - 1e-12
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seen[best][1].items())  # the best weights...
    assert not all(torch.equal(state[k], v) for k, v in seen[last][1].items())  # ...not the last
    assert validation_metrics(model, inputs.catalogue, valid) == seen[best][0]


def test_sasrec_key_covers_validation_users_and_settings(tiny_prepared):
    inputs = load_inputs(tiny_prepared, "test")
    valid = _valid_tasks(tiny_prepared, inputs)
    cfg = SASRecConfig(hidden=16, max_len=10)
    key = sasrec_key(inputs.train_sequences, inputs.catalogue, cfg, valid)
    assert key != sasrec_key(inputs.train_sequences, inputs.catalogue, cfg, None)
    assert key != sasrec_key(inputs.train_sequences, inputs.catalogue, replace(cfg, patience=1), valid)
    assert key != sasrec_key(inputs.train_sequences, inputs.catalogue, replace(cfg, similarity="dot"), valid)
    fewer = {d: replace(t, users=t.users[:-1]) for d, t in valid.items()}
    assert key != sasrec_key(inputs.train_sequences, inputs.catalogue, cfg, fewer)


def test_sasrec_settings_have_one_home_in_the_eval_config():
    """SASRecConfig is eval.sasrec_* (+ eval.seed) under short names: same defaults, same checks."""
    in_eval = {f.name for f in fields(EvalConfig) if f.name.startswith("sasrec_")} | {"seed"}
    assert {eval_field(f.name) for f in fields(SASRecConfig)} == in_eval
    assert sasrec_config(EvalConfig()) == SASRecConfig()
    ecfg = EvalConfig(sasrec_hidden=12, sasrec_heads=3, sasrec_negatives=7, sasrec_similarity="dot", seed=4)
    got = sasrec_config(ecfg)
    assert (got.hidden, got.heads, got.n_negatives, got.similarity, got.seed) == (12, 3, 7, "dot", 4)
    with pytest.raises(ValueError, match="eval.sasrec_heads"):
        SASRecConfig(hidden=10, heads=3)
    with pytest.raises(ValueError, match="eval.sasrec_similarity"):
        SASRecConfig(similarity="euclid")
