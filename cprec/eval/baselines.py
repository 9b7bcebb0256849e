"""Baselines scored on the same split and protocol as the LLM: most-popular and SASRec.

- **popularity**: an item's score is how often it occurs in the training sequences
  (``train_sequences.parquet``, all users). Equal counts are ordered by item id (smaller id first)
  so the ranking is a strict, deterministic order — pessimistic tie-breaking in the metrics then
  never matters for this baseline.
- **SASRec** (Kang & McAuley, 2018): ID embeddings + learned positions, causal self-attention
  blocks (as in the original code: LayerNorm on the queries, LayerNorm after the attention
  residual, ReLU feed-forward, dropout), trained on the training sequences with all
  domains' items in one id space (mixed sequences), predicting each next item. The loss is a
  sampled softmax: cross-entropy over the true next item and ``n_negatives`` items drawn uniformly
  per sequence and shared by its positions (a negative equal to the positive is masked), on cosine
  similarity / ``temperature`` (or a raw dot product). The defaults are the published
  sampled-softmax SASRec of the HSTU paper's ML-1M baseline (``benchmarks/sasrec_ml1m.py`` checks
  we match it). Training stops once NDCG@10 of the *validation* users (the valid split, full
  ranking, ``cprec.eval.ranking``) has not improved for ``patience`` evaluations, and the weights
  of the best evaluation are restored: the model is tested from its best epoch. At eval the state
  at the last history position scores every item of the target's domain. Items in items.parquet
  that never occur in training keep their initial embedding (cold items).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cprec.atomic import atomic_path
from cprec.config.evaluation import EvalConfig
from cprec.eval.inputs import Catalogue
from cprec.eval.ranking import DomainTask, ScoreFn, evaluate

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
VALID_METRIC = "ndcg@10"
"""What early stopping watches: NDCG@10 over the validation users (full ranking, pooled)."""

_E = EvalConfig  # the one home of the SASRec settings: eval.sasrec_* (defaults, docs, checks)


@dataclass
class SASRecConfig:
    """SASRec settings: the ``eval.sasrec_*`` fields of ``EvalConfig`` under short names (see
    ``eval_field``), where their defaults, docs and checks live. The defaults are those of the
    published sampled-softmax SASRec on ML-1M (generative-recommenders,
    ``configs/ml-1m/sasrec-sampled-softmax-n128-final.gin``): 50 dims, 2 blocks, 1 head, dropout 0.2,
    200 items, cosine similarity / 0.05, Adam 1e-3, batch 128 — except 256 negatives per sequence
    where they draw 128 per position (on ML-1M, 256 reached the validation NDCG@10 of 128 in about
    2/3 of the epochs; benchmarks/sasrec_ml1m.py)."""

    hidden: int = _E.sasrec_hidden
    max_len: int = _E.sasrec_max_len
    layers: int = _E.sasrec_layers
    heads: int = _E.sasrec_heads
    dropout: float = _E.sasrec_dropout
    epochs: int = _E.sasrec_epochs
    patience: int = _E.sasrec_patience
    eval_every: int = _E.sasrec_eval_every
    batch_size: int = _E.sasrec_batch_size
    lr: float = _E.sasrec_lr
    n_negatives: int = _E.sasrec_negatives
    similarity: str = _E.sasrec_similarity
    temperature: float = _E.sasrec_temperature
    seed: int = _E.seed

    def __post_init__(self):
        # Checked as the eval.sasrec_* fields they are (errors name those fields).
        EvalConfig(**{eval_field(f.name): getattr(self, f.name) for f in fields(self)})


def eval_field(name: str) -> str:
    """The ``EvalConfig`` field of SASRecConfig's ``name``."""
    return {"n_negatives": "sasrec_negatives", "seed": "seed"}.get(name, f"sasrec_{name}")


def sasrec_config(ecfg: EvalConfig) -> SASRecConfig:
    """The SASRec settings of an ``EvalConfig`` (its ``sasrec_*`` fields and ``seed``)."""
    return SASRecConfig(**{f.name: getattr(ecfg, eval_field(f.name)) for f in fields(SASRecConfig)})


class _Block(nn.Module):
    """The SASRec block of Kang & McAuley's code and of the published sampled-softmax SASRec:
    queries from LayerNorm(x), keys and values from x, then y = LayerNorm(queries + attention) and
    y + FFN(y). Attention runs through ``scaled_dot_product_attention`` (a fused kernel on CPU too);
    dropout acts on the attention output instead of the attention probabilities, which on CPU would
    cost about as much as the attention itself."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d), nn.Dropout(cfg.dropout)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        h, dh = self.heads, D // self.heads
        queries = self.ln1(x)
        q = self.q(queries).view(B, L, h, dh).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, h, dh).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, D/heads]
        y = self.ln2(queries + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D))))
        return y + self.ff(y)


class SASRec(nn.Module):
    """Self-attentive sequential recommender over item ids 1..n_items (0 = padding)."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.drop = nn.Dropout(cfg.dropout)
        # Small item embeddings (std 0.02, as the published sampled-softmax SASRec): Adam's fixed
        # step size then moves them fast relative to their scale; with std hidden**-0.5 the model
        # sat at popularity level for a dozen ML-1M epochs before using the sequence.
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.pos_emb.weight, std=cfg.hidden**-0.5)
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] right-padded ids -> [B, L, H] states; position i sees items 0..i only."""
        L = seq.shape[1]
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden) + self.pos_emb(torch.arange(L, device=seq.device))
        x = self.drop(x)
        # Right padding: a real position never attends to the padding after it, so the causal
        # mask is the only one needed.
        for block in self.blocks:
            x = block(x)
        return x

    def similarity_space(self, x: torch.Tensor) -> torch.Tensor:
        """User states or item embeddings as compared: L2-normalised under cosine similarity."""
        return F.normalize(x, dim=-1, eps=1e-6) if self.cfg.similarity == "cosine" else x

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Item embeddings of ``ids`` in the similarity space."""
        return self.similarity_space(self.item_emb(ids))

    @torch.no_grad()
    def user_states(self, seqs: list[list[int]]) -> torch.Tensor:
        """[B, H] state at the last position of each (already truncated, non-empty) sequence."""
        batch = _pad(seqs)
        lengths = torch.tensor([len(s) for s in seqs])
        h = self.forward(batch)
        return self.similarity_space(h[torch.arange(len(seqs)), lengths - 1])


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


def _training_sequences(
    train_sequences: list[tuple[str, list[str], list[str]]], catalogue: Catalogue, max_len: int
) -> list[list[int]]:
    seqs, unknown = [], 0
    for _, items, _ in train_sequences:
        ids = to_ids(items, catalogue)
        unknown += len(items) - len(ids)
        if len(ids) >= 2:
            seqs.append(ids[-(max_len + 1) :])
    if not seqs:
        raise ValueError("SASRec: no training sequence with at least 2 known items")
    if unknown:
        log.warning("SASRec: %d training items not in items.parquet were left out", unknown)
    return seqs


def _train_epoch(
    model: SASRec,
    opt: torch.optim.Optimizer,
    seqs: list[list[int]],
    rng: np.random.Generator,
    bar: tqdm,
) -> float:
    """One pass over the sequences; returns the mean loss per sequence."""
    cfg, n_items = model.cfg, model.n_items
    n_neg = min(cfg.n_negatives, n_items)
    lengths = np.asarray([len(s) for s in seqs])
    model.train()
    total = 0.0
    for batch in _length_buckets(lengths, cfg.batch_size, rng):
        chunk = [seqs[i] for i in batch]
        inp = _pad([s[:-1] for s in chunk])
        tgt = _pad([s[1:] for s in chunk])  # [B, L]
        h = model.similarity_space(model(inp))  # [B, L, H]
        # Negatives drawn per sequence, shared by its positions: as many distinct negatives per
        # step as per-position sampling gives, for the cost of one batched matmul.
        neg = torch.from_numpy(rng.integers(1, n_items + 1, size=(len(chunk), n_neg)))  # [B, N]
        pos_logit = (h * model.item_vectors(tgt)).sum(-1, keepdim=True)  # [B, L, 1]
        neg_logit = h @ model.item_vectors(neg).transpose(1, 2)  # [B, L, N]
        neg_logit = neg_logit.masked_fill(neg.unsqueeze(1) == tgt.unsqueeze(2), float("-inf"))
        keep = tgt > 0
        logits = torch.cat([pos_logit, neg_logit], dim=2)[keep] / cfg.temperature  # [P, 1 + N]
        loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(chunk)
        bar.update(1)
    return total / len(seqs)


def validation_metrics(model: SASRec, catalogue: Catalogue, valid: dict[str, DomainTask]) -> dict[str, float]:
    """Full-ranking NDCG@10 and Recall@10 of the validation users, pooled over domains (the same
    ranking code as the report)."""
    was_training = model.training
    model.eval()
    res = evaluate(valid, sasrec_score_fn(model, catalogue), [10], batch_size=256)["overall"]
    model.train(was_training)
    return {"ndcg@10": res["ndcg@10"], "recall@10": res["recall@10"]}


EvalHook = Callable[[int, dict, "SASRec"], None]
"""Called after each validation evaluation with (epoch, metrics, model in eval mode)."""


def train_sasrec(
    train_sequences: list[tuple[str, list[str], list[str]]],
    catalogue: Catalogue,
    cfg: SASRecConfig,
    valid: dict[str, DomainTask] | None = None,
    on_eval: EvalHook | None = None,
) -> tuple[SASRec, dict]:
    """Train on each user's last ``max_len + 1`` training items; returns the model and stats.

    With validation tasks (``valid``: the valid split's users, never the test split's), NDCG@10 is
    measured every ``eval_every`` epochs; training stops after ``patience`` evaluations without a
    strict improvement, and the returned model holds the weights of the best evaluation. Without
    them every epoch runs and the last weights are returned (``stats["early_stopping"]`` says so).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seqs = _training_sequences(train_sequences, catalogue, cfg.max_len)
    model = SASRec(len(catalogue.items), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    valid = {d: t for d, t in (valid or {}).items() if t.users}
    n_valid = sum(len(t.users) for t in valid.values())
    if not valid:
        log.warning("SASRec: no validation users, so no early stopping: all %d epochs run", cfg.epochs)
    losses, history, t0 = [], [], time.perf_counter()
    best_value, best_epoch, best_state, since_best = -math.inf, 0, None, 0
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="sasrec", unit="step", disable=None)
    for epoch in range(1, cfg.epochs + 1):
        losses.append(_train_epoch(model, opt, seqs, rng, bar))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        msg = ""
        if valid and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            metrics = validation_metrics(model, catalogue, valid)
            history.append({"epoch": epoch, **metrics})
            if on_eval is not None:
                on_eval(epoch, metrics, model.eval())  # eval mode: a hook may rank with it
            if metrics[VALID_METRIC] > best_value:
                best_value, best_epoch, since_best = metrics[VALID_METRIC], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            msg = f", valid {VALID_METRIC} {metrics[VALID_METRIC]:.4f} (best {best_value:.4f} @ {best_epoch})"
        log.debug(  # per epoch: DEBUG (losses and validation history are in the stats / report)
            "SASRec epoch %d/%d: loss %.4f%s (%.0f s)",
            epoch,
            cfg.epochs,
            losses[-1],
            msg,
            time.perf_counter() - t0,
        )
        if cfg.patience and since_best >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    epochs_run = len(losses)
    log.info(
        "SASRec: %d/%d epochs%s, final loss %.4f (%.0f s)",
        epochs_run,
        cfg.epochs,
        f", best valid {VALID_METRIC} {best_value:.4f} @ epoch {best_epoch}" if valid else "",
        losses[-1],
        time.perf_counter() - t0,
    )
    stats = {
        "config": asdict(cfg),
        "sequences": len(seqs),
        "valid_users": n_valid,
        "early_stopping": f"on validation {VALID_METRIC}" if valid else "off: no validation users",
        "epochs_run": epochs_run,
        "best_epoch": best_epoch if valid else epochs_run,
        f"best_valid_{VALID_METRIC}": best_value if valid else None,
        "stopped_early": epochs_run < cfg.epochs,
        "valid_history": history,
        "epoch_losses": losses,
        "seconds": time.perf_counter() - t0,
    }
    return model, stats


# Bumped whenever the SASRec module changes shape or meaning (its state_dict), so a cache entry of an
# older design is retrained instead of failing to load.
SASREC_ARCH_VERSION = 2


def sasrec_key(
    train_sequences: list[tuple[str, list[str], list[str]]],
    catalogue: Catalogue,
    cfg: SASRecConfig,
    valid: dict[str, DomainTask] | None = None,
) -> str:
    """Hash of what decides a trained SASRec: the training sequences, the id space, the settings
    and the validation users that pick its best epoch."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(f"arch{SASREC_ARCH_VERSION}".encode())  # a cached model of another block design never loads
    h.update(catalogue.subset_hash(list(range(len(catalogue.items)))).encode())
    for user, items, _ in train_sequences:
        h.update(("\x01" + user + "\x00" + "\x00".join(items)).encode())
    for domain in sorted(valid or {}):
        for u in valid[domain].users:
            h.update(("\x02" + domain + "\x00" + u.user + "\x00" + u.target + "\x00").encode())
            h.update("\x00".join(u.history).encode())
    return h.hexdigest()[:20]


def train_sasrec_cached(
    train_sequences: list[tuple[str, list[str], list[str]]],
    catalogue: Catalogue,
    cfg: SASRecConfig,
    cache_dir: str | Path,
    valid: dict[str, DomainTask] | None = None,
    on_eval: EvalHook | None = None,
) -> tuple[SASRec, dict]:
    """``train_sasrec``, or the model saved by an earlier run with the same key (see ``sasrec_key``)."""
    path = Path(cache_dir) / f"sasrec-{sasrec_key(train_sequences, catalogue, cfg, valid)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = SASRec(len(catalogue.items), cfg)
        model.load_state_dict(blob["model"])
        log.info("SASRec: reusing the model trained earlier (%s)", path.name)
        return model.eval(), {**json.loads(blob["stats"]), "cached": True}
    model, stats = train_sasrec(train_sequences, catalogue, cfg, valid, on_eval)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "stats": json.dumps(stats)}, tmp)
    return model, {**stats, "cached": False}


def sasrec_score_fn(model: SASRec, catalogue: Catalogue) -> ScoreFn:
    """Score function: the user's last-position state against the domain's item embeddings
    (both in the similarity space: cosine or dot product)."""

    def score(task: DomainTask, batch: np.ndarray) -> torch.Tensor:
        seqs = []
        for i in batch:
            ids = to_ids(task.users[i].history, catalogue)[-model.cfg.max_len :]
            seqs.append(ids or [0])  # no known history: the padding id alone (position 0 only)
        h = model.user_states(seqs)
        with torch.no_grad():
            items = model.item_vectors(torch.from_numpy(task.rows + 1))
        return h @ items.t()

    return score
