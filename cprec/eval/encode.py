"""Turn items and users into embeddings with a causal LM.

Prompts (token ids, built by ``PromptBuilder`` from the prepared folder's tokenizer and the
``data.prompt`` templates the pre-training text used, rendered by the same ``PromptRenderer``):
- item:  BOS + tokens of items.parquet ``text`` (the item rendered by ``prompt.item`` and already
  cut to ``prompt.item_token_budget`` tokens by `cprec prepare`);
- user:  BOS + tokens of ``prompt.mixed_seq`` over the user's last ``eval.max_history_items`` history
  items (all domains, time order), each rendered by ``prompt.item_in_mixed`` (``{domain}`` through
  ``prompt.domain_names``, ``{title}``, ``{item}``; ``{fields}`` is empty and other item fields are
  unavailable because items.parquet keeps only title and text) and cut to the item token budget
  like pre-training items, joined by ``prompt.item_sep``. This is the all-domain mixed text the
  model was pre-trained on (without the EOS), so the last position summarises the whole history.
Prompts longer than the model's positions keep BOS and the most recent tokens.

Pooling (``eval.pooling``): ``last`` = final hidden state at the last non-pad token, ``mean`` = mean
of final hidden states over non-pad tokens. Embeddings are L2-normalised, so the dot product used
for scoring and fine-tuning is the cosine similarity. Batches are right-padded (a causal model's
real tokens never attend to the padding after them, so padding does not change any embedding) and
sorted by length to waste little compute.

Item embeddings are cached under ``<eval.output_dir>/cache/`` keyed by hash(checkpoint identity,
catalogue content, prompt config, pooling): re-evaluating the same checkpoint skips item encoding.
When torch.distributed is initialised each rank encodes a slice and the slices are all-gathered
(tensor collectives), or, for the streaming full ranking (`cprec.eval.topk`), each rank encodes
and keeps only its contiguous slice of a domain's items (`encode_item_shard`, cached per slice).
The model is an HF causal LM whole on every rank, or (``eval.zero3_inference``) a
`cprec.eval.zero3.PartitionedLM`, ZeRO-3 partitioned over the ranks: its passes gather parameters,
so every encoding call then runs the same number of passes on every rank (`Encoder`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

from cprec.atomic import atomic_path
from cprec.config import PromptConfig
from cprec.eval.inputs import Catalogue
from cprec.eval.zero3 import PartitionedLM, agree_max

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ prompts
class PromptBuilder:
    """Token ids of item and user prompts (see the module docstring for the exact format).

    Rendering, cutting and encoding go through the same code as the pre-training documents
    (``cprec.prepare.prompts.PromptRenderer``, ``truncate_to_budget``, ``cprec.prepare.tokenize.text_codec``),
    so a user prompt has the ids a pre-training document with that history would have had.
    """

    def __init__(self, tokenizer, prompt: PromptConfig, max_history_items: int, max_len: int = 0):
        from cprec.prepare.prompts import PromptRenderer
        from cprec.prepare.tokenize import special_ids, text_codec

        self.prompt = prompt
        self.max_history_items = max_history_items
        self.max_len = max_len
        self.renderer = PromptRenderer(prompt, prompt.domain_names)
        self._encode, self._decode = text_codec(tokenizer.name_or_path, tokenizer)
        ids = special_ids(tokenizer)
        self.bos = [ids["bos_id"]]
        self.pad_id = ids["pad_id"]
        self._mixed_cache: dict[int, str] = {}
        self.unknown_history_items = 0
        """History item ids missing from the catalogue (left out of the prompt, counted)."""

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(i) for i in self._encode(list(texts))] if texts else []

    def _finish(self, ids: list[int], max_len: int | None = None) -> list[int]:
        max_len = self.max_len if max_len is None else max_len
        ids = self.bos + list(ids)
        if max_len and len(ids) > max_len:
            ids = self.bos + ids[len(ids) - (max_len - len(self.bos)) :]
        return ids

    def item_ids(self, texts: list[str]) -> list[list[int]]:
        """BOS + item text tokens, cut to the budget (items.parquet text is already cut)."""
        budget = self.prompt.item_token_budget
        return [self._finish(i[:budget]) for i in self._ids(texts)]

    def _mixed_items(self, catalogue: Catalogue, rows: list[int]) -> list[str]:
        from cprec.prepare.prompts import truncate_to_budget
        from cprec.prepare.schema import Item

        todo = sorted({r for r in rows if r not in self._mixed_cache})
        if todo:
            budget = self.prompt.item_token_budget
            rendered = [
                self.renderer.item(
                    Item(catalogue.items[r], catalogue.domains[r], catalogue.titles[r]), mixed=True
                )
                for r in todo
            ]
            for r, text, ids in zip(todo, rendered, self._ids(rendered)):
                if len(ids) > budget:
                    text, _ = truncate_to_budget(text, lambda t: self._ids([t])[0], self._decode, budget)
                self._mixed_cache[r] = text
        return [self._mixed_cache[r] for r in rows]

    def user_texts(self, catalogue: Catalogue, histories: list[list[str]]) -> list[str]:
        """The mixed-sequence text of each history (last ``max_history_items`` known items)."""
        out = []
        for hist in histories:
            rows = self.history_rows(catalogue, hist)
            out.append(self.renderer.sequence("mixed", "all", self._mixed_items(catalogue, rows)))
        return out

    def history_rows(self, catalogue: Catalogue, history: list[str]) -> list[int]:
        """Catalogue rows of the last ``max_history_items`` known items of a history (unknown ones
        are counted in ``unknown_history_items``)."""
        rows = [catalogue.index.get(i) for i in history]
        self.unknown_history_items += sum(r is None for r in rows)
        return [r for r in rows if r is not None][-self.max_history_items :]

    def user_ids(
        self, catalogue: Catalogue, histories: list[list[str]], segmented: bool = False
    ) -> list[list[int]]:
        """BOS + tokens of the mixed-sequence prompt of each history; ``segmented``: the prompt of
        `sequence_ids` with the trailing separator (what all-position fine-tuning trains on)."""
        if not segmented:
            return [self._finish(i) for i in self._ids(self.user_texts(catalogue, histories))]
        return [
            self._finish(self.sequence_ids(catalogue, self.history_rows(catalogue, h), trailing=True)[0][1:])
            for h in histories
        ]

    def sequence_ids(
        self, catalogue: Catalogue, rows: list[int], trailing: bool = False
    ) -> tuple[list[int], list[int]]:
        """(BOS + tokens of the mixed sequence over catalogue ``rows``, index of the token that
        ends each item).

        The text is the mixed-sequence prompt; it is tokenized in segments cut just before the
        whitespace of each separator (``"... Heat (1995);"``, ``" [Drama] Toy Story;"``), so each
        item ends on a token boundary: the state there has read that item and the separator's
        punctuation and nothing of the next item. Word-splitting tokenizers (sentencepiece BPE,
        byte-level BPE) never merge across that whitespace, so the ids equal the whole text's (a
        test checks both tokenizers). ``trailing`` ends the last item with the separator as well.
        """
        if not rows:
            return list(self.bos), []
        sep = self.prompt.item_sep
        head = sep.rstrip()
        tail = sep[len(head) :]
        prefix, _ = self.renderer.frame("mixed", "all")
        texts = self._mixed_items(catalogue, rows)
        segs = []
        for t, text in enumerate(texts):
            end = head if (t < len(texts) - 1 or trailing) else ""
            segs.append((prefix if t == 0 else tail) + text + end)
        ids, ends = list(self.bos), []
        for seg_ids in self._ids(segs):
            ids += seg_ids
            ends.append(len(ids) - 1)
        return ids, ends

    # Generative retrieval (cprec.eval.generative): the prompt stops where the next item's text
    # would be written, and each candidate's text is what the model would write there.
    def next_item_prompt_ids(self, catalogue: Catalogue, history: list[str], max_len: int) -> list[int]:
        """BOS + tokens of the mixed sequence up to the end of the last history item (the frame's
        text after ``{items}`` left out), cut to ``max_len`` keeping BOS and the most recent
        tokens; [] when no history item is known."""
        rows = self.history_rows(catalogue, history)
        if not rows:
            return []
        prefix, _ = self.renderer.frame("mixed", "all")
        text = prefix + self.prompt.item_sep.join(self._mixed_items(catalogue, rows))
        return self._finish(self._ids([text])[0], max_len)

    def next_item_ids(self, catalogue: Catalogue, rows: list[int], terminator: int) -> list[list[int]]:
        """Per catalogue row: tokens of ``item_sep`` + the item as rendered in a mixed sequence (cut
        to the item token budget), tokenized on their own (so every user shares them), then
        ``terminator`` (so an item whose tokens begin another's stays a distinct sequence)."""
        texts = [self.prompt.item_sep + t for t in self._mixed_items(catalogue, rows)]
        return [ids + [terminator] for ids in self._ids(texts)]


def load_tokenizer(prepared_dir: str | Path):
    """The prepared folder's ``tokenizer/`` (an HF tokenizer folder)."""
    from cprec.prepare.tokenize import load_tokenizer as load

    folder = Path(prepared_dir) / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder} (run `cprec prepare` first)")
    return load(folder)


def default_device() -> torch.device:
    """This rank's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 then runs 2-10x faster
    than fp32; without those instructions bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``eval.dtype`` -> torch dtype: ``auto`` is bf16 on GPUs and on CPUs with native bf16."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    device = device or default_device()
    fast = device.type == "cuda" or cpu_has_fast_bf16()
    return torch.bfloat16 if fast else torch.float32


def load_model(folder: str | Path, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """An HF causal LM from a local folder; default dtype bf16 on GPU, fp32 on CPU.

    Fine-tuning passes fp32 (master weights; the forward runs under bf16 autocast on GPU).
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device)


# ------------------------------------------------------------------------------------ pooling
def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` (int64 [B, L])."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot encode an empty prompt")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, H] hidden states -> [B, H]: last non-pad token (right padding) or masked mean."""
    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    raise ValueError(f"unknown pooling {pooling!r} (last or mean)")


def embed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """L2-normalised pooled final hidden states of an HF causal LM (keeps the autograd graph) or of a
    `cprec.eval.zero3.PartitionedLM` (its own decoder pass)."""
    base = getattr(model, "base_model", model)
    if isinstance(model, PartitionedLM):
        hidden = model.hidden(input_ids, attention_mask)
    elif base is model:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        hidden = out.hidden_states[-1]
    else:
        # The decoder alone: skips the vocabulary projection, the costliest layer of a small model.
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return torch.nn.functional.normalize(pool(hidden, attention_mask, pooling).float(), dim=-1)


class EncodeProgress:
    """Progress of one encoding pass, on rank 0 only: a tqdm bar on a terminal (``disable=None``, as
    elsewhere) and, because job logs are not terminals and a catalogue can take minutes, an INFO
    line at the start, at the end and at every tenth of the way that comes ``MIN_INTERVAL_S`` or
    more after the last line (``items (A): 3840/38396 prompts (10%)``): a pass of a few seconds
    logs two lines, a long one a line per tenth."""

    STEPS = 10
    MIN_INTERVAL_S = 10.0

    def __init__(self, total: int, desc: str):
        rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
        self.active = rank == 0 and total > 0
        self.total, self.desc, self.done, self._next = total, desc, 0, 1
        self._last = time.monotonic()
        self.bar = tqdm(
            total=total, desc=desc, unit="prompt", disable=None if self.active else True, leave=False
        )
        if self.active:
            log.info("%s: encoding %d prompts", desc, total)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.active and self.done * self.STEPS >= self._next * self.total:
            self._next = self.done * self.STEPS // self.total + 1
            now = time.monotonic()
            if self.done >= self.total or now - self._last >= self.MIN_INTERVAL_S:
                pct = 100 * self.done // self.total
                log.info("%s: %d/%d prompts (%d%%)", self.desc, self.done, self.total, pct)
                self._last = now

    def close(self) -> None:
        self.bar.close()


class Encoder:
    """Batched, length-sorted, no-grad encoding of token id lists into embeddings (float32, CPU).

    With a ZeRO-3 partitioned model (`cprec.eval.zero3`, ``eval.zero3_inference``) on N ranks, every
    encoding call is collective: the ranks agree on the largest batch count (one ``all_reduce``) and
    a rank with fewer batches runs 1-token padding passes, since each pass gathers parameters. A
    rank with nothing to encode then still calls `join`."""

    def __init__(self, model, pad_id: int, pooling: str = "last", batch_size: int = 64):
        self.model = model
        self.pad_id = pad_id
        self.pooling = pooling
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _encode_local(self, seqs: list[list[int]], desc: str) -> torch.Tensor:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: torch.Tensor | None = None
        was_training = self.model.training
        self.model.eval()
        progress = EncodeProgress(len(seqs), desc)
        n_batches = -(-len(order) // self.batch_size)
        passes = agree_max(self.model, n_batches)  # n_batches itself unless in ZeRO-3 lockstep
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], self.pad_id)
            e = embed(self.model, ids.to(self.device), mask.to(self.device), self.pooling).cpu()
            if out is None:
                out = torch.empty((len(seqs), e.shape[1]), dtype=torch.float32)
            out[torch.tensor(idx)] = e
            progress.update(len(idx))
        for _ in range(passes - n_batches):
            self.model.pad_hidden()
        progress.close()
        self.model.train(was_training)
        if out is None:
            out = torch.empty((0, self._hidden_size()), dtype=torch.float32)
        return out

    def _hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, seqs: list[list[int]], desc: str = "encode") -> torch.Tensor:
        """Embeddings [N, H]; under torch.distributed each rank encodes every world-th prompt and
        every rank gets them all (one tensor ``all_gather``, no pickling)."""
        if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return self._encode_local(seqs, desc)
        rank, world = tdist.get_rank(), tdist.get_world_size()
        local = self._encode_local(seqs[rank::world], f"{desc} [rank {rank}]")
        from cprec.eval.topk import all_gather_cat

        width = -(-len(seqs) // world)  # rank r holds prompts r, r + world, ...: at most this many
        padded = torch.zeros((width, local.shape[1]), dtype=torch.float32)
        padded[: len(local)] = local
        parts = all_gather_cat(padded, 0).view(world, width, -1)
        out = torch.empty((len(seqs), local.shape[1]), dtype=torch.float32)
        for r in range(world):
            out[r::world] = parts[r, : len(range(r, len(seqs), world))]
        return out

    def encode_local(self, seqs: list[list[int]], desc: str = "encode") -> torch.Tensor:
        """Embeddings [N, H] of this rank's prompts alone (no collective, except the lockstep of a
        ZeRO-3 model)."""
        return self._encode_local(seqs, desc)

    @torch.no_grad()
    def join(self) -> None:
        """Take part in the other ranks' `encode_local` without prompts of this rank's own (a cache
        hit): the padding passes of a ZeRO-3 model in lockstep; nothing for any other model."""
        if getattr(self.model, "needs_lockstep", False):
            for _ in range(agree_max(self.model, 0)):
                self.model.pad_hidden()


# -------------------------------------------------------------------------------------- cache
def checkpoint_identity(folder: str | Path) -> str:
    """Cheap identity of a model folder: hash of (name, size, mtime) of every file in it.

    Hashing multi-GB weights on every eval would cost minutes; a re-saved or changed checkpoint
    gets a new mtime, so it cannot hit a stale cache entry.
    """
    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class ItemEmbeddingCache:
    """Item embeddings saved as ``<folder>/items-<key>.pt`` (tensor + item ids + key parts)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_id: str, catalogue_hash: str, prompt: PromptConfig, pooling: str) -> str:
        blob = json.dumps(
            {"model": model_id, "catalogue": catalogue_hash, "prompt": asdict(prompt), "pooling": pooling},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, key: str) -> Path:
        return self.folder / f"items-{key}.pt"

    def load(self, key: str, items: list[str]) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        blob = torch.load(p, map_location="cpu", weights_only=True)
        if blob["items"] != items:  # a hash collision or a hand-edited file: never trust it
            log.warning("item cache %s holds other items; re-encoding", p)
            self.misses += 1
            return None
        self.hits += 1
        return blob["embeddings"]

    def save(self, key: str, items: list[str], embeddings: torch.Tensor) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        with atomic_path(p) as tmp:
            torch.save({"items": list(items), "embeddings": embeddings.contiguous()}, tmp)
        return p


def _items_key(encoder, builder, catalogue, rows, cache, model_id) -> str | None:
    """The cache key of the embeddings of catalogue ``rows`` (None: no cache, or no model id)."""
    if cache is None or not model_id:
        return None
    return cache.key(model_id, catalogue.subset_hash(rows), builder.prompt, encoder.pooling)


def encode_items(
    encoder: Encoder,
    builder: PromptBuilder,
    catalogue: Catalogue,
    rows: list[int],
    cache: ItemEmbeddingCache | None = None,
    model_id: str = "",
    desc: str = "items",
) -> torch.Tensor:
    """Embeddings [len(rows), H] of catalogue rows, from the cache when the key matches."""
    items = [catalogue.items[r] for r in rows]
    key = _items_key(encoder, builder, catalogue, rows, cache, model_id)
    if key is not None:
        hit = cache.load(key, items)
        if agree_max(encoder.model, int(hit is None)):  # ZeRO-3 lockstep: one rank's miss is all's
            hit = None
        if hit is not None:
            log.info("item embeddings: cache hit %s (%d items)", cache.path(key).name, len(items))
            return hit
    emb = encoder.encode(builder.item_ids([catalogue.texts[r] for r in rows]), desc=desc)
    if key is not None and (not tdist.is_initialized() or tdist.get_rank() == 0):
        cache.save(key, items, emb)
    return emb


def encode_item_shard(
    encoder: Encoder,
    builder: PromptBuilder,
    catalogue: Catalogue,
    rows: list[int],
    cache: ItemEmbeddingCache | None = None,
    model_id: str = "",
    desc: str = "items",
):
    """This rank's contiguous slice (`cprec.eval.topk.shard_range`) of the embeddings of catalogue
    ``rows``, as a `cprec.eval.topk.ItemShard`: each rank encodes and caches only its slice (the
    cache entry names the slice: ``items-<key>-<rank>of<world>.pt``). One process: all of them."""
    from cprec.eval.topk import ItemShard, dist_world, shard_range

    rank, world = dist_world()
    if world == 1:
        return ItemShard.of(encode_items(encoder, builder, catalogue, rows, cache, model_id, desc))
    start, end = shard_range(len(rows), rank, world)
    mine = rows[start:end]
    items = [catalogue.items[r] for r in mine]
    key = _items_key(encoder, builder, catalogue, rows, cache, model_id)
    if key is not None:
        key = f"{key}-{rank}of{world}"
        hit = cache.load(key, items)
        if hit is not None:
            encoder.join()  # ZeRO-3 lockstep: pad while ranks that missed encode their slices
            return ItemShard(hit, start, len(rows), spread=True)
    emb = encoder.encode_local(builder.item_ids([catalogue.texts[r] for r in mine]), f"{desc} [rank {rank}]")
    if key is not None:
        cache.save(key, items, emb)
    return ItemShard(emb, start, len(rows), spread=True)


def encode_users(
    encoder: Encoder,
    builder: PromptBuilder,
    catalogue: Catalogue,
    histories: list[list[str]],
    desc: str = "users",
    segmented: bool = False,
) -> torch.Tensor:
    """Embeddings [len(histories), H] of user history prompts (`PromptBuilder.user_ids`)."""
    return encoder.encode(builder.user_ids(catalogue, histories, segmented), desc=desc)
