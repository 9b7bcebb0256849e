"""Pre-training documents: which behaviour sequences exist, and rendering + tokenizing them.

A *document spec* is one behaviour sequence: (user, domain, kind, item indices). ``kind`` is
``domain`` (one user's pre-training items of one domain) or ``mixed`` (all of the user's
pre-training items across domains, domain ``"all"``). Specs are shuffled with the seed, cut into
fixed-size chunks and encoded in worker processes; results come back in chunk order, so the
output does not depend on the number of workers.

Each document is tokenized from its full rendered text (``[bos] + encode(text) + [eos]``), so the
ids equal what the tokenizer gives for that text at evaluation time. Windows are planned from
per-item token counts (items are tokenized once) and then checked against the exact length; a
window that comes out longer than ``max_doc_tokens`` is re-planned with one item fewer.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from cprec.prepare.prompts import plan_windows
from cprec.prepare.schema import Interactions

log = logging.getLogger(__name__)

Spec = tuple[str, str, str, np.ndarray]  # user, domain ("all" for mixed), kind, item indices
Sample = tuple[dict, np.ndarray]  # json meta, int32 ids
CHUNK_DOCS = 128
CORPUS_SEQUENCES = 20000  # sequence lines (besides item lines) offered to tokenizer training
CORPUS_ITEMS_PER_SEQ = 32
CorpusPick = tuple[tuple[int, str, str, str], np.ndarray]  # (sample key, user, domain, kind), items


def build_specs(
    train: Interactions,
    item_index: np.ndarray,
    kinds: list[str],
    mixed_min_domains: int,
    seed: int | tuple[int, ...],
) -> list[Spec]:
    """Document specs from pre-training events (grouped by user, time order), shuffled by ``seed``
    (a ``numpy.random.default_rng`` seed: the distributed path seeds each bucket with (seed, bucket)).

    ``item_index`` maps an item code of ``train`` to its row in the item tables.
    """
    n = len(train)
    specs: list[Spec] = []
    if n == 0:
        return specs
    starts = np.flatnonzero(np.r_[True, train.user[1:] != train.user[:-1]])
    bounds = np.r_[starts, n]
    domain_order = sorted(range(len(train.domains)), key=lambda d: train.domains[d])
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        user = train.users[train.user[s]]
        items = item_index[train.item[s:e]].astype(np.int32)
        doms = train.domain[s:e]
        present = np.unique(doms)
        if "domain" in kinds:
            for d in domain_order:
                if d in present:
                    specs.append((user, train.domains[d], "domain", items[doms == d]))
        if "mixed" in kinds and len(present) >= mixed_min_domains:
            specs.append((user, "all", "mixed", items))
    perm = np.random.default_rng(seed).permutation(len(specs))
    return [specs[i] for i in perm]


def corpus_key(seed: int, user: str, domain: str, kind: str) -> int:
    """A seeded 64-bit hash of a document spec: the tokenizer corpus takes the specs with the
    smallest keys. A function of the spec alone, so any set of whole users (a bucket) can offer
    its smallest ones and the merge of those is the sample of the whole log."""
    text = f"{seed}\x1f{user}\x1f{domain}\x1f{kind}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def corpus_pick(specs: Iterable[Spec], seed: int, k: int = CORPUS_SEQUENCES) -> list[CorpusPick]:
    """The ``k`` specs with the smallest ``corpus_key`` (a bottom-k sample, in key order), each
    with its first ``CORPUS_ITEMS_PER_SEQ`` items: the sequence part of the tokenizer corpus.
    Merging the picks of disjoint user sets with ``merge_corpus_picks`` gives the same list."""
    keyed = (
        ((corpus_key(seed, user, domain, kind), user, domain, kind), idx[:CORPUS_ITEMS_PER_SEQ])
        for user, domain, kind, idx in specs
    )
    return heapq.nsmallest(k, keyed, key=lambda p: p[0])


def merge_corpus_picks(picks: Iterable[list[CorpusPick]], k: int = CORPUS_SEQUENCES) -> list[CorpusPick]:
    """The global bottom-k of several ``corpus_pick`` results."""
    return heapq.nsmallest(k, (p for part in picks for p in part), key=lambda p: p[0])


@dataclass
class EncoderState:
    """Everything a worker needs to turn specs into samples (picklable)."""

    tokenizer_dir: str
    texts: dict[str, list[str]]  # kind -> rendered (truncated) item text per item index
    counts: dict[str, np.ndarray]  # kind -> token count per item index
    frames: dict[tuple[str, str], tuple[str, str, int]]  # (kind, domain) -> prefix, suffix, overhead
    sep: str
    sep_tokens: int
    max_tokens: int
    overlap: int
    bos_id: int
    eos_id: int


_STATE: EncoderState | None = None
_ENCODE = None


def _init_worker(state: EncoderState, threads: int) -> None:
    global _STATE, _ENCODE
    from cprec.prepare.tokenize import text_codec

    _STATE = state
    _ENCODE = text_codec(state.tokenizer_dir, threads=threads)[0]


def _render(st: EncoderState, kind: str, domain: str, idx: np.ndarray) -> str:
    prefix, suffix, _ = st.frames[(kind, domain)]
    texts = st.texts[kind]
    return prefix + st.sep.join(texts[i] for i in idx.tolist()) + suffix


def _finish(st: EncoderState, ids: list[int]) -> np.ndarray:
    out = np.empty(len(ids) + 2, dtype=np.int32)
    out[0], out[1:-1], out[-1] = st.bos_id, ids, st.eos_id
    return out


def _exact_windows(st: EncoderState, kind: str, domain: str, idx: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Windows checked one by one against the exact token count (slow path). Returns (docs, n_cut)."""
    counts = st.counts[kind][idx].tolist()
    overhead = st.frames[(kind, domain)][2]
    n, start, docs, cut = len(idx), 0, [], 0
    while start < n:
        _, end = plan_windows(counts[start:], overhead, st.sep_tokens, st.max_tokens, 0)[0]
        end += start
        while True:
            ids = _ENCODE([_render(st, kind, domain, idx[start:end])])[0]
            if len(ids) + 2 <= st.max_tokens or end == start + 1:
                break
            end -= 1
        if len(ids) + 2 > st.max_tokens:  # one item + template longer than a document: cut it
            ids, cut = ids[: st.max_tokens - 2], cut + 1
        docs.append(_finish(st, ids))
        if end >= n:
            break
        start = max(end - st.overlap, start + 1)
    return docs, cut


def encode_chunk(specs: list[Spec]) -> tuple[list[Sample], int]:
    """Render and tokenize a chunk of specs -> (samples in spec order, documents cut to fit)."""
    st = _STATE
    plans, texts = [], []
    for _user, domain, kind, idx in specs:
        overhead = st.frames[(kind, domain)][2]
        windows = plan_windows(
            st.counts[kind][idx].tolist(), overhead, st.sep_tokens, st.max_tokens, st.overlap
        )
        plans.append(windows)
        texts.extend(_render(st, kind, domain, idx[a:b]) for a, b in windows)
    encoded = _ENCODE(texts)  # one batch call for the whole chunk (fast path)
    samples: list[Sample] = []
    n_cut, k = 0, 0
    for (user, domain, kind, idx), windows in zip(specs, plans):
        ids_list = encoded[k : k + len(windows)]
        k += len(windows)
        if any(len(ids) + 2 > st.max_tokens for ids in ids_list):
            docs, cut = _exact_windows(st, kind, domain, idx)  # estimate was short: re-plan exactly
            n_cut += cut
        else:
            docs = [_finish(st, ids) for ids in ids_list]
        for w, doc in enumerate(docs):
            meta = {"user": user, "domain": domain, "kind": kind, "n_tokens": int(len(doc)), "window": w}
            samples.append((meta, doc))
    return samples, n_cut


def encode_all(
    specs: list[Spec], state: EncoderState, num_workers: int, threads: int = -1
) -> Iterator[tuple[list[Sample], int]]:
    """Encoded chunks in spec order; ``num_workers`` processes (0 = in this process, encoding with
    ``threads`` tokenizer threads, -1 = every core: a Ray task given one core passes 1). The
    tokenizers thread by themselves (sentencepiece and HF's Rust one use every core), so each
    of the ``num_workers`` processes gets its share of the cores instead, never more."""
    chunks = [specs[i : i + CHUNK_DOCS] for i in range(0, len(specs), CHUNK_DOCS)]
    if num_workers == 0 or len(chunks) <= 1:
        _init_worker(state, threads)
        for chunk in chunks:
            yield encode_chunk(chunk)
        return
    share = max(1, len(os.sched_getaffinity(0)) // num_workers)
    # fork is cheap (no re-import) and safe here: no threads have been started by tokenizers.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(state, share)) as pool:
        yield from pool.imap(encode_chunk, chunks, chunksize=1)
