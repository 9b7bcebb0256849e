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
``eval.in_batch_negatives=false`` every off-diagonal column is masked. AdamW (lr
``eval.finetune_lr``, betas 0.9/0.999, no weight decay, gradient norm clipped at 1) on all weights
or, with ``eval.lora_rank > 0``, on LoRA adapters of the q/v projections only (merged back before
saving). An untied output head is frozen: embeddings never reach it, and its AdamW state would be
the largest of the model.

The whole loss is one ``nn.Module`` forward (`ContrastiveModel`, taking the user and item token
batches), so a DeepSpeed engine can run it: under ZeRO-3 each decoder layer gathers its
partitioned weights around its own forward, for the user and the item pass alike.

Data order (the data position is the step index): the pairs of one epoch are a permutation seeded
by (seed, rank, epoch); step s reads batch ``s mod batches_per_epoch`` of epoch
``s // batches_per_epoch`` (an incomplete tail batch is dropped); the negatives of step s are drawn
from a generator seeded by (seed, rank, s). Resuming at step s therefore needs no replay.

Engine: always a `cprec.runtime.engine` DeepSpeed engine (`engine_spec`). By default ZeRO stage 0
in fp32 (the plain path: every rank holds the model, trains on every world-th pair, and DeepSpeed
averages the gradients; bf16 autocast on a GPU); with ``eval.finetune_deepspeed`` training's
``train.zero_stage``, ``train.offload_optimizer`` and ``model.dtype``, for models too large for one
device.

Checkpoints (`cprec.eval.finetune_state`): every ``eval.finetune_checkpoint_every`` steps and at the
end, under ``<eval.output_dir>/finetuned/<scope>/checkpoints/``; a rerun resumes the latest one and
ends with the same weights and losses as an uninterrupted run. The finished model is exported from
the final checkpoint like a training export: an HF folder ``<eval.output_dir>/finetuned/<scope>/``
plus ``finetune_state.json``
(steps, losses, pairs, settings). A later eval with the same base checkpoint and settings finds
``"completed": true`` there and reuses the model. Tests interrupt a run through the one
fault-injection seam, `cprec.runtime.faults` (called after every step).
"""

from __future__ import annotations

import hashlib
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
from torch import nn
from tqdm import tqdm

from cprec.config import Config, EvalConfig
from cprec.eval import finetune_state as fs
from cprec.eval.all_positions import AllPositionObjective, UserSequence
from cprec.eval.data_order import batch_rows, seed_words
from cprec.eval.encode import PromptBuilder, embed, pad_batch, resolve_dtype
from cprec.eval.finetune_state import (  # noqa: F401 (re-exported for callers of this module)
    STATE_FILE,
    CheckpointPolicy,
    load_state,
)
from cprec.eval.inputs import Catalogue
from cprec.eval.lora import apply_lora
from cprec.model.sharded import is_partitioned
from cprec.runtime import checkpoint as ckpt_io
from cprec.runtime import dist, faults
from cprec.runtime.engine import EngineSpec, init_engine, start_distributed
from cprec.runtime.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

BETAS = (0.9, 0.999)
GRAD_CLIP = 1.0


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
        self.rng = np.random.default_rng(seed_words(seed))

    def reseed(self, *parts: int) -> None:
        """Restart the draws from a generator seeded by ``parts`` (e.g. seed, rank, step)."""
        self.rng = np.random.default_rng(seed_words(*parts))

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


# ------------------------------------------------------------------------------------ the loss
class ContrastiveModel(nn.Module):
    """The InfoNCE loss of one batch as one forward (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, cfg: EvalConfig):
        super().__init__()
        self.hf_model = hf_model
        self.pooling = cfg.pooling
        self.temperature = cfg.temperature
        self.in_batch_negatives = cfg.in_batch_negatives

    def forward(
        self,
        user_ids: torch.Tensor,
        user_mask: torch.Tensor,
        item_ids: torch.Tensor,
        item_mask: torch.Tensor,
        pos_index: torch.Tensor,
        neg_index: torch.Tensor,
    ) -> torch.Tensor:
        """``pos_index`` [B]: row of each positive among the items; ``neg_index`` [B, N] (N may be 0)."""
        u = embed(self.hf_model, user_ids, user_mask, self.pooling)
        v = embed(self.hf_model, item_ids, item_mask, self.pooling)
        b = u.shape[0]
        batch_logits = u @ v[pos_index].t()  # [B, B]; the diagonal holds the positives
        same_item = pos_index.unsqueeze(0) == pos_index.unsqueeze(1)
        off_diag = ~torch.eye(b, dtype=torch.bool, device=u.device)
        drop = off_diag & (same_item if self.in_batch_negatives else torch.ones_like(same_item))
        parts = [batch_logits.masked_fill(drop, float("-inf"))]
        if neg_index.shape[1]:
            parts.append(torch.einsum("bd,bnd->bn", u, v[neg_index]))
        logits = torch.cat(parts, dim=1) / self.temperature
        return F.cross_entropy(logits, torch.arange(b, device=u.device))


def make_batch(
    builder: PromptBuilder, catalogue: Catalogue, pairs: list[Pair], negatives: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """The `ContrastiveModel` inputs of some pairs and their negatives (CPU tensors)."""
    users = builder.user_ids(catalogue, [p.history for p in pairs])
    uniq = sorted({p.positive for p in pairs} | {r for neg in negatives for r in neg})
    where = {r: i for i, r in enumerate(uniq)}
    items = builder.item_ids([catalogue.texts[r] for r in uniq])
    user_ids, user_mask = pad_batch(users, pad_id)
    item_ids, item_mask = pad_batch(items, pad_id)
    n_neg = len(negatives[0]) if negatives else 0
    neg = torch.tensor([[where[r] for r in ns] for ns in negatives], dtype=torch.long).reshape(
        len(pairs), n_neg
    )
    return {
        "user_ids": user_ids,
        "user_mask": user_mask,
        "item_ids": item_ids,
        "item_mask": item_mask,
        "pos_index": torch.tensor([where[p.positive] for p in pairs], dtype=torch.long),
        "neg_index": neg,
    }


class PairObjective:
    """The pair-wise examples of one rank: padded (history -> next item) pairs, batches as a
    function of the step (`batch_rows`, negatives reseeded by (seed, rank, step))."""

    name = "pairs"

    def __init__(self, model, builder, catalogue, pairs: list[Pair], cfg: EvalConfig, pad_id, rank, world):
        if not pairs:
            raise ValueError("fine-tuning has no training pairs (eval/train_sequences.parquet gives none)")
        self.module = ContrastiveModel(model, cfg)
        self.builder, self.catalogue, self.cfg, self.pad_id, self.rank = builder, catalogue, cfg, pad_id, rank
        self.n_examples = len(pairs)
        self.mine = pairs[rank::world] or pairs[:1]
        self.sampler = NegativeSampler(catalogue, cfg.seed)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        c = self.cfg
        rows = batch_rows(step, len(self.mine), c.finetune_batch_size, c.seed, self.rank)
        pairs = [self.mine[i] for i in rows]
        self.sampler.reseed(c.seed, self.rank, step)
        negs = [self.sampler.sample(p, c.finetune_negatives) if c.finetune_negatives else [] for p in pairs]
        return make_batch(self.builder, self.catalogue, pairs, negs, self.pad_id)

    @staticmethod
    def signals(batch: dict) -> int:
        return int(batch["pos_index"].numel())


def make_objective(
    model, builder, catalogue, examples: list, cfg: EvalConfig, pad_id: int, rank: int, world: int
):
    """The objective of ``examples``: `Pair` s (pair-wise) or user sequences (all-position)."""
    kind = AllPositionObjective if examples and isinstance(examples[0], UserSequence) else PairObjective
    return kind(model, builder, catalogue, examples, cfg, pad_id, rank, world)


# ------------------------------------------------------------------------------------ training
def _freeze_output_head(model: nn.Module) -> None:
    head, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and inp is not None and head.weight is not inp.weight:
        head.weight.requires_grad_(False)


def engine_spec(cfg: Config, world_size: int) -> EngineSpec:
    """The fine-tuning engine: the fine-tuning LR and batch size, AdamW betas 0.9/0.999, clipping at
    1, no weight decay; with ``eval.finetune_deepspeed`` training's ZeRO stage, offload and
    ``model.dtype`` (models too large for one device), else ZeRO stage 0 in fp32 (every rank holds
    the whole model; DeepSpeed averages the gradients over the ranks)."""
    ecfg = cfg.eval
    sharded = ecfg.finetune_deepspeed
    return EngineSpec(
        micro_batch_size=ecfg.finetune_batch_size,
        world_size=world_size,
        zero_stage=cfg.train.zero_stage if sharded else 0,
        offload_optimizer=cfg.train.offload_optimizer if sharded else False,
        dtype=cfg.model.dtype if sharded else "fp32",
        lr=ecfg.finetune_lr,
        betas=BETAS,
        weight_decay=0.0,
        grad_clip=GRAD_CLIP,
        # A fine-tuning step runs the decoder more than once before its backward (users, then
        # items), which DeepSpeed's leaf modules do not support (a gradient reduced twice).
        zero3_leaf="module",
    )


def base_model(cfg: Config, base_dir: Path) -> nn.Module:
    """The model fine-tuning starts from, as `finetune_to_folder` wants it.

    Under ``eval.finetune_deepspeed`` with ZeRO-3 (and no LoRA) it is built partitioned
    (`cprec.model.sharded.load`, the training job's loader): each rank reads only its slice of the
    base's safetensors files, so no rank holds the full fp32 weights, as in pre-training. Otherwise
    (ZeRO 0-2, or LoRA, whose wrappers need the linears' whole weights) every rank loads the full
    fp32 model, which DeepSpeed then partitions or replicates."""
    from cprec.eval.encode import load_model
    from cprec.runtime.engine import zero3_build_config

    info = start_distributed()  # zero.Init partitions over the process group
    build = zero3_build_config(engine_spec(cfg, info.world_size))
    if build is None or cfg.eval.lora_rank > 0:
        return load_model(base_dir, dtype=torch.float32)
    from cprec.model import sharded

    log.info("fine-tuning model built ZeRO-3 partitioned from %s", base_dir)
    return sharded.load(base_dir, build, vocab_size=0)


def deepspeed_engine(module: nn.Module, cfg: Config, world_size: int):
    """A DeepSpeed engine for fine-tuning (call `cprec.runtime.engine.start_distributed` first)."""
    return init_engine(module, engine_spec(cfg, world_size))


class FineTuner:
    """One fine-tuning run: model (+LoRA) in a DeepSpeed engine, step, losses, checkpoints.

    The trained weights live in the engine's checkpoints (see `finetune_to_folder`); under ZeRO-3
    ``model`` itself only holds partitions.
    """

    def __init__(
        self,
        model: nn.Module,
        builder: PromptBuilder,
        catalogue: Catalogue,
        examples: list,
        cfg: Config,
        pad_id: int,
        *,
        tracker: Tracker | None = None,
        metric: str = "finetune/loss",
        desc: str = "finetune",
    ):
        ecfg = cfg.eval
        info = start_distributed()  # DeepSpeed needs a process group, even for one process
        self.rank, self.world = info.rank, info.world_size
        self.cfg = ecfg
        torch.manual_seed(ecfg.seed)
        if ecfg.lora_rank > 0:
            log.info("LoRA rank %d on %d projections", ecfg.lora_rank, apply_lora(model, ecfg.lora_rank))
        _freeze_output_head(model)
        self.objective = make_objective(
            model, builder, catalogue, examples, ecfg, pad_id, self.rank, self.world
        )
        self.n_pairs = self.objective.n_examples
        self.steps = max(
            1, math.ceil(ecfg.finetune_epochs * self.n_pairs / (ecfg.finetune_batch_size * self.world))
        )
        self.tracker = tracker or NullTracker()
        self.metric, self.desc = metric, desc
        self.step, self.losses, self.resumed_from, self.signals = 0, [], 0, 0
        self.last_checkpoint: Path | None = None
        spec = engine_spec(cfg, self.world)
        self.engine = init_engine(self.objective.module, spec)
        # The plain path (ZeRO-0, fp32 master weights) computes in bf16 under autocast on GPUs and on
        # bf16-capable CPUs (eval.dtype); the DeepSpeed path follows model.dtype instead.
        bf16 = resolve_dtype(ecfg.dtype, self.engine.device) == torch.bfloat16
        self.autocast = not ecfg.finetune_deepspeed and bf16
        self.engine_info = {
            "deepspeed": True,
            "zero_stage": spec.zero_stage,
            "offload_optimizer": spec.offload_optimizer,
            "dtype": spec.dtype,
        }

    # ---------------------------------------------------------------- state
    def position(self, step: int) -> dict:
        per_epoch = max(1, len(self.objective.mine) // self.cfg.finetune_batch_size)
        return {
            "epoch": step // per_epoch,
            "batch_in_epoch": step % per_epoch,
            "batches_per_epoch": per_epoch,
        }

    def state_dict(self) -> dict:
        """Step, losses so far, RNG streams and data position (weights/optimizer: the engine)."""
        return {
            "step": self.step,
            "losses": list(self.losses),
            "data": self.position(self.step),
            "rng": ckpt_io.rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        ckpt_io.set_rng_state(state["rng"])

    def _compat(self, policy: CheckpointPolicy) -> dict:
        return fs.compatibility(policy.key, self.world, self.engine_info, self.steps, self.n_pairs)

    def save(self, policy: CheckpointPolicy) -> Path:
        final = self.step == self.steps
        state = {
            **self._compat(policy),
            "step": self.step,
            "losses": self.losses,
            "data": self.position(self.step),
            "run_id": self.tracker.run_id,
        }
        self.last_checkpoint = fs.save_checkpoint(
            self.engine,
            policy.folder,
            self.step,
            state,
            self.state_dict(),
            final=final,
            keep_last=policy.keep_last,
        )
        return self.last_checkpoint

    def resume(self, policy: CheckpointPolicy) -> bool:
        """Load the latest compatible checkpoint of ``policy.folder``; False when there is none."""
        ckpt, state = fs.find_resumable(policy.folder, self._compat(policy))
        if ckpt is None:
            return False
        self.load_state_dict(fs.load_checkpoint(self.engine, ckpt, self.rank))
        self.resumed_from, self.last_checkpoint = self.step, ckpt
        log.info("fine-tuning resumes from %s (step %d of %d)", ckpt, self.step, self.steps)
        return True

    # ---------------------------------------------------------------- the loop
    def _train_step(self, batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            dev = self.engine.device
            loss = self.engine(**{k: t.to(dev) if torch.is_tensor(t) else t for k, t in batch.items()})
        self.engine.backward(loss)
        self.engine.step()
        value = loss.detach().float().reshape(1)
        if self.world > 1:  # the logged loss is the mean over ranks
            tdist.all_reduce(value)
            value /= self.world
        return float(value)

    def train(self, policy: CheckpointPolicy, stop_after: int | None = None) -> dict:
        """Train to the end (or stop after step ``stop_after``, as if interrupted); returns stats."""
        self.resume(policy)
        t0 = time.perf_counter()
        self.engine.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=self.desc, unit="step", disable=self.rank != 0)
        while self.step < self.steps and (stop_after is None or self.step < stop_after):
            batch = self.objective.batch(self.step)
            self.signals += self.objective.signals(batch)
            loss = self._train_step(batch)
            self.step += 1
            self.losses.append(loss)
            self.tracker.log_metrics({self.metric: loss}, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step == self.steps or (policy.every and self.step % policy.every == 0):
                self.save(policy)
            faults.step_done("finetune", self.step)
        bar.close()
        self.engine.eval()
        return self.stats(time.perf_counter() - t0)

    def stats(self, seconds: float) -> dict:
        losses = self.losses or [float("nan")]
        return {
            "steps": self.steps,
            "completed": self.step == self.steps,
            "resumed_from_step": self.resumed_from,
            "pairs": self.n_pairs,
            "objective": self.objective.name,
            "signals_this_run": self.signals,
            "signals_per_second": self.signals / seconds if seconds > 0 else 0.0,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10) :])),
            "losses": list(self.losses),
            "seconds": seconds,
            "engine": self.engine_info,
        }

    def close(self) -> None:
        """Release the engine (its hooks hold the model)."""
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None


def finetune_to_folder(
    model,
    builder: PromptBuilder,
    catalogue: Catalogue,
    pairs: list[Pair],
    cfg: Config,
    pad_id: int,
    *,
    base_dir: Path,
    folder: Path,
    key: dict,
    skipped: dict,
    tracker: Tracker | None = None,
    metric: str = "finetune/loss",
    desc: str = "finetune",
    stop_after: int | None = None,
) -> dict | None:
    """Fine-tune ``model`` (loaded from ``base_dir``), resuming and checkpointing under ``folder``,
    and export the result there from the final checkpoint (HF folder + ``finetune_state.json``,
    rank 0). Returns the saved state, or None when stopped early by ``stop_after``. Every rank
    calls this."""
    ecfg = cfg.eval
    fs.clear_state(folder)
    tuner = FineTuner(
        model, builder, catalogue, pairs, cfg, pad_id, tracker=tracker, metric=metric, desc=desc
    )
    policy = CheckpointPolicy(
        Path(folder), key, ecfg.finetune_checkpoint_every, cfg.train.checkpoint.keep_last
    )
    try:
        stats = tuner.train(policy, stop_after)
        # ZeRO-3 without LoRA: streamed from the live engine, never whole on any rank.
        streamed = stats["completed"] and ecfg.lora_rank == 0 and is_partitioned(model)
        if streamed:
            fs.export_partitioned(model, Path(folder))
    finally:
        tuner.close()
    if not stats["completed"]:
        return None
    if dist.is_main():
        if not streamed:
            fs.export_finetuned(tuner.last_checkpoint, Path(base_dir), ecfg.lora_rank, Path(folder))
        fs.mark_complete(Path(folder), key, stats, skipped)
    dist.barrier()
    return fs.load_state(folder)


def pairs_identity(pairs: list[Pair], catalogue: Catalogue) -> str:
    """Content hash of the training pairs and the catalogue their prompts are rendered from."""
    h = hashlib.sha256(catalogue.subset_hash(list(range(len(catalogue.items)))).encode())
    for p in pairs:
        h.update("\x1f".join(p.history).encode("utf-8"))
        h.update(f"\x1e{catalogue.items[p.positive]}\x1d".encode())
    return h.hexdigest()[:16]


def settings_key(cfg: EvalConfig, base_id: str, scope: str, data_id: str = "") -> dict:
    """What decides a fine-tuned model: a saved one is reused only when all of this matches.

    ``data_id`` (`pairs_identity`) ties it to the training pairs too (left out when empty)."""
    names = (
        "finetune_epochs",
        "finetune_lr",
        "finetune_batch_size",
        "finetune_negatives",
        "finetune_pairs_per_user",
        "finetune_objective",
        "finetune_max_items",
        "finetune_seq_len",
        "in_batch_negatives",
        "temperature",
        "lora_rank",
        "pooling",
        "dtype",
        "max_history_items",
        "seed",
    )
    key = {"base": base_id, "scope": scope, **{n: getattr(cfg, n) for n in names}}
    if data_id:
        key["data"] = data_id
    return key
