"""The stage helpers both preparation engines share (`cprec.prepare.pipeline` runs them in one
process, `cprec.prepare.distributed` per bucket on Ray): counts, manifest, catalogue, tokenizer,
encoder state, item file, shards. Their own module so that neither engine imports the other's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cprec.config import DataConfig
from cprec.manifest import FORMAT_VERSION, stream_key
from cprec.prepare.documents import EncoderState, encode_all
from cprec.prepare.prompts import PromptRenderer, truncate_to_budget
from cprec.prepare.schema import Dataset, IssueLog, Item
from cprec.prepare.shards import ShardWriter

log = logging.getLogger(__name__)

# Bump when the same inputs + config would give different output bytes (invalidates caches).
# 2: items with text but no events are in the catalogue; 3: the tokenizer corpus's sequences are a
# seeded bottom-k sample by spec key (the same in the distributed path), not the first specs.
PIPELINE_VERSION = 3


def reconcile_counts(interactions_in: int, held_counts: dict, issues: IssueLog) -> dict:
    """The manifest's ``counts``; fails when they do not add up (a bug, never bad input) or when
    no pre-training event is left."""
    counts = {
        "interactions_in": interactions_in,
        **held_counts,
        "dropped": dict(sorted(issues.dropped.items())),
    }
    accounted = counts["train"] + counts["valid"] + counts["test"] + sum(counts["dropped"].values())
    if accounted != counts["interactions_in"]:  # every record is counted once
        raise RuntimeError(f"interaction counts do not reconcile: {counts}")
    if counts["train"] == 0:
        raise ValueError(
            f"no pre-training interactions left after cleaning ({counts}); check data.* settings"
        )
    return counts


def build_manifest(
    dcfg: DataConfig,
    chash: str,
    sources: list[dict],
    tok_info: dict,
    catalogue: dict[str, Item],
    with_events: set[str],
    issues: IssueLog,
    counts: dict,
    streams: dict,
    shards: list[dict],
    documents: dict,
) -> dict:
    """``manifest.json`` (format: ``cprec.manifest``); written last, once every shard is complete."""
    items_info = {
        "catalogue": len(catalogue),
        "without_events": sum(1 for i in catalogue if i not in with_events),
        **dict(sorted(issues.item_issues.items())),
    }
    return {
        "format_version": FORMAT_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "content_hash": chash,
        "config": dataclasses.asdict(dcfg),
        "sources": sources,
        "tokenizer": tok_info,
        "domains": sorted({it.domain for it in catalogue.values()}),
        "streams": dict(sorted(streams.items())),
        "shards": shards,
        "counts": counts,
        "items": items_info,
        "documents": documents,
    }


class _Clock:
    """Wall time per pipeline stage, for the log."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.t
        self.t = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.laps.items())


def catalogue_of(ds: Dataset, vocab: list[str], used: np.ndarray) -> dict[str, Item]:
    """Rankable items: the whole catalogue of closed sources; else the items of kept events (codes
    ``used`` into ``vocab``) and every item with text in a kept domain, events or not (cold items
    are where a text model can win; the readers keep item-file items whose domain is known). Items
    without text are only kept while they have events (their placeholder text says nothing)."""
    if ds.closed_catalogue:
        return dict(ds.items)
    used_items = {vocab[c] for c in used.tolist()}
    return {k: v for k, v in ds.items.items() if k in used_items or v.has_text}


def item_tables(
    catalogue: dict[str, Item], vocab: list[str], renderer: PromptRenderer
) -> tuple[list[str], np.ndarray, dict[str, list[str]]]:
    """(catalogue item ids in order, item code of ``vocab`` -> catalogue row (-1: not in it), the
    item texts per kind as rendered before the token budget)."""
    item_ids = list(catalogue)
    pos = {item: i for i, item in enumerate(item_ids)}
    item_index = np.array([pos.get(item, -1) for item in vocab], dtype=np.int64)
    raw = {
        "domain": [renderer.item(catalogue[i]) for i in item_ids],
        "mixed": [renderer.item(catalogue[i], mixed=True) for i in item_ids],
    }
    return item_ids, item_index, raw


def make_tokenizer(folder: Path, dcfg: DataConfig, raw: dict, picks, renderer: PromptRenderer):
    """Install the configured HF tokenizer, or train sentencepiece on the rendered corpus
    (``picks()``: the sequence sample, ``documents.corpus_pick``; asked for only when training)."""
    from cprec.prepare.tokenize import (
        install_tokenizer,
        load_tokenizer,
        special_ids,
        tokenizer_hash,
        train_sentencepiece,
    )

    if dcfg.tokenizer.path:
        tok = install_tokenizer(dcfg.tokenizer.path, folder)
    else:
        t = time.perf_counter()
        train_sentencepiece(corpus_lines(raw, picks(), renderer), folder, dcfg.tokenizer, dcfg.seed)
        tok = load_tokenizer(folder)
        log.info(
            "trained a %s sentencepiece tokenizer (%d pieces) in %.1fs",
            dcfg.tokenizer.model_type,
            len(tok),
            time.perf_counter() - t,
        )
    info = {"path": "tokenizer", "hash": tokenizer_hash(tok), "vocab_size": len(tok), **special_ids(tok)}
    return tok, info


def corpus_lines(raw: dict, picks: list, renderer: PromptRenderer) -> list[str]:
    """Tokenizer training text: every item text (both templates), then the sampled sequences
    (``documents.corpus_pick``: catalogue rows, in key order)."""
    lines = raw["domain"] + raw["mixed"]
    for (_key, _user, domain, kind), idx in picks:
        texts = raw[kind]
        lines.append(renderer.sequence(kind, domain, [texts[i] for i in idx.tolist()]))
    return lines


def frames_needed(specs: list) -> set[tuple[str, str]]:
    return {(s[2], s[1]) for s in specs}


def encoder_state(tok_dir, tok, tok_info, raw, frames_used, renderer, dcfg: DataConfig) -> EncoderState:
    """Item texts cut to the budget (tokenized once here), template frames and their costs."""
    from cprec.prepare.tokenize import text_codec

    encode, dec = text_codec(tok_dir, tok)
    enc1 = lambda s: encode([s])[0]  # noqa: E731
    budget = dcfg.prompt.item_token_budget
    texts, counts, n_trunc = {}, {}, 0
    for kind, values in raw.items():
        ids = encode(values)
        out_t, out_n = [], np.zeros(len(values), dtype=np.int64)
        for i, (text, tid) in enumerate(
            tqdm(list(zip(values, ids)), desc=f"items ({kind})", disable=None, leave=False)
        ):
            if len(tid) > budget:
                text, n = truncate_to_budget(text, enc1, dec, budget)
                n_trunc += 1
            else:
                n = len(tid)
            out_t.append(text)
            out_n[i] = n
        texts[kind], counts[kind] = out_t, out_n
    log.info("item texts: %d renderings cut to %d tokens", n_trunc, budget)
    frames = {}
    for kind, domain in sorted(frames_used):
        prefix, suffix = renderer.frame(kind, domain)
        overhead = len(enc1(prefix + suffix)) + 2
        if overhead + budget > dcfg.max_doc_tokens:
            raise ValueError(
                f"config field 'data.max_doc_tokens': {dcfg.max_doc_tokens} cannot hold the {kind} "
                f"template ({overhead} tokens with BOS/EOS) plus one item ({budget} tokens, "
                "data.prompt.item_token_budget)"
            )
        frames[(kind, domain)] = (prefix, suffix, overhead)
    return EncoderState(
        tokenizer_dir=str(tok_dir),
        texts=texts,
        counts=counts,
        frames=frames,
        sep=dcfg.prompt.item_sep,
        sep_tokens=len(enc1(dcfg.prompt.item_sep)),
        max_tokens=dcfg.max_doc_tokens,
        overlap=dcfg.window_overlap_items,
        bos_id=tok_info["bos_id"],
        eos_id=tok_info["eos_id"],
    )


def write_items_file(folder: Path, catalogue: dict[str, Item], item_ids: list[str], texts: list[str]) -> None:
    """``eval/items.parquet``: the catalogue with its rendered (budget-cut) text."""
    items = pa.table(
        {
            "item": pa.array(item_ids, pa.string()),
            "domain": pa.array([catalogue[i].domain for i in item_ids], pa.string()),
            "title": pa.array([catalogue[i].title for i in item_ids], pa.string()),
            "text": pa.array(texts, pa.string()),
        }
    )
    pq.write_table(items, folder / "items.parquet")


def write_shards(
    root: Path,
    specs: list,
    state: EncoderState,
    dcfg: DataConfig,
    num_workers: int,
    shard_prefix: str = "shard-",
    key_prefix: str = "",
    threads: int = -1,
):
    """Encode the specs (``num_workers`` processes, or this one with ``threads`` tokenizer
    threads: ``documents.encode_all``) and stream the samples into shards, in spec order.
    Returns (shards, streams, documents cut to fit)."""
    writer = ShardWriter(root, dcfg.shard_max_bytes, prefix=shard_prefix)
    streams: dict[str, dict[str, int]] = {}
    n_cut, key = 0, 0
    bar = tqdm(total=len(specs), desc="tokenize + write", unit=" seq", disable=None, leave=False)
    chunks = encode_all(specs, state, num_workers, threads)
    for samples, cut in chunks:
        n_cut += cut
        for meta, ids in samples:
            writer.write(f"{key_prefix}{key:09d}", ids, meta)
            key += 1
            s = streams.setdefault(stream_key(meta), {"sequences": 0, "tokens": 0})
            s["sequences"] += 1
            s["tokens"] += int(len(ids))
        bar.update(sum(1 for m, _ in samples if m["window"] == 0))
    bar.close()
    if n_cut:
        log.warning("%d documents were longer than data.max_doc_tokens even with one item: cut", n_cut)
    return writer.close(), dict(sorted(streams.items())), n_cut
