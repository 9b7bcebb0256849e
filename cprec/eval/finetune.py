"""Contrastive fine-tuning of the pre-trained LM for retrieval (the LLM-Rec recipe).

Pairs come from ``train_sequences.parquet``: for each user, its last ``eval.finetune_pairs_per_user``
training items are positives, each with the items before it as the history prompt (so no eval
target is ever seen). Per batch of B pairs:

    u_b  = embed(user prompt b),  v_b = embed(item prompt of positive b)     (L2-normalised)
    n_bj = embed(item prompt of the j-th sampled negative of b)  — N items of the positive's domain,
           not the positive and not in b's history
    logits_b = [u_b·v_1 ... u_b·v_B (other users' positives = in-batch negatives), u_b·n_b1 ... u_b·n_bN]
    loss = mean_b CE(logits_b / temperature, target = b)

An in-batch column equal to the row's own positive item is masked out (not a true negative); with
``eval.in_batch_negatives=false`` every off-diagonal column is masked. AdamW on all weights or, with
``eval.lora_rank > 0``, on LoRA adapters of the q/v projections only (merged back before saving).

Distributed: when torch.distributed is initialised each rank trains on every world-th pair and
gradients are averaged with an all-reduce before each step (what DDP does; the embedding function
calls the decoder directly, which a DDP wrapper would not see). To train a model too large for one
device, wrap it with ``deepspeed.initialize(model=model, optimizer=opt, config=...)`` and replace
``loss.backward(); opt.step()`` by ``engine.backward(loss); engine.step()`` — ``embed`` takes
``engine.module``.

The result is saved like a training export: an HF folder ``<eval.output_dir>/finetuned/<scope>/``
(``save_pretrained``) plus ``finetune_state.json`` (steps, losses, pairs, settings). A later eval with
the same base checkpoint and settings finds ``"completed": true`` there and reuses the model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from tqdm import tqdm

from cprec.config import EvalConfig
from cprec.eval.encode import PromptBuilder, embed, pad_batch
from cprec.eval.inputs import Catalogue
from cprec.eval.lora import apply_lora, merge_lora

log = logging.getLogger(__name__)

STATE_FILE = "finetune_state.json"


@dataclass
class Pair:
    history: list[str]
    positive: int
    """Catalogue row of the positive item."""
    domain: str


def build_pairs(
    train_sequences: list[tuple[str, list[str], list[str]]],
    catalogue: Catalogue,
    domains: set[str] | None = None,
    per_user: int = 1,
) -> tuple[list[Pair], dict[str, int]]:
    """(history, positive) pairs from each user's last ``per_user`` items; skipped counts by reason."""
    pairs, skipped = [], Counter()
    for _, items, _ in train_sequences:
        for j in range(len(items) - 1, max(len(items) - per_user, 0) - 1, -1):
            if j == 0:
                skipped["no_history"] += 1
                continue
            row = catalogue.index.get(items[j])
            if row is None:
                skipped["positive_not_in_items"] += 1
                continue
            domain = catalogue.domains[row]
            if domains is not None and domain not in domains:
                continue  # another scope's pair, not a loss of data
            pairs.append(Pair(items[:j], row, domain))
    return pairs, dict(skipped)


class NegativeSampler:
    """Uniform in-domain negatives that avoid the positive and the user's history."""

    def __init__(self, catalogue: Catalogue, seed: int):
        self.catalogue = catalogue
        self.by_domain: dict[str, np.ndarray] = {}
        for d in sorted(set(catalogue.domains)):
            self.by_domain[d] = np.asarray(catalogue.domain_rows(d), dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def sample(self, pair: Pair, n: int) -> list[int]:
        pool = self.by_domain[pair.domain]
        banned = {pair.positive} | {self.catalogue.index.get(i) for i in pair.history}
        out: list[int] = []
        for _ in range(8):  # rejection sampling; the banned set is tiny next to a catalogue
            draw = self.rng.choice(pool, size=2 * n + 4)
            out += [int(r) for r in draw if int(r) not in banned][: n - len(out)]
            if len(out) >= n:
                return out
        rest = [int(r) for r in pool if int(r) not in banned]
        if not rest:
            raise ValueError(f"domain {pair.domain!r} has no item to use as a negative")
        return out + [int(r) for r in self.rng.choice(rest, size=n - len(out))]


def contrastive_loss(
    model,
    builder: PromptBuilder,
    catalogue: Catalogue,
    pairs: list[Pair],
    negatives: list[list[int]],
    cfg: EvalConfig,
    pad_id: int,
) -> torch.Tensor:
    """The InfoNCE loss of one batch (see the module docstring)."""
    device = next(model.parameters()).device
    users = builder.user_ids(catalogue, [p.history for p in pairs])
    uniq = sorted({p.positive for p in pairs} | {r for neg in negatives for r in neg})
    where = {r: i for i, r in enumerate(uniq)}
    items = builder.item_ids([catalogue.texts[r] for r in uniq])
    u = embed(model, *(t.to(device) for t in pad_batch(users, pad_id)), cfg.pooling)
    v = embed(model, *(t.to(device) for t in pad_batch(items, pad_id)), cfg.pooling)
    pos_rows = torch.tensor([p.positive for p in pairs], device=device)
    pos = v[torch.tensor([where[p.positive] for p in pairs], device=device)]
    batch_logits = u @ pos.t()  # [B, B]; the diagonal holds the positives
    same_item = pos_rows.unsqueeze(0) == pos_rows.unsqueeze(1)
    off_diag = ~torch.eye(len(pairs), dtype=torch.bool, device=device)
    drop = off_diag & (same_item if cfg.in_batch_negatives else torch.ones_like(same_item))
    batch_logits = batch_logits.masked_fill(drop, float("-inf"))
    parts = [batch_logits]
    if negatives and negatives[0]:
        neg_idx = torch.tensor([[where[r] for r in neg] for neg in negatives], device=device)
        parts.append(torch.einsum("bd,bnd->bn", u, v[neg_idx]))
    logits = torch.cat(parts, dim=1) / cfg.temperature
    return F.cross_entropy(logits, torch.arange(len(pairs), device=device))


def finetune(
    model,
    builder: PromptBuilder,
    catalogue: Catalogue,
    pairs: list[Pair],
    cfg: EvalConfig,
    pad_id: int,
    desc: str = "finetune",
) -> dict:
    """Train ``model`` in place on the pairs; returns stats (steps, losses, seconds)."""
    if not pairs:
        raise ValueError("fine-tuning has no training pairs (eval/train_sequences.parquet gives none)")
    distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if distributed else (0, 1)
    mine = pairs[rank::world] or pairs[:1]
    steps = max(1, math.ceil(cfg.finetune_epochs * len(pairs) / (cfg.finetune_batch_size * world)))
    torch.manual_seed(cfg.seed)
    if cfg.lora_rank > 0:
        n = apply_lora(model, cfg.lora_rank)
        log.info("LoRA rank %d on %d projections", cfg.lora_rank, n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
    sampler = NegativeSampler(catalogue, cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed + rank)
    use_bf16 = next(model.parameters()).device.type == "cuda"
    order, pos, losses = rng.permutation(len(mine)), 0, []
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=rank != 0 or None)
    for _ in bar:
        if pos + cfg.finetune_batch_size > len(order) and pos > 0:
            order, pos = rng.permutation(len(mine)), 0
        batch = [mine[i] for i in order[pos : pos + cfg.finetune_batch_size]]
        pos += cfg.finetune_batch_size
        negs = [sampler.sample(p, cfg.finetune_negatives) if cfg.finetune_negatives else [] for p in batch]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = contrastive_loss(model, builder, catalogue, batch, negs, cfg, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                tdist.all_reduce(p.grad)
                p.grad /= world
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    if cfg.lora_rank > 0:
        merge_lora(model)
    return {
        "steps": steps,
        "pairs": len(pairs),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_mean_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }


def settings_key(cfg: EvalConfig, base_id: str, scope: str) -> dict:
    """What decides a fine-tuned model: a saved one is reused only when all of this matches."""
    names = (
        "finetune_epochs",
        "finetune_lr",
        "finetune_batch_size",
        "finetune_negatives",
        "finetune_pairs_per_user",
        "in_batch_negatives",
        "temperature",
        "lora_rank",
        "pooling",
        "max_history_items",
        "seed",
    )
    return {"base": base_id, "scope": scope, **{n: getattr(cfg, n) for n in names}}


def load_state(folder: Path) -> dict | None:
    p = folder / STATE_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def save_finetuned(model, folder: Path, key: dict, stats: dict, skipped: dict) -> Path:
    """``save_pretrained`` + ``finetune_state.json`` (written last: it marks the folder complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    state = {"completed": True, "key": key, "skipped": skipped, **stats}
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    tmp.replace(folder / STATE_FILE)
    return folder
