"""Packing invariants: no label across a piece boundary, position ids restart, cu_seqlens match."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cprec.stream.packing import (
    IGNORE_INDEX,
    BestFitPacker,
    GreedyPacker,
    collate_rows,
    make_packer,
    padding_efficiency,
)

PAD = 0


def doc(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


def rows_of(packer, docs, flush=True):
    out = []
    for d in docs:
        packer.push(d, f"s{int(d[0]) % 2}/domain")
        while packer.n_ready:
            out.append(packer.pop_row())
    if flush:
        out += packer.flush()
    return out


def check_batch(batch: dict, rows: list, L: int) -> None:
    """Every contract invariant of a packed batch, against the rows it was built from."""
    B = len(rows)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    cu = batch["cu_seqlens"]
    assert ids.shape == labels.shape == pos.shape == (B, L)
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
    cu = cu.tolist()
    assert cu[0] == 0 and cu[-1] == B * L and all(a < b for a, b in zip(cu, cu[1:]))
    assert batch["max_seqlen"] == max(b - a for a, b in zip(cu, cu[1:]))
    flat_ids, flat_lab, flat_pos = ids.flatten(), labels.flatten(), pos.flatten()
    segments = list(zip(cu, cu[1:]))
    seg_iter = iter(segments)
    n_tokens, per_stream = 0, {}
    for b, row in enumerate(rows):
        off = b * L
        for tokens, stream in row:
            a, e = next(seg_iter)
            assert (a, e) == (off, off + len(tokens)), "one segment per piece, in order"
            assert flat_ids[a:e].tolist() == list(tokens)
            assert flat_pos[a:e].tolist() == list(range(len(tokens))), "positions restart per piece"
            assert flat_lab[a : e - 1].tolist() == list(tokens[1:]), "labels are the next token"
            assert flat_lab[e - 1] == IGNORE_INDEX, "no label across the piece boundary"
            off = e
            n_tokens += len(tokens)
            per_stream[stream] = per_stream.get(stream, 0) + len(tokens)
        if off < (b + 1) * L:
            a, e = next(seg_iter)
            assert (a, e) == (off, (b + 1) * L), "the padding tail is its own segment"
            assert (flat_ids[a:e] == PAD).all() and (flat_lab[a:e] == IGNORE_INDEX).all()
    assert next(seg_iter, None) is None
    # No segment crosses a row.
    assert all(a // L == (e - 1) // L for a, e in segments)
    assert batch["n_tokens"] == n_tokens == int((labels != IGNORE_INDEX).sum()) + sum(len(r) for r in rows)
    assert batch["stream_tokens"] == per_stream


@pytest.mark.parametrize("kind", ["greedy", "bestfit"])
def test_random_documents_keep_every_invariant(kind):
    rng = random.Random(0)
    L = 16
    docs = [doc(rng.randint(1, 40), start=rng.randint(1, 500)) for _ in range(200)]
    packer = make_packer(kind, L, bestfit_buffer=8)
    rows = rows_of(packer, docs)
    for i in range(0, len(rows), 4):
        check_batch(collate_rows(rows[i : i + 4], L, PAD), rows[i : i + 4], L)
    # Nothing is lost or duplicated: every document's tokens come out, in pieces, once.
    pieces = sorted(tuple(t.tolist()) for r in rows for t, _ in r)
    total = sum(len(d) for d in docs)
    assert sum(len(p) for p in pieces) == total
    assert all(sum(len(t) for t, _ in r) <= L for r in rows)


def test_greedy_fills_rows_and_splits_at_the_boundary():
    L = 8
    rows = rows_of(GreedyPacker(L), [doc(3), doc(5, 10), doc(6, 20)])
    assert [[t.tolist() for t, _ in r] for r in rows] == [
        [[1, 2, 3], [10, 11, 12, 13, 14]],
        [[20, 21, 22, 23, 24, 25]],
    ]
    rows = rows_of(p := GreedyPacker(L), [doc(6), doc(6, 20)])
    assert [[t.tolist() for t, _ in r] for r in rows] == [[[1, 2, 3, 4, 5, 6], [20, 21]], [[22, 23, 24, 25]]]
    assert p.splits == 1


@pytest.mark.parametrize("kind", ["greedy", "bestfit"])
def test_document_of_exactly_seq_len_is_one_row(kind):
    packer = make_packer(kind, 8, 4)
    packer.push(doc(8), "a/domain")
    assert packer.n_ready == 1
    row = packer.pop_row()
    assert [t.tolist() for t, _ in row] == [list(range(1, 9))]
    assert packer.splits == 0
    batch = collate_rows([row], 8, PAD)
    assert batch["cu_seqlens"].tolist() == [0, 8] and batch["n_tokens"] == 8
    assert batch["labels"][0, -1] == IGNORE_INDEX


@pytest.mark.parametrize("kind", ["greedy", "bestfit"])
def test_long_document_is_split_not_dropped(kind):
    L = 8
    packer = make_packer(kind, L, 4)
    rows = rows_of(packer, [doc(21)])
    pieces = [t.tolist() for r in rows for t, _ in r]
    assert [x for p in pieces for x in p] == list(range(1, 22))
    assert [len(p) for p in pieces] == [8, 8, 5]
    assert packer.splits == 2
    batch = collate_rows(rows, L, PAD)
    check_batch(batch, rows, L)
    # The cut leaves no label pointing into the next piece.
    assert batch["labels"][0, 7] == IGNORE_INDEX and batch["position_ids"][1, 0] == 0


@pytest.mark.parametrize("kind", ["greedy", "bestfit"])
def test_empty_input(kind):
    packer = make_packer(kind, 8, 4)
    assert packer.n_ready == 0 and packer.flush() == []
    with pytest.raises(IndexError):
        packer.pop_row()


def test_one_token_documents_have_no_labels():
    L = 4
    rows = rows_of(GreedyPacker(L), [doc(1, 7), doc(1, 8), doc(1, 9)])
    batch = collate_rows(rows, L, PAD)
    check_batch(batch, rows, L)
    assert (batch["labels"] == IGNORE_INDEX).all()
    assert batch["position_ids"][0].tolist() == [0, 0, 0, 0]  # three pieces of 1, then a pad of 1
    assert batch["cu_seqlens"].tolist() == [0, 1, 2, 3, 4]


def test_bestfit_takes_the_longest_document_that_fits_and_never_splits_short_ones():
    L = 10
    packer = BestFitPacker(L, capacity=5)
    for n in (6, 5, 4, 3, 2):
        packer.push(doc(n, 10 * n), "a/domain")
    # Buffer full: row = 6 (longest), then 4 (longest fitting 4 slots); 5, 3, 2 wait.
    assert packer.n_ready == 1
    assert [len(t) for t, _ in packer.pop_row()] == [6, 4]
    rows = packer.flush()
    assert [[len(t) for t, _ in r] for r in rows] == [[5, 3, 2]]
    assert packer.splits == 0


def test_bestfit_is_efficient_on_realistic_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.5, 0.6, 3000).astype(int), 8, 1024)
    docs = [doc(int(n)) for n in lengths]
    L = 512
    for kind, floor in (("bestfit", 0.98), ("greedy", 0.999)):
        packer = make_packer(kind, L, 64)
        rows = rows_of(packer, docs, flush=False)
        eff = sum(len(t) for r in rows for t, _ in r) / (len(rows) * L)
        assert eff >= floor, (kind, eff)
    assert padding_efficiency(lengths, L) < 0.4


@pytest.mark.parametrize("kind", ["greedy", "bestfit"])
def test_state_dict_resumes_the_same_rows(kind):
    rng = random.Random(1)
    docs = [doc(rng.randint(1, 30), rng.randint(1, 900)) for _ in range(120)]
    a = make_packer(kind, 16, 8)
    full = rows_of(a, docs)
    b = make_packer(kind, 16, 8)
    first = rows_of(b, docs[:57], flush=False)
    state = json.loads(json.dumps(b.state_dict()))
    c = make_packer(kind, 16, 8)
    c.load_state_dict(state)
    rest = rows_of(c, docs[57:])
    got = [[(t.tolist(), s) for t, s in r] for r in first + rest]
    assert got == [[(t.tolist(), s) for t, s in r] for r in full]
    assert c.docs == len(docs)


def test_state_from_another_setup_is_repacked_not_dropped():
    docs = [doc(n, 100 * n) for n in (5, 9, 3, 7, 11)]
    a = BestFitPacker(16, capacity=64)
    for d in docs:
        a.push(d, "a/domain")
    state = a.state_dict()
    b = GreedyPacker(8)
    b.load_state_dict(state)
    tokens = sorted(x for r in b.flush() for t, _ in r for x in t.tolist())
    assert tokens == sorted(x for d in docs for x in d.tolist())


def test_padding_efficiency_baselines():
    assert padding_efficiency([4, 8, 12], 8) == pytest.approx(24 / 32)
    # Pad to the longest of each group of 2 pieces: (4, 8) -> 16 slots, (8, 4) -> 16 slots.
    assert padding_efficiency([4, 8, 12], 8, batch_size=2) == pytest.approx(24 / 32)
    assert padding_efficiency([], 8) == 0.0
