"""Continual pre-training from the real SmolLM2-135M base: prepare with its tokenizer, a few CPT
steps under DeepSpeed, export — the exported model is the base plus those steps, not a new model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def _cprec(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "cprec.cli", *args], capture_output=True, text=True, timeout=1500, env=env
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_prepare_cpt_and_export_from_the_real_smollm2_base(tmp_path, food_kitchen_dir, repo_root):
    from transformers import AutoModelForCausalLM

    from cprec.model.bases import ensure_base

    cache = os.path.expanduser(os.environ.get("CPREC_CACHE", "~/.cache/cprec"))
    base = ensure_base("smollm2-135m", cache)
    common = [
        f"data.path={food_kitchen_dir}",
        f"data.output_dir={tmp_path / 'prepared'}",
        f"data.cache_dir={cache}",
        "data.tokenizer.path=smollm2-135m",
        "model.name_or_path=smollm2-135m",
        "data.max_doc_tokens=128",
        "train.seq_len=128",
        "train.micro_batch_size=2",
        "train.max_steps=3",
        "train.lr=1e-4",
        "train.schedule.warmup_steps=1",
        "train.checkpoint.every_steps=3",
        f"train.output_dir={tmp_path / 'run'}",
        "tracking.backend=none",
    ]
    cfg = str(repo_root / "configs" / "food_kitchen_stable.yaml")
    _cprec("prepare", cfg, *common)
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 49_152
    _cprec("train", cfg, *common)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # A pretrained model already predicts text: its first loss is far below a random init's ln(49152)=10.8.
    assert rows[0]["loss"] < 4.0, rows[0]
    _cprec("export", str(tmp_path / "run"), str(tmp_path / "hf"))
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    assert got.config.tie_word_embeddings and got.config.vocab_size == 49_152
    delta = max(float((a - b).abs().max()) for a, b in zip(got.parameters(), ref.parameters()))
    assert 0 < delta < 0.05, delta  # trained a little from the base weights, not from scratch
