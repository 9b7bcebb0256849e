"""`cprec demo` end to end at the reduced `tiny` size: the default job a new user runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_tiny_runs_every_stage_and_prints_the_report(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "cprec.cli", "demo", "--size", "tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    # The printed table and the pointers to the outputs.
    assert "| model | domain |" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["protocol"]["name"] == "full"
    assert set(report["results"]) == {"llm-pretrained", "llm-finetuned", "popularity", "sasrec"}
    domains = {"action", "comedy", "drama"}
    for model, per_domain in report["results"].items():
        assert domains | {"overall"} <= set(per_domain), model

    # Stable and anneal are separate runs; the anneal continued the stable run's global step.
    stable = json.loads((out / "runs" / "stable" / "metrics.jsonl").read_text().splitlines()[-1])
    anneal_rows = (out / "runs" / "anneal" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(anneal_rows[0])["step"] == stable["step"] + 1
    assert (out / "runs" / "anneal" / "final" / "config.json").is_file()
    assert (out / "mlflow.db").is_file()
