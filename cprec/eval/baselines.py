"""Baselines scored on the same split and protocol as the LLM: most-popular and SASRec.

- **popularity**: an item's score is how often it occurs in the training sequences
  (``train_sequences.parquet``, all users). Equal counts are ordered by item id (smaller id first)
  so the ranking is a strict, deterministic order — pessimistic tie-breaking in the metrics then
  never matters for this baseline.
- **SASRec** (Kang & McAuley, 2018): ID embeddings + learned positions, causal self-attention
  blocks (pre-LayerNorm, GELU feed-forward, dropout), trained on the training sequences with all
  domains' items in one id space (mixed sequences), predicting each next item. The loss is a
  sampled softmax: cross-entropy over the true next item and ``n_negatives`` items drawn uniformly
  per batch and shared by all positions (a shared negative equal to the positive is masked). At eval
  the output at the last history position scores every item of the target's domain (dot product
  with the shared item embeddings). Items in items.parquet that never occur in training keep their
  random initial embedding (cold items).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cprec.eval.inputs import Catalogue
from cprec.eval.ranking import DomainTask, ScoreFn

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- popularity
def popularity_counts(
    train_sequences: list[tuple[str, list[str], list[str]]], catalogue: Catalogue
) -> np.ndarray:
    """Occurrences of each catalogue row in the training sequences."""
    counts = np.zeros(len(catalogue.items), dtype=np.int64)
    for _, items, _ in train_sequences:
        for it in items:
            r = catalogue.index.get(it)
            if r is not None:
                counts[r] += 1
    return counts


def popularity_scores(counts: np.ndarray, catalogue: Catalogue) -> np.ndarray:
    """Strictly ordered scores: higher count first, then smaller item id (as a string)."""
    order = sorted(range(len(counts)), key=lambda r: (-int(counts[r]), catalogue.items[r]))
    scores = np.empty(len(counts), dtype=np.float64)
    scores[np.asarray(order, dtype=np.int64)] = -np.arange(len(order), dtype=np.float64)
    return scores


def popularity_score_fn(scores: np.ndarray) -> ScoreFn:
    """Score function: every user gets the same popularity scores over the domain's catalogue."""
    full = torch.from_numpy(scores)

    def score(task: DomainTask, batch: np.ndarray) -> torch.Tensor:
        return full[torch.from_numpy(task.rows)].unsqueeze(0).expand(len(batch), -1)

    return score


# ------------------------------------------------------------------------------------- SASRec
@dataclass
class SASRecConfig:
    hidden: int = 64
    max_len: int = 50
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    n_negatives: int = 256
    seed: int = 0


class SASRec(nn.Module):
    """Self-attentive sequential recommender over item ids 1..n_items (0 = padding)."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.heads,
            dim_feedforward=cfg.hidden,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] right-padded ids -> [B, L, H] states; position i sees items 0..i only."""
        L = seq.shape[1]
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden) + self.pos_emb(torch.arange(L, device=seq.device))
        x = self.drop(x)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seq.device), diagonal=1)
        # Right padding: a real position never attends to the padding after it, so no padding mask.
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    @torch.no_grad()
    def user_states(self, seqs: list[list[int]]) -> torch.Tensor:
        """[B, H] state at the last position of each (already truncated, non-empty) sequence."""
        batch = _pad(seqs)
        lengths = torch.tensor([len(s) for s in seqs])
        h = self.forward(batch)
        return h[torch.arange(len(seqs)), lengths - 1]


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar length in random order: most sequences are short, so padding every
    batch to the longest one would multiply the work several times over."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def to_ids(items: list[str], catalogue: Catalogue) -> list[int]:
    """Catalogue row + 1 for each known item (unknown ids are left out)."""
    return [r + 1 for r in (catalogue.index.get(i) for i in items) if r is not None]


def train_sasrec(
    train_sequences: list[tuple[str, list[str], list[str]]], catalogue: Catalogue, cfg: SASRecConfig
) -> tuple[SASRec, dict]:
    """Train on each user's last ``max_len + 1`` training items; returns the model and stats."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seqs, unknown = [], 0
    for _, items, _ in train_sequences:
        ids = to_ids(items, catalogue)
        unknown += len(items) - len(ids)
        if len(ids) >= 2:
            seqs.append(ids[-(cfg.max_len + 1) :])
    if not seqs:
        raise ValueError("SASRec: no training sequence with at least 2 known items")
    if unknown:
        log.warning("SASRec: %d training items not in items.parquet were left out", unknown)
    n_items = len(catalogue.items)
    model = SASRec(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    n_neg = min(cfg.n_negatives, n_items)
    losses, t0 = [], time.perf_counter()
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="sasrec", unit="step", disable=None)
    model.train()
    lengths = np.asarray([len(s) for s in seqs])
    for _ in range(cfg.epochs):
        epoch_loss = 0.0
        for batch in _length_buckets(lengths, cfg.batch_size, rng):
            chunk = [seqs[i] for i in batch]
            inp = _pad([s[:-1] for s in chunk])
            tgt = _pad([s[1:] for s in chunk])
            h = model(inp)
            keep = tgt > 0
            h, pos = h[keep], tgt[keep]  # [P, H], [P]
            neg = torch.from_numpy(rng.integers(1, n_items + 1, size=n_neg))
            pos_logit = (h * model.item_emb(pos)).sum(-1, keepdim=True)
            neg_logit = h @ model.item_emb(neg).t()
            neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
            logits = torch.cat([pos_logit, neg_logit], dim=1)
            loss = F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += float(loss.detach()) * len(chunk)
            bar.update(1)
        losses.append(epoch_loss / len(seqs))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        log.info(
            "SASRec epoch %d/%d: loss %.4f (%.0f s)",
            len(losses),
            cfg.epochs,
            losses[-1],
            time.perf_counter() - t0,
        )
    bar.close()
    model.eval()
    stats = {
        "config": asdict(cfg),
        "sequences": len(seqs),
        "epoch_losses": losses,
        "seconds": time.perf_counter() - t0,
    }
    return model, stats


def sasrec_key(
    train_sequences: list[tuple[str, list[str], list[str]]], catalogue: Catalogue, cfg: SASRecConfig
) -> str:
    """Hash of what decides a trained SASRec: the training sequences, the id space, the settings."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(catalogue.subset_hash(list(range(len(catalogue.items)))).encode())
    for user, items, _ in train_sequences:
        h.update(("\x01" + user + "\x00" + "\x00".join(items)).encode())
    return h.hexdigest()[:20]


def train_sasrec_cached(
    train_sequences: list[tuple[str, list[str], list[str]]],
    catalogue: Catalogue,
    cfg: SASRecConfig,
    cache_dir: str | Path,
) -> tuple[SASRec, dict]:
    """``train_sasrec``, or the model saved by an earlier run with the same key (see ``sasrec_key``)."""
    path = Path(cache_dir) / f"sasrec-{sasrec_key(train_sequences, catalogue, cfg)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = SASRec(len(catalogue.items), cfg)
        model.load_state_dict(blob["model"])
        log.info("SASRec: reusing the model trained earlier (%s)", path.name)
        return model.eval(), {**json.loads(blob["stats"]), "cached": True}
    model, stats = train_sasrec(train_sequences, catalogue, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "stats": json.dumps(stats)}, tmp)
    tmp.replace(path)
    return model, {**stats, "cached": False}


def sasrec_score_fn(model: SASRec, catalogue: Catalogue) -> ScoreFn:
    """Score function: the user's last-position state against the domain's item embeddings."""

    def score(task: DomainTask, batch: np.ndarray) -> torch.Tensor:
        seqs = []
        for i in batch:
            ids = to_ids(task.users[i].history, catalogue)[-model.cfg.max_len :]
            seqs.append(ids or [0])  # no known history: the padding id alone (position 0 only)
        h = model.user_states(seqs)
        with torch.no_grad():
            items = model.item_emb(torch.from_numpy(task.rows + 1))
        return h @ items.t()

    return score
