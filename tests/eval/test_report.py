"""Report files, Markdown, compare, and tracking through the shared tracker (real sqlite store)."""

from __future__ import annotations

import json

import pytest

from cprec.config import Config, EvalConfig, TrackingConfig
from cprec.eval.report import (
    build_report,
    checkpoint_tags,
    close_tracker,
    compare,
    headline_line,
    log_report_to_mlflow,
    metric_key,
    open_tracker,
    report_metrics,
    summary_lines,
    to_markdown,
    write_report,
)
from cprec.runtime.tracking import TRACKING_FILE, NullTracker, default_uri, mlflow_key


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


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_logging_to_sqlite(tmp_path):
    cfg = Config(eval=EvalConfig(output_dir=str(tmp_path)), tracking=TrackingConfig(experiment="t-eval"))
    rep = _report()
    files = write_report(rep, tmp_path)
    run_id = log_report_to_mlflow(rep, cfg, files)
    assert run_id and (tmp_path / "mlflow.db").is_file()
    client = _client(default_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.data.metrics[metric_key("llm-finetuned", "A", "recall@10")] == 0.25
    assert metric_key("llm-finetuned", "overall", "mrr@10") not in run.data.metrics  # NaN left out
    assert run.data.metrics["n_users/overall"] == 10
    assert run.data.params["eval.split"] == "test"
    assert run.data.tags["cprec.job"] == "eval" and run.data.tags["cprec.protocol"] == "full ranking"
    assert run.data.tags["cprec.eval.checkpoint"] == "/x/final"
    assert run.info.run_name == f"eval-{tmp_path.name}" and run.info.status == "FINISHED"
    # the report files are artifacts, stored next to the default store (not in ./mlruns)
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.json", "report.md", "metrics.png"}
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    # a finished eval is not continued: the next one is a new run in the same store
    again = log_report_to_mlflow(rep, cfg, files)
    assert again != run_id and len(client.search_runs([run.info.experiment_id])) == 2
    off = Config(tracking=TrackingConfig(backend="none"))
    assert log_report_to_mlflow(rep, off) is None


def test_domain_names_from_user_data_are_sanitised(tmp_path):
    """A genre like "Children's" (ML-1M) is a domain name; MLflow refuses the quote in a metric name."""
    rep = _report()
    rep["results"]["llm-finetuned"]["Children's"] = {"recall@10": 0.125, "ndcg@10": 0.1, "mrr@10": 0.1}
    rep["n_users"]["Children's"] = 3
    cfg = Config(eval=EvalConfig(output_dir=str(tmp_path)))
    run_id = log_report_to_mlflow(rep, cfg, write_report(rep, tmp_path))
    metrics = _client(default_uri(tmp_path)).get_run(run_id).data.metrics
    assert metrics[mlflow_key(metric_key("llm-finetuned", "Children's", "recall@10"))] == 0.125
    assert metrics["llm-finetuned/Children_s/recall_at_10"] == 0.125 and metrics["n_users/Children_s"] == 3


def test_report_metrics_and_name_collisions(caplog):
    rep = _report()
    rep["seconds"] = {"rank/popularity": 1.5}
    m = report_metrics(rep)
    assert m["popularity/A/ndcg_at_10"] == 0.05 and m["seconds/rank/popularity"] == 1.5
    assert len([k for k in m if "_at_" in k]) == 11  # 12 results, one NaN
    rep["results"]["popularity"]["A's"] = rep["results"]["popularity"]["A_s"] = {"recall@10": 0.1}
    report_metrics(rep)
    assert "same once sanitised" in caplog.text


def test_checkpoint_tags_link_the_training_run(tmp_path):
    ds = tmp_path / "step_0000012"
    ds.mkdir()
    state = {"run_id": "abc123", "tracking_uri": "sqlite:///r.db", "step": 12, "phase": "stable"}
    (ds / "trainer_state.json").write_text(json.dumps(state))
    tags = checkpoint_tags({"path": str(ds), "id": "i1", "kind": "deepspeed"})
    assert tags == {
        "cprec.eval.checkpoint": str(ds),
        "cprec.eval.checkpoint_id": "i1",
        "cprec.eval.checkpoint_kind": "deepspeed",
        "cprec.train_run_id": "abc123",
        "cprec.train_tracking_uri": "sqlite:///r.db",
        "cprec.train_step": "12",
        "cprec.train_phase": "stable",
    }
    export = tmp_path / "final"  # an HF export made by the trainer names its run in cprec_export.json
    export.mkdir()
    (export / "cprec_export.json").write_text(json.dumps({"run_id": "def456", "step": 20}))
    assert checkpoint_tags({"path": str(export), "kind": "hf"})["cprec.train_run_id"] == "def456"
    assert "cprec.train_run_id" not in checkpoint_tags({"path": str(tmp_path / "nothing")})


def test_interrupted_eval_continues_its_run(tmp_path):
    cfg = Config(eval=EvalConfig(output_dir=str(tmp_path)))
    first = open_tracker(cfg)
    first.log_metrics({"finetune/loss": 2.0}, step=1)
    first.finish("FAILED")  # the job died; tracking.json is not marked completed
    again = open_tracker(cfg)
    assert again.run_id == first.run_id
    close_tracker(again, tmp_path)
    assert json.loads((tmp_path / TRACKING_FILE).read_text())["completed"] is True
    assert open_tracker(cfg).run_id != first.run_id
    assert isinstance(open_tracker(cfg, rank=1), NullTracker)


def test_summary_lines_name_metric_and_k_in_every_line():
    per_domain = {"movies": {"recall@10": 0.1, "ndcg@10": 0.05, "recall@50": 0.1391}, "overall": {}}
    lines = summary_lines("popularity", per_domain, [1, 10, 50])
    assert lines == [
        "popularity recall@10: movies 0.1000, overall n/a",
        "popularity ndcg@10: movies 0.0500, overall n/a",
        "popularity recall@50: movies 0.1391, overall n/a",
    ]
    assert summary_lines("m", {"A": {"recall@5": 0.5, "ndcg@5": 0.25}}, [1, 5]) == [
        "m recall@5: A 0.5000",
        "m ndcg@5: A 0.2500",
    ]


def test_headline_line_is_one_line_over_all_domains():
    overall = {"recall@10": 0.2, "ndcg@10": 0.05, "recall@50": 0.3}
    per_domain = {"movies": {"recall@10": 0.1}, "overall": overall}
    assert headline_line("sasrec", per_domain, [1, 10, 50]) == (
        "sasrec overall: recall@10 0.2000, ndcg@10 0.0500, recall@50 0.3000"
    )
    one = {"A": {"recall@5": 0.5, "ndcg@5": 0.25}}
    assert headline_line("m", one, [5]) == "m A: recall@5 0.5000, ndcg@5 0.2500"
