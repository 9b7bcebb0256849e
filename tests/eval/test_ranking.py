"""Per-domain ranking tasks: candidates, masking of history, the sampled protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cprec.eval.inputs import Catalogue, EvalInputs, EvalUser, load_inputs
from cprec.eval.ranking import build_tasks, evaluate, protocol_label, rank_task, sample_candidates


def _inputs() -> EvalInputs:
    items = ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    doms = ["A"] * 4 + ["B"] * 3
    cat = Catalogue(items, doms, items, items)
    users = [
        EvalUser("u1", "A", ["a0", "b1", "a2"], "a3"),  # in-domain history a0, a2
        EvalUser("u2", "A", ["a1", "a3"], "a1"),  # repeat: target a1 also in history
        EvalUser("u3", "B", ["a0", "zz"], "b2"),  # unknown history item ignored
    ]
    return EvalInputs(cat, users, [], ["A", "B"])


def test_tasks_hold_domain_catalogue_and_masks():
    tasks = build_tasks(_inputs())
    a, b = tasks["A"], tasks["B"]
    assert a.rows.tolist() == [0, 1, 2, 3] and b.rows.tolist() == [4, 5, 6]
    assert a.targets.tolist() == [3, 1] and b.targets.tolist() == [2]
    assert [h.tolist() for h in a.history_cols] == [[0, 2], [3]]  # target a1 is not masked
    assert b.history_cols[0].tolist() == []


def test_full_ranking_masks_history():
    tasks = build_tasks(_inputs())
    # every user scores A items as a0 > a1 > a2 > a3
    fixed = torch.tensor([4.0, 3.0, 2.0, 1.0])

    def score(task, batch):
        return fixed[: task.n_items].unsqueeze(0).expand(len(batch), -1)

    ranks = rank_task(tasks["A"], score)
    # u1: target a3, a0 and a2 masked, a1 above -> 2. u2: target a1, a3 masked, a0 above -> 2.
    assert ranks.tolist() == [2, 2]
    res = evaluate(tasks, score, [1, 2])
    assert res["A"]["recall@1"] == 0.0 and res["A"]["recall@2"] == 1.0
    # B: target b2 (score 2.0) below b0, b1 -> 3; overall pools the 3 users
    assert res["B"]["mrr@2"] == 0.0
    assert res["overall"]["recall@2"] == pytest.approx(2 / 3)


def test_max_users_is_a_seeded_sample():
    inputs = _inputs()
    inputs.users = [EvalUser(f"u{i}", "A", [], f"a{i % 4}") for i in range(20)]
    t1 = build_tasks(inputs, max_users=5, seed=3)["A"]
    t2 = build_tasks(inputs, max_users=5, seed=3)["A"]
    t3 = build_tasks(inputs, max_users=5, seed=4)["A"]
    assert len(t1.users) == 5
    assert [u.user for u in t1.users] == [u.user for u in t2.users]
    assert [u.user for u in t1.users] != [u.user for u in t3.users]


def test_sampled_protocol_candidates():
    tasks = build_tasks(_inputs())
    cands = sample_candidates(tasks["A"], n_negatives=1, seed=0)
    # u1: allowed negatives = {a1} only (a0, a2 history, a3 target)
    assert cands[0].tolist() == [1, 3]
    # u2: allowed = {a0, a2}; one drawn, plus the target a1
    assert len(cands[1]) == 2 and 1 in cands[1] and 3 not in cands[1]
    again = sample_candidates(tasks["A"], n_negatives=1, seed=0)
    assert all((x == y).all() for x, y in zip(cands, again))
    many = sample_candidates(tasks["A"], n_negatives=100, seed=0)  # fewer allowed than N: take all
    assert many[1].tolist() == [0, 1, 2]

    def score(task, batch):  # the target always scores lowest
        s = torch.ones(len(batch), task.n_items)
        s[torch.arange(len(batch)), torch.from_numpy(task.targets[batch])] = 0.0
        return s

    ranks = rank_task(tasks["A"], score, protocol="sampled", n_negatives=1)
    assert ranks.tolist() == [2, 2]  # 1 negative above the target, not the whole catalogue
    assert protocol_label("sampled", 1000) == "sampled (N=1000 negatives)"


def test_score_shape_is_checked():
    tasks = build_tasks(_inputs())
    with pytest.raises(ValueError, match="score function returned"):
        rank_task(tasks["A"], lambda task, batch: torch.zeros(len(batch), 2))


def test_load_inputs_counts_and_errors(tiny_prepared, tmp_path):
    inputs = load_inputs(tiny_prepared, "test")
    assert inputs.domains == ["A", "B"]
    assert len(inputs.users) == 16 and inputs.skipped == {}
    with pytest.raises(FileNotFoundError, match="items.parquet"):
        load_inputs(tmp_path, "test")
    assert np.all([u.target in inputs.catalogue.index for u in inputs.users])
