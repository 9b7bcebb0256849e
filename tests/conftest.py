"""Shared fixtures. Real data lives in ../shared/data; tests that need it skip with a reason."""

from __future__ import annotations

import os
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
