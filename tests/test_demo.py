"""`cprec demo` end to end at the reduced `tiny` size: the default job a new user runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One `cprec demo --size tiny` run, its stdout and stderr together as `2>&1` gives them."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("PYTHONWARNINGS", None)  # the user's default warning filters
    proc = subprocess.run(
        [sys.executable, "-m", "cprec.cli", "demo", "--size", "tiny", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=1800,  # ~10 min alone; a shared machine can take twice that
        env=env,
    )
    # Bytes decoded as they are: text mode would turn every "\r" of a progress bar's redraw into a
    # line break, which neither a terminal nor `wc -l` does.
    output = proc.stdout.decode("utf-8", errors="replace")
    assert proc.returncode == 0, output[-5000:]
    return out, output


def test_demo_tiny_runs_every_stage_and_prints_the_report(demo):
    out, output = demo
    # The printed study table and the pointers to the outputs.
    assert "| row | CPT tokens |" in output and "| anneal · fine-tuned |" in output
    assert "mlflow ui --backend-store-uri sqlite:///" in output
    assert (out / "study.json").is_file()

    # A from-scratch model has no base row: the anneal row's eval is the first, with the baselines.
    report = json.loads((out / "eval" / "anneal" / "report.json").read_text())
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


def test_demo_tiny_output_is_short_and_has_no_library_warning(demo):
    """`cprec demo --size tiny 2>&1 | wc -l` < 200 and no FutureWarning (it used to print one per step)."""
    _, output = demo
    assert "FutureWarning" not in output, [line for line in output.splitlines() if "Warning" in line][:5]
    assert output.count("\n") < 200, output[-3000:]  # what `wc -l` counts
