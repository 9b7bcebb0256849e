"""The CPT study's summary: rows per head, intervals, paired differences against the references."""

from __future__ import annotations

import pytest

from cprec.study import StudyPlan, study_markdown, summarize


def _report(ckpt: str, results: dict[str, list[int]], users=("u1", "u2", "u3", "u4")) -> dict:
    return {
        "protocol": {"name": "full", "label": "full ranking"},
        "split": "test",
        "n_users": {"A": len(users), "overall": len(users)},
        "checkpoint": {"path": ckpt},
        "users": {"A": list(users)},
        "results": {m: {"A": {}} for m in results},
        "ranks": {m: {"A": r} for m, r in results.items()},
        "models": {"sasrec": {"best_epoch": 7, "epochs_run": 10, "config": {}}},
    }


def test_summary_rows_intervals_and_differences(tmp_path):
    reports = {
        "base": _report(
            "/m/base",
            {
                "llm-pretrained": [50, 60, 70, 80],
                "llm-finetuned": [20, 30, 5, 40],
                "popularity": [3, 30, 30, 30],
                "sasrec": [2, 2, 40, 40],
            },  # fmt: skip
        ),
        "anneal": _report(str(tmp_path), {"llm-pretrained": [40, 50, 9, 80], "llm-finetuned": [1, 2, 3, 40]}),
    }
    (tmp_path / "cprec_export.json").write_text('{"tokens_seen": 12345}')
    s = summarize(reports, {"prepare": 1.0})
    names = [r["name"] for r in s["rows"]]
    assert names == [
        "base · zero-shot", "base · fine-tuned", "popularity", "SASRec",
        "anneal · zero-shot", "anneal · fine-tuned",
    ]  # fmt: skip
    rows = {r["name"]: r for r in s["rows"]}
    assert (
        rows["anneal · fine-tuned"]["pretrain_tokens"] == 12345
        and rows["base · zero-shot"]["pretrain_tokens"] == 0
    )
    assert rows["SASRec"]["details"] == {"best_epoch": 7, "epochs_run": 10}
    ft = rows["anneal · fine-tuned"]
    assert ft["metrics"]["A"]["recall@10"]["mean"] == pytest.approx(0.75)
    d = ft["vs"]["base · fine-tuned"]["A"]
    assert d["diff"] == pytest.approx(0.5) and d["n"] == 4
    assert "base · fine-tuned" not in rows["base · fine-tuned"]["vs"]  # no row against itself
    md = study_markdown(s)
    assert "anneal · fine-tuned | 12,345 | 0.7500 [" in md and "Δrecall@10 vs SASRec" in md


def test_summary_shows_generative_and_reranked_heads():
    rep = _report("/m/stable", {"llm-pretrained": [9, 9, 9, 9], "llm-generative": [1, 30, 2, 30],
                                "llm-reranked": [1, 2, 3, 30]})  # fmt: skip
    s = summarize({"stable": rep})
    rows = {r["name"]: r for r in s["rows"]}
    assert list(rows) == ["stable · zero-shot", "stable · generative", "stable · re-ranked"]
    assert rows["stable · generative"]["head"] == "generative"
    assert rows["stable · re-ranked"]["metrics"]["A"]["recall@10"]["mean"] == pytest.approx(0.75)
    assert "| stable · generative |" in study_markdown(s)


def test_rows_ranked_on_other_users_are_refused():
    a = _report("/a", {"llm-finetuned": [1, 2, 3, 4]})
    b = _report("/b", {"llm-finetuned": [1, 2, 3, 4]}, users=("u1", "u2", "u3", "u9"))
    with pytest.raises(ValueError, match="row 'b' was ranked on other users"):
        summarize({"a": a, "b": b})


def test_plan_validates_rows(tmp_path):
    with pytest.raises(ValueError, match="unknown \\['bogus'\\]"):
        StudyPlan(tmp_path / "s.yaml", tmp_path, rows=("bogus",))
    with pytest.raises(ValueError, match="'anneal' needs an anneal config"):
        StudyPlan(tmp_path / "s.yaml", tmp_path, rows=("anneal",))
    plan = StudyPlan(tmp_path / "s.yaml", tmp_path, rows=("stable", "base"))
    assert plan.rows == ("base", "stable")  # always run in the documented order


def test_plan_pairwise_row_needs_a_cpt_checkpoint_and_row_overrides_name_rows(tmp_path):
    with pytest.raises(ValueError, match="'pairwise' needs the stable or anneal row"):
        StudyPlan(tmp_path / "s.yaml", tmp_path, rows=("base", "pairwise"))
    with pytest.raises(ValueError, match="row_overrides: unknown rows \\['nope'\\]"):
        StudyPlan(tmp_path / "s.yaml", tmp_path, rows=("stable",), row_overrides={"nope": []})
    plan = StudyPlan(tmp_path / "s.yaml", tmp_path, rows=("pairwise", "stable"))
    assert plan.rows == ("stable", "pairwise")
