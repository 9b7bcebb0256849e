"""All-position contrastive fine-tuning: every item of a user's sequence is a training signal.

The pair-wise objective (`cprec.eval.finetune.PairObjective`) learns from one (history -> next
item) pair per example and pads every prompt. Here one forward pass over a user's training
sequence — the mixed-sequence text of its last ``eval.finetune_max_items`` items, the template the
model was pre-trained on (`PromptBuilder.sequence_ids`) — gives a user state at the end of every
item; the state after item *t* is scored against item *t+1*:

    s_k  = state after item t_k of its user (pooling ``last``: the hidden state of the token that
           ends the item; ``mean``: the mean over the user's tokens up to it), L2-normalised
    v_c  = embedding of candidate c's item prompt (BOS + item text), through the same model
    candidates = every target item of the batch (in-batch negatives) + ``eval.finetune_negatives``
                 items drawn per domain of the batch's targets (shared by the whole batch)
    logits_kc = s_k · v_c / temperature, masked where c is of another domain than target k, or
                is one of k's user's own items (other than the target), or (with
                ``eval.in_batch_negatives=false``) is not a sampled negative
    loss = mean_k CE(logits_k, target k)

User sequences and item prompts are packed into rows (`cprec.stream.packing.collate_rows`, the
pre-training contract) and run through the packed decoder (`cprec.model.packed`), so there is no
padding and no attention across documents; `make_batch(..., packed=False)` builds the same batch
padded, which the tests use to show packed == padded. A user of n items gives n - 1 signals (those
whose target is in the scope's domains) per forward.

Data order is a pure function of the step, as for pairs (`cprec.eval.data_order.batch_rows` and a
negative generator seeded by (seed, rank, step)), so resuming needs no replay.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cprec.config import EvalConfig
from cprec.eval.data_order import batch_rows, seed_words
from cprec.eval.encode import PromptBuilder, pad_batch
from cprec.eval.inputs import Catalogue
from cprec.model.packed import enable_packed_attention, packed_hidden_states
from cprec.stream.packing import collate_rows

log = logging.getLogger(__name__)


@dataclass
class UserSequence:
    """One user's training sequence as the fine-tuning reads it."""

    user: str
    ids: list[int]
    """BOS + tokens of the mixed sequence."""
    positions: list[int]
    """Index in ``ids`` of the state of each target (the token ending the item before it)."""
    targets: list[int]
    """Catalogue row of each target."""
    rows: frozenset[int]
    """Catalogue rows of all the sequence's items (never negatives of its own targets)."""


def build_sequences(
    train_sequences: list[tuple[str, list[str], list[str]]],
    catalogue: Catalogue,
    builder: PromptBuilder,
    domains: set[str] | None = None,
    max_items: int = 50,
    max_len: int = 0,
) -> tuple[list[UserSequence], dict[str, int]]:
    """The fine-tuning sequences of ``domains``' targets (all domains when None); skipped counts.

    Items missing from the catalogue are left out of the text (counted); a sequence longer than
    ``max_len`` tokens drops its oldest items until it fits."""
    out, skipped = [], Counter()
    for user, items, _ in train_sequences:
        rows = []
        for i in items:
            r = catalogue.index.get(i)
            if r is None:
                skipped["item_not_in_items"] += 1
            else:
                rows.append(r)
        rows = rows[-max_items:]
        if len(rows) < 2:
            skipped["fewer_than_2_items"] += 1
            continue
        ids, ends = builder.sequence_ids(catalogue, rows)
        while max_len and len(ids) > max_len and len(rows) > 2:
            per_item = len(ids) / len(rows)  # drop about as many of the oldest items as the excess needs
            rows = rows[min(len(rows) - 2, max(1, math.ceil((len(ids) - max_len) / per_item))) :]
            ids, ends = builder.sequence_ids(catalogue, rows)
        if max_len and len(ids) > max_len:
            skipped["longer_than_model"] += 1
            continue
        keep = [t for t in range(1, len(rows)) if domains is None or catalogue.domains[rows[t]] in domains]
        if not keep:
            continue  # no target in this scope: another scope's user, not a loss of data
        out.append(
            UserSequence(user, ids, [ends[t - 1] for t in keep], [rows[t] for t in keep], frozenset(rows))
        )
    return out, dict(skipped)


def sequences_identity(seqs: list[UserSequence]) -> str:
    """Content hash of the sequences (what a saved fine-tune was trained on)."""
    import hashlib

    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray(s.ids, dtype=np.int64).tobytes())
        h.update(np.asarray(s.targets + s.positions, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ batches
def _pack(docs: list[list[int]], seq_len: int) -> tuple[list, list[int], int]:
    """First-fit-decreasing rows of whole documents; returns (rows, start offset of each doc in
    the flattened rows). A document longer than ``seq_len`` widens every row to its length."""
    width = max([seq_len, *map(len, docs)])
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    rows: list[list[tuple[np.ndarray, str]]] = []
    fill: list[int] = []
    where = [0] * len(docs)
    for i in order:
        n = len(docs[i])
        b = next((b for b, f in enumerate(fill) if f + n <= width), None)
        if b is None:
            rows.append([])
            fill.append(0)
            b = len(rows) - 1
        where[i] = b * width + fill[b]
        rows[b].append((np.asarray(docs[i], dtype=np.int64), "doc"))
        fill[b] += n
    return rows, where, width


def _doc_inputs(docs: list[list[int]], pad_id: int, seq_len: int, packed: bool, prefix: str) -> tuple:
    """Model inputs of some documents, and the flat start index of each document."""
    if packed:
        rows, starts, width = _pack(docs, seq_len)
        b = collate_rows(rows, width, pad_id)
        inputs = {
            f"{prefix}_ids": b["input_ids"],
            f"{prefix}_positions": b["position_ids"],
            f"{prefix}_cu": b["cu_seqlens"],
            f"{prefix}_max": b["max_seqlen"],
        }
        return inputs, starts
    ids, mask = pad_batch(docs, pad_id)
    width = ids.shape[1]
    return {f"{prefix}_ids": ids, f"{prefix}_mask": mask}, [b * width for b in range(len(docs))]


def make_batch(
    builder: PromptBuilder,
    catalogue: Catalogue,
    seqs: list[UserSequence],
    negatives: dict[str, list[int]],
    cfg: EvalConfig,
    pad_id: int,
    packed: bool = True,
) -> dict:
    """The `AllPositionModel` inputs of some user sequences and per-domain negatives (CPU)."""
    cands = sorted({t for s in seqs for t in s.targets} | {r for ns in negatives.values() for r in ns})
    col = {r: j for j, r in enumerate(cands)}
    sampled = {r for ns in negatives.values() for r in ns}
    users, user_starts = _doc_inputs([s.ids for s in seqs], pad_id, cfg.finetune_seq_len, packed, "user")
    item_docs = builder.item_ids([catalogue.texts[r] for r in cands])
    items, item_starts = _doc_inputs(item_docs, pad_id, cfg.finetune_seq_len, packed, "item")
    state, start, labels, mask_rows = [], [], [], []
    cand_domain = np.asarray([catalogue.domains[r] for r in cands], dtype=object)
    cand_rows = np.asarray(cands, dtype=np.int64)
    is_sampled = np.asarray([r in sampled for r in cands], dtype=bool)
    for s, off in zip(seqs, user_starts):
        own = np.isin(cand_rows, np.fromiter(s.rows, dtype=np.int64, count=len(s.rows)))
        for p, t in zip(s.positions, s.targets):
            state.append(off + p)
            start.append(off)
            labels.append(col[t])
            m = (cand_domain != catalogue.domains[t]) | own
            if not cfg.in_batch_negatives:
                m |= ~is_sampled
            m[col[t]] = False
            mask_rows.append(m)
    return {
        **users,
        **items,
        "state_index": torch.tensor(state, dtype=torch.long),
        "state_start": torch.tensor(start, dtype=torch.long),
        "item_end": torch.tensor([s + len(d) - 1 for s, d in zip(item_starts, item_docs)], dtype=torch.long),
        "item_start": torch.tensor(item_starts, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "mask": torch.from_numpy(np.stack(mask_rows)),
    }


def sample_negatives(
    catalogue: Catalogue, seqs: list[UserSequence], n: int, rng: np.random.Generator
) -> dict[str, list[int]]:
    """``n`` distinct items per domain of the batch's targets, uniform over the domain."""
    out = {}
    for d in sorted({catalogue.domains[t] for s in seqs for t in s.targets}):
        pool = np.asarray(catalogue.domain_rows(d), dtype=np.int64)
        k = min(n, len(pool))
        out[d] = sorted(int(r) for r in rng.choice(pool, size=k, replace=False)) if k else []
    return out


# ------------------------------------------------------------------------------------ the loss
def pooled(hidden: torch.Tensor, at: torch.Tensor, start: torch.Tensor, pooling: str) -> torch.Tensor:
    """L2-normalised states of flat token positions ``at`` (``[N, H]`` hidden states): the state
    there (``last``) or the mean from the document's ``start`` up to it (``mean``)."""
    if pooling == "last":
        out = hidden[at]
    elif pooling == "mean":
        cs = torch.cat([hidden.new_zeros(1, hidden.shape[1]), hidden.float().cumsum(0)])
        out = (cs[at + 1] - cs[start]) / (at - start + 1).unsqueeze(1).to(cs.dtype)
    else:
        raise ValueError(f"unknown pooling {pooling!r} (last or mean)")
    return F.normalize(out.float(), dim=-1)


def contrastive_loss(
    states: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean softmax cross-entropy of each state against the candidates (masked columns out)."""
    logits = (states @ items.t()).masked_fill(mask, float("-inf")) / temperature
    return F.cross_entropy(logits, labels)


class AllPositionModel(nn.Module):
    """The all-position loss of one batch as one forward (for a DeepSpeed engine)."""

    def __init__(self, hf_model: nn.Module, cfg: EvalConfig, attn_backend: str = "auto"):
        super().__init__()
        enable_packed_attention(hf_model)
        self.hf_model = hf_model  # same parameter names as the pair-wise model: same export path
        self.pooling, self.temperature, self.attn_backend = cfg.pooling, cfg.temperature, attn_backend

    def _hidden(self, ids, positions=None, cu=None, max_len=None, mask=None) -> torch.Tensor:
        if cu is not None:
            h = packed_hidden_states(self.hf_model, ids, positions, cu, max_len, self.attn_backend)
        else:
            h = self.hf_model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
            h = h.last_hidden_state
        return h.reshape(-1, h.shape[-1])

    def forward(self, state_index, state_start, item_end, item_start, labels, mask, **docs) -> torch.Tensor:
        users = self._hidden(
            docs["user_ids"], docs.get("user_positions"), docs.get("user_cu"), docs.get("user_max"),
            docs.get("user_mask"),
        )  # fmt: skip
        items = self._hidden(
            docs["item_ids"], docs.get("item_positions"), docs.get("item_cu"), docs.get("item_max"),
            docs.get("item_mask"),
        )  # fmt: skip
        s = pooled(users, state_index, state_start, self.pooling)
        v = pooled(items, item_end, item_start, self.pooling)
        return contrastive_loss(s, v, labels, mask, self.temperature)


class AllPositionObjective:
    """The all-position examples of one rank: user sequences, batches as a function of the step."""

    name = "all_positions"

    def __init__(
        self, model, builder, catalogue, seqs: list[UserSequence], cfg: EvalConfig, pad_id, rank, world
    ):
        if not seqs:
            raise ValueError("fine-tuning has no user sequences (eval/train_sequences.parquet gives none)")
        self.module = AllPositionModel(model, cfg)
        self.builder, self.catalogue, self.cfg, self.pad_id, self.rank = builder, catalogue, cfg, pad_id, rank
        self.n_examples = len(seqs)
        self.mine = seqs[rank::world] or seqs[:1]

    def batch(self, step: int) -> dict:
        c = self.cfg
        rows = batch_rows(step, len(self.mine), c.finetune_batch_size, c.seed, self.rank)
        seqs = [self.mine[i] for i in rows]
        rng = np.random.default_rng(seed_words(c.seed, self.rank, step))
        negs = sample_negatives(self.catalogue, seqs, c.finetune_negatives, rng)
        return make_batch(self.builder, self.catalogue, seqs, negs, c, self.pad_id)

    @staticmethod
    def signals(batch: dict) -> int:
        return int(batch["labels"].numel())
