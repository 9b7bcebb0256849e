"""Report files, Markdown, compare, and MLflow logging (real sqlite store)."""

from __future__ import annotations

import json

import pytest

from cprec.config import Config, EvalConfig, TrackingConfig
from cprec.eval.report import (
    build_report,
    compare,
    log_report_to_mlflow,
    metric_key,
    to_markdown,
    write_report,
)


def _report(protocol="full", recall_a=0.25) -> dict:
    res = {
        "llm-finetuned": {
            "A": {"recall@10": recall_a, "ndcg@10": 0.1, "mrr@10": 0.05},
            "B": {"recall@10": 0.5, "ndcg@10": 0.2, "mrr@10": 0.1},
            "overall": {"recall@10": 0.4, "ndcg@10": 0.15, "mrr@10": float("nan")},
        },
        "popularity": {"A": {"recall@10": 0.1, "ndcg@10": 0.05, "mrr@10": 0.02}},
    }
    return build_report(
        protocol=protocol,
        n_negatives=100,
        split="test",
        checkpoint={"path": "/x/final", "id": "abc"},
        ks=[10],
        n_users={"A": 4, "B": 6, "overall": 10},
        results=res,
    )


def test_report_fields_and_markdown():
    r = _report()
    assert r["protocol"] == {
        "name": "full",
        "n_negatives": None,
        "label": "full ranking",
        "masking": r["protocol"]["masking"],
        "ties": "pessimistic",
    }
    md = to_markdown(r)
    assert md.startswith("# Evaluation: full ranking, split `test`")
    assert "| llm-finetuned | A | 0.2500 | 0.1000 | 0.0500 |" in md
    assert "| llm-finetuned | overall | 0.4000 | 0.1500 | n/a |" in md
    s = _report("sampled")
    assert s["protocol"]["n_negatives"] == 100
    assert to_markdown(s).startswith("# Evaluation: sampled (N=100 negatives), split `test`")


def test_write_report_and_compare(tmp_path, capsys, caplog):
    a = write_report(_report(), tmp_path / "run_a")
    b = write_report(_report(recall_a=0.75), tmp_path / "run_b")
    assert set(a) == {"json", "md", "png"}
    assert a["png"].stat().st_size > 1000
    loaded = json.loads(a["json"].read_text())
    assert loaded["results"]["llm-finetuned"]["A"]["recall@10"] == 0.25
    assert loaded["n_users"]["overall"] == 10
    assert compare([str(a["json"]), str(b["json"].parent)]) == 0
    out = capsys.readouterr().out
    assert "run_a: recall@10" in out and "run_b: recall@10" in out
    assert "| llm-finetuned | A | 0.2500 | 0.1000 | 0.0500 | 0.7500 |" in out
    assert "| popularity | A |" in out
    c = write_report(_report("sampled"), tmp_path / "run_c")
    compare([str(a["json"]), str(c["json"])])
    assert "not comparable" in caplog.text
    with pytest.raises(FileNotFoundError):
        compare([str(tmp_path / "missing.json")])


def test_mlflow_logging_to_sqlite(tmp_path):
    cfg = Config(eval=EvalConfig(output_dir=str(tmp_path)), tracking=TrackingConfig(experiment="t-eval"))
    rep = _report()
    files = write_report(rep, tmp_path)
    run_id = log_report_to_mlflow(rep, cfg, files)
    assert run_id and (tmp_path / "mlflow.db").is_file()
    import mlflow

    run = mlflow.get_run(run_id)
    assert run.data.metrics[metric_key("llm-finetuned", "A", "recall@10")] == 0.25
    assert metric_key("llm-finetuned", "overall", "mrr@10") not in run.data.metrics  # NaN left out
    assert run.data.params["eval.split"] == "test"
    off = Config(tracking=TrackingConfig(backend="none"))
    assert log_report_to_mlflow(rep, off) is None
