"""Session fixtures for the 2-rank training tests: a tiny prepared folder and shared training runs.

Each `cprec train` launch costs ~15-30 s on CPU (imports, DeepSpeed start-up, MLflow store), so the
runs several tests look at are made once per session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from tiny_prepared import write_tiny_prepared
from train_launch import train

KILL_AT = 5  # the interrupted run dies right after step 5; its newest checkpoint is step 4


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    return write_tiny_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def train_yaml(tmp_path_factory, tiny_prepared) -> Path:
    """A ~40k-parameter llama on 64-token rows: 6 stable steps, a checkpoint every 2."""
    cfg = {
        "data": {"output_dir": str(tiny_prepared)},
        "model": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "max_position_embeddings": 256,
        },
        "train": {
            "seq_len": 64,
            "micro_batch_size": 2,
            "max_steps": 6,
            "lr": 1.0e-3,
            "log_every": 2,
            "loader": {"shuffle_buffer": 20},
            "schedule": {"warmup_steps": 2},
            "checkpoint": {"every_steps": 2, "keep_last": 2},
        },
    }
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def stable_run(train_yaml, runs_root) -> Path:
    """An uninterrupted 6-step stable run on 2 ranks (MLflow on)."""
    out = runs_root / "stable"
    train(train_yaml, [f"train.output_dir={out}"])
    return out


@pytest.fixture(scope="session")
def killed_run(train_yaml, runs_root) -> Path:
    """The same run killed (SIGKILL, every rank) right after step 5: checkpoints up to step 4, MLflow
    metrics every step (``train.log_every=1``), so a resume replays a step MLflow already holds.

    Returns a pristine copy; tests copy it again before resuming.
    """
    out = runs_root / "killed"
    proc = train(
        train_yaml,
        [f"train.output_dir={out}", "train.log_every=1"],
        faults=["--kill-after", f"train:{KILL_AT}"],
        expect_ok=False,
    )
    assert proc.returncode != 0, "the kill hook did not stop the run"
    pristine = runs_root / "killed_pristine"
    shutil.copytree(out, pristine)
    return pristine


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
