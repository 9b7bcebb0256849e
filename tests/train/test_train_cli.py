"""`cprec train` input errors: one clear line and exit code 2, before any training starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def cprec_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "cprec.cli", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a CLI start (imports, DeepSpeed init) on a loaded 2-core machine
    )


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  output_dir: {tmp_path / 'run'}\ndata:\n  output_dir: {tmp_path / 'prep'}\n")
    return path


def test_missing_prepared_data(config, tmp_path):
    r = cprec_train(str(config))
    assert r.returncode == 2
    assert f"{tmp_path / 'prep' / 'manifest.json'} not found" in r.stderr and "cprec prepare" in r.stderr
    assert "Traceback" not in r.stderr


def test_anneal_needs_init_from(config, tmp_path):
    (tmp_path / "prep").mkdir()
    manifest = '{"format_version": 1, "tokenizer": {"hash": "h", "vocab_size": 100}}'
    (tmp_path / "prep" / "manifest.json").write_text(manifest)
    r = cprec_train(str(config), "train.phase=anneal")
    assert r.returncode == 2 and "train.init_from" in r.stderr and "Traceback" not in r.stderr
    r = cprec_train(str(config), "train.phase=anneal", f"train.init_from={tmp_path / 'stable'}")
    assert r.returncode == 2 and f"checkpoint not found: {tmp_path / 'stable'}" in r.stderr
