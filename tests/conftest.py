"""Shared fixtures. Real data lives in ../shared/data; tests that need it skip with a reason."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import; this machine class has no GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CPREC_SHARED_DATA", REPO.parent / "shared" / "data"))
FOOD_KITCHEN = SHARED_DATA / "food-kitchen"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def food_kitchen_dir() -> Path:
    if not (FOOD_KITCHEN / "train_A.txt").is_file():
        pytest.skip(f"food-kitchen data not found at {FOOD_KITCHEN} (set CPREC_SHARED_DATA)")
    return FOOD_KITCHEN


@pytest.fixture
def one_process_group(monkeypatch):
    """The variables a launcher would set (restored afterwards); the group is destroyed at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for k, v in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    yield
    from cprec.runtime.dist import destroy_distributed

    destroy_distributed()  # with DeepSpeed's cached world group: a later engine gets a fresh one
