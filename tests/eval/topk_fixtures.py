"""Embedding fixtures of the streaming-ranking tests (test_topk.py and its 2-rank worker)."""

from __future__ import annotations

import numpy as np
import torch


def _history(rng: np.random.Generator, n_users: int, n_items: int, targets: np.ndarray) -> list[np.ndarray]:
    out = []
    for t in targets:
        h = rng.choice(n_items, size=int(rng.integers(0, 16)), replace=False)
        out.append(np.sort(h[h != t]).astype(np.int64))
    return out


def _unit(x: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=-1)


def integer_fixture(n_users: int = 70, n_items: int = 203, dim: int = 8):
    """Small-integer embeddings: every score is exact in float32 whatever the summation order, and
    many items tie exactly (with the target, and across the k-th place)."""
    rng = np.random.default_rng(0)
    users = torch.from_numpy(rng.integers(-1, 3, size=(n_users, dim)).astype(np.float32))
    items = torch.from_numpy(rng.integers(-1, 2, size=(n_items, dim)).astype(np.float32))
    targets = rng.integers(0, n_items, size=n_users).astype(np.int64)
    return users, items, targets, _history(rng, n_users, n_items, targets)


def random_fixture(n_users: int = 50, n_items: int = 300, dim: int = 32):
    """L2-normalised float embeddings, as the LLM encoder gives."""
    rng = np.random.default_rng(1)
    users = _unit(rng.standard_normal((n_users, dim)))
    items = _unit(rng.standard_normal((n_items, dim)))
    targets = rng.integers(0, n_items, size=n_users).astype(np.int64)
    return users, items, targets, _history(rng, n_users, n_items, targets)
