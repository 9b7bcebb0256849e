"""The whole job on the real food-kitchen data at a tiny size: prepare -> stable -> anneal ->
fine-tune -> full-ranking eval with baselines, every model reported for domains A and B."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def _cprec(*args: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "cprec.cli", *args], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_food_kitchen_pretrain_finetune_eval(tmp_path, food_kitchen_dir, repo_root):
    cfg = {
        "include": [str(repo_root / "configs" / "food_kitchen.yaml")],
        "data": {"path": str(food_kitchen_dir), "output_dir": str(tmp_path / "prepared")},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 192},
        "train": {
            "output_dir": str(tmp_path / "stable"),
            "seq_len": 256,
            "micro_batch_size": 4,
            "max_steps": 8,
            "schedule": {"warmup_steps": 2},
            "checkpoint": {"every_steps": 4},
        },
        "eval": {
            "output_dir": str(tmp_path / "eval"),
            "max_users": 40,
            "finetune_epochs": 0.005,
            "sasrec_epochs": 1,
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "fk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _cprec("prepare", str(path))
    _cprec("train", str(path))
    anneal = [
        "train.phase=anneal",
        f"train.output_dir={tmp_path / 'anneal'}",
        f"train.init_from={tmp_path / 'stable'}",
        "train.max_steps=4",
        "train.schedule.decay_steps=4",
    ]
    _cprec("train", str(path), *anneal)
    _cprec("eval", str(path), f"eval.checkpoint={tmp_path / 'anneal' / 'final'}")

    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["protocol"]["name"] == "full"
    assert set(report["results"]) == {"llm-pretrained", "llm-finetuned", "popularity", "sasrec"}
    for model, per_domain in report["results"].items():
        assert {"A", "B"} <= set(per_domain), model
        assert 0.0 <= per_domain["A"]["recall@50"] <= 1.0
    assert report["n_users"]["A"] == report["n_users"]["B"] == 40
