"""benchmarks/quality.py at toy size: every row of the CPT study runs and lands in the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_quality_tiny_runs_every_row_and_writes_json(tmp_path, food_kitchen_dir, repo_root):
    results = tmp_path / "quality.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", CPREC_SHARED_DATA=str(food_kitchen_dir.parent))
    cmd = [
        sys.executable, str(repo_root / "benchmarks" / "quality.py"), "--size", "tiny",
        "--only", "food-kitchen:scratch-tiny", "--out", str(tmp_path / "q"), "--results", str(results),
        "--no-sasrec-reference",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = json.loads(results.read_text())
    (study,) = data["studies"]
    assert study["dataset"] == "food-kitchen" and study["domains"] == ["A", "B"]
    names = {r["name"] for r in study["rows"]}
    # A from-scratch model has no base row; every CPT row has both heads, the anneal row the generative
    # and re-ranked ones too, the pairwise row the pair-wise fine-tuned one; baselines once.
    assert names == {
        f"{row} · {head}"
        for row in ("stable", "anneal", "domain_only", "mixed_only")
        for head in ("zero-shot", "fine-tuned")
    } | {"anneal · generative", "anneal · re-ranked", "pairwise · fine-tuned", "popularity", "SASRec"}
    for r in study["rows"]:
        for d in ("A", "B"):
            iv = r["metrics"][d]["recall@10"]
            assert iv["low"] <= iv["mean"] <= iv["high"] and iv["n"] > 0
        if r["head"] != "baseline":
            assert r["pretrain_tokens"] > 0 and r["checkpoint"]
    assert set(study["seconds"]) >= {"prepare", "train/stable", "train/anneal", "eval/stable"}
    assert "| stable · fine-tuned |" in (tmp_path / "quality.md").read_text()
