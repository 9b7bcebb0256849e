"""Helpers for model tests: tiny configs and hand-packed batches that follow the packed-batch contract."""

from __future__ import annotations

import pytest
import torch

from cprec.config import ModelConfig

VOCAB = 101
PAD = 0


def pack_documents(docs: list[torch.Tensor], seq_len: int) -> tuple[dict, list[tuple[int, int, int]]]:
    """Greedy-pack whole documents into rows of ``seq_len``; return the batch and (doc, row, start) spans.

    Labels are shifted (label i = token i+1 of the same document, -100 on each document's last token
    and on padding); each row's padding tail is its own segment, as the loader contract says.
    """
    rows: list[list[int]] = [[]]
    for i, d in enumerate(docs):
        if len(d) > seq_len:
            raise ValueError("document longer than a row")
        if sum(len(docs[j]) for j in rows[-1]) + len(d) > seq_len:
            rows.append([])
        rows[-1].append(i)
    b = len(rows)
    input_ids = torch.full((b, seq_len), PAD, dtype=torch.long)
    labels = torch.full((b, seq_len), -100, dtype=torch.long)
    position_ids = torch.zeros((b, seq_len), dtype=torch.long)
    bounds, spans, n_tokens = [0], [], 0
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            d = docs[i]
            n = len(d)
            input_ids[r, pos : pos + n] = d
            labels[r, pos : pos + n - 1] = d[1:]
            position_ids[r, pos : pos + n] = torch.arange(n)
            spans.append((i, r, pos))
            pos += n
            n_tokens += n
            bounds.append(r * seq_len + pos)
        if pos < seq_len:
            position_ids[r, pos:] = torch.arange(seq_len - pos)
            bounds.append((r + 1) * seq_len)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(lengths),
        "n_tokens": n_tokens,
    }
    return batch, spans


def random_docs(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # ids from 1: 0 is the pad id
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def tiny_config(**over) -> ModelConfig:
    values = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="fp32")
    values.update(over)
    return ModelConfig(**values)


@pytest.fixture
def pack():
    """``pack(docs, seq_len) -> (batch, spans)``, see :func:`pack_documents`."""
    return pack_documents


@pytest.fixture
def make_docs():
    """``make_docs(lengths, seed=0) -> list of 1-D id tensors`` (ids >= 1; 0 is padding)."""
    return random_docs


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(**overrides) -> ModelConfig`` of a ~0.1M-parameter decoder (fp32)."""
    return tiny_config
