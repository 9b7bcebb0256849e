"""Packing tokenized documents into fixed-length rows, and rows into the packed-batch contract.

A *piece* is ``(tokens, stream)``: a whole document, or part of one that was cut because it did not
fit. A *row* is a list of pieces whose lengths sum to at most ``seq_len``; the rest of the row is
padding. Every piece is its own attention segment: position ids restart at 0 at each piece and no
label crosses a piece boundary (the last token of a piece has no target), so cutting a document
never teaches the model to continue one document with another.

Two packers, both streaming (documents in, rows out) and both with ``state_dict`` holding their
buffers, so a resumed loader continues with exactly the rows it would have produced:

- ``GreedyPacker`` concatenates documents in arrival order and cuts at row boundaries. No padding
  at all, but the document at each row boundary is split in two.
- ``BestFitPacker`` keeps ``capacity`` documents and fills each row best-fit-decreasing (largest
  document that still fits, repeatedly), padding what nothing fits into. A document is only split
  when it is longer than ``seq_len`` (into full rows plus a remainder that is packed like any other
  document), so documents are never dropped and rarely cut.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value meaning "no loss here" (padding, last token of each piece)."""

Piece = tuple[np.ndarray, str]
Row = list[Piece]


def _piece_to_state(piece: Piece) -> list:
    return [np.asarray(piece[0]).tolist(), piece[1]]


def _piece_from_state(item: list) -> Piece:
    return np.asarray(item[0], dtype=np.int64), str(item[1])


class Packer:
    """Common part of the packers: the queue of finished rows and the counters."""

    kind = ""

    def __init__(self, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self._ready: list[Row] = []
        self.docs = 0
        """Documents pushed."""
        self.splits = 0
        """Cuts made inside documents (a document cut into k pieces counts k - 1)."""

    @property
    def n_ready(self) -> int:
        """Finished rows waiting to be popped."""
        return len(self._ready)

    def push(self, tokens: np.ndarray, stream: str) -> None:
        """Add one document (1-D token ids). Empty documents are ignored by the caller, not here."""
        raise NotImplementedError

    def pop_row(self) -> Row:
        """Remove and return the oldest finished row."""
        if not self._ready:
            raise IndexError("no finished row: push more documents first")
        return self._ready.pop(0)

    def flush(self) -> list[Row]:
        """Finish every partly filled row (end of a finite stream) and return all finished rows."""
        raise NotImplementedError

    def pending_pieces(self) -> list[Piece]:
        """Every piece held (finished rows first), in the order they would be emitted."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq_len": self.seq_len,
            "docs": self.docs,
            "splits": self.splits,
            "ready": [[_piece_to_state(p) for p in row] for row in self._ready],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the buffers exactly; a state of another packer kind or length is re-pushed."""
        self.docs = int(state["docs"])
        self.splits = int(state["splits"])
        self._ready = []
        if self._compatible(state):
            self._ready = [[_piece_from_state(p) for p in row] for row in state["ready"]]
            self._load_buffers(state)
            return
        # Another packing setup (e.g. a later phase with a longer seq_len): nothing is dropped, the
        # held pieces are packed again under the new setup, in the order they were held.
        other = make_packer(state["kind"], int(state["seq_len"]), int(state.get("capacity", 1)))
        other._ready = [[_piece_from_state(p) for p in row] for row in state["ready"]]
        other._load_buffers(state)
        pieces = other.pending_pieces()
        log.info(
            "packer state was %s/seq_len=%s; re-packing its %d held pieces as %s/seq_len=%d",
            state["kind"],
            state["seq_len"],
            len(pieces),
            self.kind,
            self.seq_len,
        )
        docs = self.docs
        for tokens, stream in pieces:
            self.push(tokens, stream)
        self.docs = docs  # re-pushed pieces are not new documents

    def _compatible(self, state: dict[str, Any]) -> bool:
        return state["kind"] == self.kind and int(state["seq_len"]) == self.seq_len

    def _load_buffers(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class GreedyPacker(Packer):
    """Concatenate documents in order and cut at every ``seq_len`` tokens (no padding)."""

    kind = "greedy"

    def __init__(self, seq_len: int):
        super().__init__(seq_len)
        self._row: Row = []
        self._fill = 0

    def push(self, tokens: np.ndarray, stream: str) -> None:
        tokens = np.asarray(tokens)
        self.docs += 1
        start = 0
        while start < len(tokens):
            take = min(len(tokens) - start, self.seq_len - self._fill)
            self._row.append((tokens[start : start + take], stream))
            self._fill += take
            start += take
            if self._fill == self.seq_len:
                self._ready.append(self._row)
                self._row, self._fill = [], 0
            if start < len(tokens):
                self.splits += 1

    def flush(self) -> list[Row]:
        if self._row:
            self._ready.append(self._row)
            self._row, self._fill = [], 0
        rows, self._ready = self._ready, []
        return rows

    def pending_pieces(self) -> list[Piece]:
        return [p for row in self._ready for p in row] + list(self._row)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "row": [_piece_to_state(p) for p in self._row]}

    def _load_buffers(self, state: dict[str, Any]) -> None:
        self._row = [_piece_from_state(p) for p in state.get("row", [])]
        self._fill = sum(len(t) for t, _ in self._row)


class BestFitPacker(Packer):
    """Best-fit-decreasing over a buffer of ``capacity`` documents; pads what nothing fits into."""

    kind = "bestfit"

    def __init__(self, seq_len: int, capacity: int = 64):
        super().__init__(seq_len)
        if capacity < 1:
            raise ValueError(f"best-fit capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # Sorted keys (length, -arrival): bisect finds the longest document that fits, and among
        # equally long ones the earliest arrival, so the order is deterministic.
        self._keys: list[tuple[int, int]] = []
        self._docs: dict[int, Piece] = {}
        self._next = 0

    def push(self, tokens: np.ndarray, stream: str) -> None:
        tokens = np.asarray(tokens)
        self.docs += 1
        L = self.seq_len
        start = 0
        # A document longer than a row fills whole rows first; only its remainder waits in the buffer.
        while len(tokens) - start >= L:
            self._ready.append([(tokens[start : start + L], stream)])
            start += L
            if start < len(tokens):
                self.splits += 1
        if start < len(tokens):
            self._insert((tokens[start:], stream))
        while len(self._keys) >= self.capacity:
            self._build_row()

    def _insert(self, piece: Piece) -> None:
        seq = self._next
        self._next += 1
        self._docs[seq] = piece
        bisect.insort(self._keys, (len(piece[0]), -seq))

    def _build_row(self) -> None:
        row: Row = []
        room = self.seq_len
        while self._keys:
            i = bisect.bisect_right(self._keys, (room, 1)) - 1
            if i < 0:
                break
            n, neg_seq = self._keys.pop(i)
            row.append(self._docs.pop(-neg_seq))
            room -= n
        self._ready.append(row)

    def flush(self) -> list[Row]:
        while self._keys:
            self._build_row()
        rows, self._ready = self._ready, []
        return rows

    def pending_pieces(self) -> list[Piece]:
        held = [self._docs[s] for s in sorted(self._docs)]
        return [p for row in self._ready for p in row] + held

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "capacity": self.capacity,
            "next": self._next,
            "buffer": [[s, *_piece_to_state(self._docs[s])] for s in sorted(self._docs)],
        }

    def _compatible(self, state: dict[str, Any]) -> bool:
        return super()._compatible(state) and int(state.get("capacity", -1)) == self.capacity

    def _load_buffers(self, state: dict[str, Any]) -> None:
        self._docs = {int(s): _piece_from_state([t, st]) for s, t, st in state.get("buffer", [])}
        self._keys = sorted((len(p[0]), -s) for s, p in self._docs.items())
        self._next = int(state.get("next", max(self._docs, default=-1) + 1))


def make_packer(kind: str, seq_len: int, bestfit_buffer: int = 64) -> Packer:
    """The packer named by ``train.loader.packing``."""
    if kind == "greedy":
        return GreedyPacker(seq_len)
    if kind == "bestfit":
        return BestFitPacker(seq_len, bestfit_buffer)
    raise ValueError(f"config field 'train.loader.packing': must be greedy or bestfit, got {kind!r}")


def collate_rows(rows: list[Row], seq_len: int, pad_id: int) -> dict[str, Any]:
    """Turn packed rows into the packed-batch dict (the contract in README "Architecture").

    ``labels`` are already shifted (``labels[b, i]`` is the token after position ``i``) and -100 at
    the last token of every piece and on padding. ``cu_seqlens`` runs over the flattened ``B*L``
    tokens with each row's padding tail as its own segment, so no segment crosses a row.
    """
    B, L = len(rows), seq_len
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, L), dtype=np.int64)
    arange = np.arange(L, dtype=np.int64)
    cu = [0]
    max_seqlen = 0
    stream_tokens: dict[str, int] = {}
    n_tokens = 0
    for b, row in enumerate(rows):
        off = 0
        for tokens, stream in row:
            n = len(tokens)
            if n == 0:
                continue
            if off + n > L:
                raise ValueError(f"row {b} holds more than seq_len={L} tokens")
            input_ids[b, off : off + n] = tokens
            labels[b, off : off + n - 1] = tokens[1:]
            position_ids[b, off : off + n] = arange[:n]
            off += n
            cu.append(b * L + off)
            max_seqlen = max(max_seqlen, n)
            stream_tokens[stream] = stream_tokens.get(stream, 0) + n
        n_tokens += off
        if off < L:
            position_ids[b, off:] = arange[: L - off]
            cu.append((b + 1) * L)
            max_seqlen = max(max_seqlen, L - off)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": int(max_seqlen),
        "n_tokens": int(n_tokens),
        "stream_tokens": stream_tokens,
    }


def padding_efficiency(lengths: list[int] | np.ndarray, seq_len: int, batch_size: int = 0) -> float:
    """Non-pad fraction of naive one-document-per-row batching (the baseline packing is judged by).

    ``batch_size == 0``: every document padded to ``seq_len`` (longer ones cut into several rows).
    ``batch_size > 0``: consecutive groups of ``batch_size`` documents padded to the longest in the
    group (capped at ``seq_len``, longer documents again taking several rows).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    if batch_size <= 0:
        rows = -(-lengths // seq_len)
        return float(lengths.sum() / (rows.sum() * seq_len))
    # Pieces of at most seq_len tokens, in document order, batched and padded to the longest.
    pieces = np.asarray(
        [min(seq_len, n - s) for n in lengths.tolist() for s in range(0, n, seq_len)], dtype=np.int64
    )
    slots = 0
    for i in range(0, len(pieces), batch_size):
        group = pieces[i : i + batch_size]
        slots += len(group) * int(group.max())
    return float(pieces.sum() / slots)
