"""MLflow tracking on a real sqlite store: params, metrics, run reuse, parent link, rank gating."""

from __future__ import annotations

import json

import pytest

from cprec.config import load_config
from cprec.runtime.tracking import PARENT_TAG, TRACKING_FILE, NullTracker, default_uri, make_tracker

pytest.importorskip("mlflow")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_run_params_metrics_and_resume(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.output_dir={out}", "tracking.tags={team: recsys}"])
    tracker = make_tracker(cfg, out, rank=0)
    tracker.log_metrics({"loss": 2.5, "lr": 1e-3, "tokens/A/domain": 100.0, "nan": float("nan")}, step=1)
    tracker.log_metrics({"loss": 2.0}, step=2)
    tracker.finish()
    uri = default_uri(out)
    assert uri == f"sqlite:///{out.resolve()}/mlflow.db"
    run = _client(uri).get_run(tracker.run_id)
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["train.betas"] == "[0.9, 0.95]"
    assert run.data.tags["cprec.phase"] == "stable" and run.data.tags["team"] == "recsys"
    assert run.info.status == "FINISHED"
    history = _client(uri).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert "nan" not in run.data.metrics  # non-finite values are not sent
    assert json.loads((out / TRACKING_FILE).read_text())["run_id"] == tracker.run_id

    again = make_tracker(cfg, out, rank=0)  # the job resumes: same run
    assert again.run_id == tracker.run_id and again.resumed
    assert _client(uri).get_run(tracker.run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 1.5}, step=3)
    assert len(_client(uri).get_metric_history(tracker.run_id, "loss")) == 3
    assert len(_client(uri).search_runs([run.info.experiment_id])) == 1


def test_parent_link_and_gating(tmp_path):
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    stable = load_config(None, [f"train.output_dir={tmp_path / 's'}", f"tracking.uri={shared}"])
    parent = make_tracker(stable, tmp_path / "s", rank=0)
    anneal = load_config(
        None, ["train.phase=anneal", f"train.output_dir={tmp_path / 'a'}", f"tracking.uri={shared}"]
    )
    child = make_tracker(
        anneal, tmp_path / "a", rank=0, parent={"run_id": parent.run_id, "tracking_uri": shared}
    )
    tags = _client(shared).get_run(child.run_id).data.tags
    assert tags[PARENT_TAG] == parent.run_id and tags["mlflow.parentRunId"] == parent.run_id
    assert tags["cprec.phase"] == "anneal"

    assert isinstance(make_tracker(stable, tmp_path / "s", rank=1), NullTracker)
    off = load_config(None, ["tracking.backend=none"])
    assert isinstance(make_tracker(off, tmp_path / "o", rank=0), NullTracker)


def test_long_param_values_are_truncated(tmp_path):
    long = "x" * 7000
    cfg = load_config(None, [f"train.output_dir={tmp_path}", f"tracking.run_name={long[:10]}"])
    tracker = make_tracker(cfg, tmp_path, rank=0)
    tracker.log_params({"long": long})
    value = _client(default_uri(tmp_path)).get_run(tracker.run_id).data.params["long"]
    assert len(value) <= 6000 and value.endswith("...")


def test_keys_from_user_data_are_sanitised(tmp_path):
    """Config keys can hold user data (ML-1M genre "Children's" in data.domain_map); MLflow refuses
    such names, so they are mapped rather than crashing the run."""
    cfg = load_config(None, [f"train.output_dir={tmp_path}", 'data.domain_map={"Children\'s": kids}'])
    tracker = make_tracker(cfg, tmp_path, rank=0)
    tracker.log_params({"data.domain_map.Children's": "kids"})
    tracker.log_metrics({"tokens/Children's/domain": 3.0}, step=1)
    run = _client(default_uri(tmp_path)).get_run(tracker.run_id)
    assert run.data.params["data.domain_map.Children_s"] == "kids"
    assert run.data.metrics["tokens/Children_s/domain"] == 3.0


def test_resumed_run_keeps_one_value_per_step(tmp_path):
    """Killed at step 5 after its checkpoint at step 2, the job resumes from step 2 and replays
    steps 3-5: the MLflow run must still hold exactly one loss per step (the first values)."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.output_dir={out}"])
    first = make_tracker(cfg, out, rank=0)
    for step in range(1, 6):
        first.log_metrics({"loss": 10.0 - step, "lr": 0.1}, step)
    # killed: no finish(); the rerun finds the run id in tracking.json
    resumed = make_tracker(cfg, out, rank=0)
    assert resumed.resumed and resumed.run_id == first.run_id
    for step in range(3, 9):
        resumed.log_metrics({"loss": 10.0 - step + 0.001, "lr": 0.1, "grad_norm": 1.0}, step)
    client = _client(default_uri(out))
    loss = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")]
    assert sorted(s for s, _ in loss) == list(range(1, 9))  # 8 steps, 8 rows
    assert dict(loss)[5] == 5.0 and dict(loss)[6] == pytest.approx(4.001)
    assert len(client.get_metric_history(first.run_id, "lr")) == 8
    assert [m.step for m in client.get_metric_history(first.run_id, "grad_norm")] == [3, 4, 5, 6, 7, 8]
