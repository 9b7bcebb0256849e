"""Generative retrieval, zero-shot: rank a domain's items by the model's likelihood of writing them.

Continual pre-training taught the model one task: after a user's mixed-sequence history, write the
next item. So the user prompt here is that history text up to the end of its last item
(``PromptBuilder.next_item_prompt_ids``), and candidate item *i* is the text the model would write
next: ``item_sep`` + the item rendered as in a mixed sequence, tokenized on its own, then EOS
(``PromptBuilder.next_item_ids``). Tokenizing the continuation apart from the prompt lets every user
share one trie per domain; where the tokenizer merges the separator with the preceding text the
first tokens differ from pre-training's, but they are the same for every item, so a user's ranking
is not affected by more than a constant.

Two rows, on the same users, candidates and masks as the embedding rows (``cprec.eval.ranking``):

- ``llm-generative``: beam search through transformers' ``generate`` (``eval.beam_width`` beams,
  ``length_penalty=0``: a hypothesis scores the plain sum of its token log-probabilities) with a
  logits processor that only lets beams spell out catalogue items (``CatalogueTrie``) and never
  spends a beam on a path that can only end on the user's history items. Reached items score their
  sequence log-probability; every other item scores ``-inf``, so it ranks after all reached ones,
  pessimistically (ties).
- ``llm-reranked`` (``eval.rerank_top_n`` = N > 0): the N best items of the zero-shot embedding
  retrieval re-scored by their exact log-probability; the others stay below the N, in embedding
  order.

Items whose token sequences are identical share a trie leaf and a score (counted per domain in
``duplicate_texts``). Cost per user (``cost`` in report.json, tokens fed through the model): the
beam as run (``generate`` prefills the prompt once per beam, then one token per beam per step) and
exhaustive likelihood scoring of every candidate (the prompt once, then each candidate's tokens).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from cprec.eval.encode import EncodeProgress, PromptBuilder
from cprec.eval.inputs import Catalogue
from cprec.eval.ranking import DomainTask, ScoreFn
from cprec.eval.trie import CatalogueTrie

log = logging.getLogger(__name__)

DEAD = -1e8
"""Hypotheses scoring below this are not hits: ``generate`` starts beams 2..W at -1e9 (copies of
beam 1) and adds -1e9 to hypotheses finished after a batch element is done."""
LOGITS_BUDGET = 1 << 28
"""Float32 logits held at once (1 GiB): caps the rows of a scoring chunk and of a beam call."""


@dataclass
class BeamResult:
    hits: dict[int, float]
    """Column -> sequence log-probability of every reached item outside the history."""
    forward_tokens: int
    """Tokens the search fed through the model for this user: beams x (prompt + steps - 1)."""
    steps: int
    """Generation steps of the call this user was in."""


class TrieConstraint:
    """Logits processor for one ``generate`` call: every token a beam may not write next is set to
    -inf (a beam off the trie, or at a dead end, then has no finite continuation and dies). Called
    once per step: ``calls`` counts the steps."""

    def __init__(self, trie: CatalogueTrie, prompt_width: int, num_beams: int, blocked: list[dict]):
        self.trie, self.prompt_width, self.num_beams, self.blocked = trie, prompt_width, num_beams, blocked
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows, cols = [], []
        for r, prefix in enumerate(input_ids[:, self.prompt_width :].tolist()):
            node = self.trie.walk(prefix)
            if node is None:
                continue
            allowed = self.trie.allowed(node, self.blocked[r // self.num_beams])
            rows += [r] * len(allowed)
            cols += allowed
        mask = torch.full_like(scores, -math.inf)
        at = {"dtype": torch.long, "device": scores.device}
        mask[torch.tensor(rows, **at), torch.tensor(cols, **at)] = 0.0
        return scores + mask


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def sequence_logprobs(
    model, pairs: list[tuple[list[int], list[int]]], pad_id: int, max_rows: int = 64, max_tokens: int = 16384
) -> list[float]:
    """log P(continuation | prompt) of each (prompt, continuation) pair by teacher forcing: rows
    ``prompt + continuation[:-1]``, left-padded (positions from the mask, as ``generate`` has them),
    logits kept for the last positions only; longest rows first, chunked by rows and tokens."""
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out = [0.0] * len(pairs)
    cmax = max((len(c) for _, c in pairs), default=1)
    start = 0
    while start < len(order):
        first = pairs[order[start]]
        width = len(first[0]) + len(first[1]) - 1
        rows = max(1, min(max_rows, max_tokens // width, LOGITS_BUDGET // (cmax * vocab)))
        idx = order[start : start + rows]
        start += len(idx)
        ids, mask = _left_pad([pairs[i][0] + pairs[i][1][:-1] for i in idx], pad_id)
        keep = max(len(pairs[i][1]) for i in idx)
        target = torch.zeros((len(idx), keep), dtype=torch.long)
        valid = torch.zeros((len(idx), keep), dtype=torch.bool)
        for r, i in enumerate(idx):
            c = pairs[i][1]
            target[r, keep - len(c) :] = torch.tensor(c, dtype=torch.long)
            valid[r, keep - len(c) :] = True
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            logits_to_keep=keep,
        ).logits.float()
        target, valid = target.to(device), valid.to(device)
        tok = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        sums = torch.where(valid, tok, torch.zeros_like(tok)).sum(-1).cpu().tolist()
        for r, i in enumerate(idx):
            out[i] = sums[r]
    return out


class GenerativeScorer:
    """Prompts, per-domain tries, constrained beam search and exact likelihoods for one model."""

    def __init__(
        self,
        model,
        builder: PromptBuilder,
        catalogue: Catalogue,
        eos_id: int,
        pad_id: int,
        batch_size: int = 64,
    ):
        self.model, self.builder, self.catalogue = model, builder, catalogue
        self.eos_id, self.pad_id, self.batch_size = eos_id, pad_id, batch_size
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._items: dict[str, tuple[list[list[int]], CatalogueTrie]] = {}
        self._prompts: dict[tuple[str, int], list[int]] = {}
        self._fed: dict[str, int] = {}  # per domain: tokens fed to score every item after a prompt

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def items(self, task: DomainTask) -> tuple[list[list[int]], CatalogueTrie]:
        """(continuation ids per column, trie over them) of a task's domain."""
        if task.domain not in self._items:
            seqs = self.builder.next_item_ids(self.catalogue, task.rows.tolist(), self.eos_id)
            self._items[task.domain] = (seqs, CatalogueTrie(seqs))
        return self._items[task.domain]

    def prompt(self, task: DomainTask, user: int) -> list[int]:
        """Prompt ids of a task's user, cut to leave room for the longest continuation."""
        key = (task.domain, user)
        if key not in self._prompts:
            depth = self.items(task)[1].depth
            limit = self.max_positions - depth if self.max_positions else 0
            if self.max_positions and limit < 2:
                raise ValueError(
                    f"the model has {self.max_positions} positions: too few for a prompt and a "
                    f"{depth}-token item of domain {task.domain!r}"
                )
            u = task.users[user]
            ids = self.builder.next_item_prompt_ids(self.catalogue, u.history, limit)
            if not ids:
                raise ValueError(
                    f"user {u.user!r} (domain {u.domain!r}) has an empty history (no item known to "
                    "items.parquet): generative retrieval needs one to continue"
                )
            self._prompts[key] = ids
        return self._prompts[key]

    def beams(self, trie: CatalogueTrie, prompts: list[list[int]], exclude: list[set], width: int):
        """One constrained ``generate`` call: (generated ids per returned beam, its summed
        log-probability, steps run); beams ``b*width .. (b+1)*width-1`` belong to prompt b."""
        from transformers import GenerationConfig, LogitsProcessorList

        ids, mask = _left_pad(prompts, self.pad_id)
        constraint = TrieConstraint(trie, ids.shape[1], width, [trie.blocked(e) for e in exclude])
        config = GenerationConfig(
            num_beams=width,
            num_return_sequences=width,
            do_sample=False,
            length_penalty=0.0,  # score = sum of log-probs (score / length**0)
            early_stopping=False,  # exact with length_penalty 0: log-probs only fall
            max_new_tokens=trie.depth,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            output_scores=True,  # sequences_scores come only with it
            return_dict_in_generate=True,
        )
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([constraint]),
        )
        seqs = out.sequences[:, ids.shape[1] :].tolist()
        return seqs, out.sequences_scores.float().tolist(), constraint.calls

    def _generate(self, trie: CatalogueTrie, prompts: list[list[int]], exclude: list[set], width: int):
        seqs, scores, steps = self.beams(trie, prompts, exclude, width)
        hits = []
        for b in range(len(prompts)):
            found: dict[int, float] = {}
            for k in range(b * width, (b + 1) * width):
                if not scores[k] > DEAD:
                    continue
                for col in trie.items_at(trie.match(seqs[k])):
                    if col not in exclude[b] and scores[k] > found.get(col, -math.inf):
                        found[col] = scores[k]
            hits.append(found)
        return hits, steps

    def lockstep(self, task: DomainTask, search_width: int = 0):
        """The lockstep phase (`cprec.eval.zero3.PartitionedLM.lockstep`) a ZeRO-3 model's ranks
        spread work in: padding passes of the kind the phase runs, a beam search of width
        ``search_width`` over the task's trie from a 1-token prompt, or (0) one likelihood pass.
        A model of its own on every rank needs none (a context that does nothing)."""
        phase = getattr(self.model, "lockstep", None)
        if phase is None:
            return contextlib.nullcontext()
        bos = list(self.builder.bos)
        if search_width:
            trie = self.items(task)[1]
            return phase(lambda: self.beams(trie, [bos], [set()], search_width))
        return phase(lambda: sequence_logprobs(self.model, [(bos, [self.eos_id])], self.pad_id))

    def history(self, task: DomainTask, user: int) -> set[int]:
        return set(task.history_cols[user].tolist())

    def search(self, task: DomainTask, users: list[int], width: int) -> dict[int, BeamResult]:
        """Constrained beam search for some of a task's users (indices into ``task.users``)."""
        _, trie = self.items(task)
        vocab = int(self.model.config.vocab_size)
        beams = max(width, min(4 * self.batch_size, LOGITS_BUDGET // (vocab * trie.depth)))
        per_call = max(1, beams // width)
        order = sorted(users, key=lambda u: len(self.prompt(task, u)))
        progress = EncodeProgress(len(order), f"beam search ({task.domain})")
        out: dict[int, BeamResult] = {}
        for start in range(0, len(order), per_call):
            chunk = order[start : start + per_call]
            prompts = [self.prompt(task, u) for u in chunk]
            hits, steps = self._generate(trie, prompts, [self.history(task, u) for u in chunk], width)
            for u, p, h in zip(chunk, prompts, hits):
                out[u] = BeamResult(h, width * (len(p) + steps - 1), steps)
            progress.update(len(chunk))
        progress.close()
        return out

    def likelihoods(self, task: DomainTask, users: list[int], cols: list[list[int]]) -> list[list[float]]:
        """log P(item | prompt) of the given columns of each user."""
        seqs, _ = self.items(task)
        pairs = [(self.prompt(task, u), seqs[c]) for u, cs in zip(users, cols) for c in cs]
        flat = sequence_logprobs(self.model, pairs, self.pad_id, 4 * self.batch_size)
        out, i = [], 0
        for cs in cols:
            out.append(flat[i : i + len(cs)])
            i += len(cs)
        return out

    def exhaustive_score_fn(self) -> ScoreFn:
        """Every item of the domain scored by its exact log-probability (the reference that a beam
        as wide as the catalogue reproduces; costly on real catalogues)."""

        def score(task: DomainTask, batch) -> torch.Tensor:
            users = [int(u) for u in batch]
            cols = list(range(task.n_items))
            return torch.tensor(self.likelihoods(task, users, [cols] * len(users)), dtype=torch.float32)

        return score

    def exhaustive_tokens(self, task: DomainTask, user: int) -> int:
        """Tokens exhaustive scoring feeds for a user: the prompt once, then each candidate's tokens
        but its last (the prompt's KV cache shared)."""
        seqs, _ = self.items(task)
        if task.domain not in self._fed:
            self._fed[task.domain] = sum(len(s) - 1 for s in seqs)
        history = sum(len(seqs[c]) - 1 for c in self.history(task, user))
        return len(self.prompt(task, user)) + self._fed[task.domain] - history


# ---------------------------------------------------------------------------------- score fns
def beam_score_fn(hits: dict[str, list[dict[int, float]]]) -> ScoreFn:
    """Reached items score their log-probability, all others -inf (after every reached item)."""

    def score(task: DomainTask, batch) -> torch.Tensor:
        out = torch.full((len(batch), task.n_items), -math.inf)
        for b, u in enumerate(batch):
            found = hits[task.domain][int(u)]
            if found:
                out[b, torch.tensor(list(found))] = torch.tensor(list(found.values()))
        return out

    return score


def top_candidates(task: DomainTask, batch, scores: torch.Tensor, n: int) -> list[list[int]]:
    """Per user of the batch: the columns of its ``n`` best-scored candidates (history excluded)."""
    scores = scores.float().clone()
    for b, u in enumerate(batch):
        scores[b, torch.from_numpy(task.history_cols[int(u)])] = -math.inf
    top = scores.topk(min(n, task.n_items), dim=1)
    return [
        [c for c, v in zip(ci, vi) if v > -math.inf]
        for ci, vi in zip(top.indices.tolist(), top.values.tolist())
    ]


def rerank_score_fn(embedding: ScoreFn, rescored: dict[str, list[tuple[list[int], list[float]]]]) -> ScoreFn:
    """The re-scored columns of each user score their log-probability; the others keep their
    embedding order, shifted below the lowest re-scored item."""

    def score(task: DomainTask, batch) -> torch.Tensor:
        out = embedding(task, batch).float().clone()
        for b, u in enumerate(batch):
            cols, lik = rescored[task.domain][int(u)]
            if not cols:
                continue
            top = torch.tensor(cols)
            rest = torch.ones(task.n_items, dtype=torch.bool)
            rest[top] = False
            emb = out[b, rest]
            if emb.numel():
                out[b, rest] = min(lik) - 1.0 - (emb.max() - emb)
            out[b, top] = torch.tensor(lik, dtype=out.dtype)
        return out

    return score


# ----------------------------------------------------------------------------------- the rows
def _spread(n: int, compute: Callable[[list[int]], dict[int, object]], phase=contextlib.nullcontext) -> list:
    """``compute`` over users 0..n-1; under torch.distributed each rank takes every world-th user
    (inside ``phase()``: the lockstep of a ZeRO-3 model, `GenerativeScorer.lockstep`) and the
    results are all-gathered (every rank gets them all)."""
    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        done = compute(list(range(n)))
    else:
        rank, world = tdist.get_rank(), tdist.get_world_size()
        parts: list = [None] * world
        with phase():
            mine = compute(list(range(rank, n, world)))
        tdist.all_gather_object(parts, mine)
        done = {k: v for part in parts for k, v in part.items()}
    return [done[i] for i in range(n)]


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def _beam_cost(per_user: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for d, rows in {**per_user, "overall": [r for v in per_user.values() for r in v]}.items():
        beam = _mean([r["beam"] for r in rows])
        exhaustive = _mean([r["exhaustive"] for r in rows])
        out[d] = {
            "users": len(rows),
            "candidates_per_user": _mean([r["candidates"] for r in rows]),
            "beam_forward_tokens_per_user": beam,
            "exhaustive_forward_tokens_per_user": exhaustive,
            "exhaustive_over_beam": exhaustive / beam if beam else float("nan"),
            "generation_steps_per_user": _mean([r["steps"] for r in rows]),
            "items_reached_per_user": _mean([r["reached"] for r in rows]),
            "targets_reached": _mean([r["target"] for r in rows]),
        }
    return out


def generative_rows(
    cfg, side, hf_dir: Path, model_id: str, tasks: dict[str, DomainTask], embedding: ScoreFn | None = None
) -> tuple[dict[str, ScoreFn], dict[str, dict]]:
    """Score functions and report entries of ``llm-generative`` (``eval.generative``) and
    ``llm-reranked`` (``eval.rerank_top_n`` > 0) from the checkpoint as it is. ``embedding`` is the
    zero-shot embedding score function when it was already built (else it is built here)."""
    from cprec.prepare.tokenize import special_ids

    ecfg = cfg.eval
    if not (ecfg.generative or ecfg.rerank_top_n):
        return {}, {}
    model = side.load_model(hf_dir).eval()
    eos = special_ids(side.tokenizer)["eos_id"]
    scorer = GenerativeScorer(
        model, side.builder(model.config), side.inputs.catalogue, eos, side.pad_id, ecfg.batch_size
    )
    duplicates = {d: scorer.items(t)[1].duplicate_counts() for d, t in tasks.items()}
    for d, c in ((d, c) for d, c in duplicates.items() if c["groups"]):
        log.warning("%s: %d items in %d groups have the same ids (tied)", d, c["items"], c["groups"])
    fns: dict[str, ScoreFn] = {}
    models: dict[str, dict] = {}
    if ecfg.generative:
        hits, cost = {}, {}
        for d, task in tasks.items():
            res = _spread(
                len(task.users),
                lambda us, task=task: scorer.search(task, us, ecfg.beam_width),
                lambda task=task: scorer.lockstep(task, ecfg.beam_width),
            )
            hits[d] = [r.hits for r in res]
            cost[d] = [
                {"beam": r.forward_tokens, "steps": r.steps, "reached": len(r.hits),
                 "target": float(int(task.targets[u]) in r.hits),
                 "exhaustive": scorer.exhaustive_tokens(task, u),
                 "candidates": task.n_items - len(task.history_cols[u])}
                for u, r in enumerate(res)
            ]  # fmt: skip
        fns["llm-generative"] = beam_score_fn(hits)
        models["llm-generative"] = {"folder": str(hf_dir), "beam_width": ecfg.beam_width,
                                    "duplicate_texts": duplicates, "cost": _beam_cost(cost)}  # fmt: skip
    if ecfg.rerank_top_n:
        embedding = embedding or side.score_fn(model, model_id, tasks)
        rescored, cost = {}, {}
        for d, task in tasks.items():

            def compute(us: list[int], task=task) -> dict[int, tuple]:
                out = {}
                for s in range(0, len(us), ecfg.batch_size):
                    batch = us[s : s + ecfg.batch_size]
                    cols = top_candidates(task, batch, embedding(task, np.asarray(batch)), ecfg.rerank_top_n)
                    for u, c, lik in zip(batch, cols, scorer.likelihoods(task, batch, cols)):
                        out[u] = (c, lik)
                return out

            rescored[d] = _spread(len(task.users), compute, lambda task=task: scorer.lockstep(task))
            seqs, _ = scorer.items(task)
            cost[d] = [
                sum(len(scorer.prompt(task, u)) + len(seqs[c]) - 1 for c in cols)
                for u, (cols, _) in enumerate(rescored[d])
            ]
        fns["llm-reranked"] = rerank_score_fn(embedding, rescored)
        pooled = [t for v in cost.values() for t in v]
        models["llm-reranked"] = {
            "folder": str(hf_dir),
            "top_n": ecfg.rerank_top_n,
            "retrieval": f"llm-pretrained embeddings ({ecfg.pooling} pooling)",
            "duplicate_texts": duplicates,
            "cost": {
                d: {"users": len(v), "likelihood_forward_tokens_per_user": _mean(v)}
                for d, v in {**cost, "overall": pooled}.items()
            },
        }
    side.release(model)
    return fns, models
