"""`cprec prepare`: raw logs -> tokenized WebDataset shards + manifest + eval inputs.

Pipeline: read (``readers``) -> clean (``clean``) -> hold out targets (``split``) -> tokenizer
(trained on the rendered corpus, or a local HF folder) -> item texts cut to the token budget ->
eval inputs -> document specs -> render + tokenize in workers (``documents``) -> shards
(``shards``) -> manifest. Everything is written into a temporary sibling folder that replaces
``data.output_dir`` only when complete, so a killed run leaves the old output (or none).

``data.engine=local`` (the default) runs all of it in this process (tokenization in
``data.num_workers`` processes); ``data.engine=ray`` partitions the users into bucket files and
runs clean -> split -> specs -> tokenize -> shards per bucket as Ray tasks
(``cprec.prepare.distributed``), with the same documents and counts. The helpers below that both
paths share (catalogue, tokenizer corpus and training, encoder state, shard writing, manifest) live
here.

A content hash of the source files, the data config and the pipeline version is stored in the
manifest; a re-run with the same hash and intact shards returns at once ("cache hit").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cprec import atomic
from cprec.config import Config, DataConfig, save_config
from cprec.manifest import FORMAT_VERSION, read_manifest, shards_intact, stream_key, write_manifest
from cprec.prepare import readers
from cprec.prepare.clean import clean
from cprec.prepare.documents import EncoderState, build_specs, corpus_pick, encode_all
from cprec.prepare.prompts import PromptRenderer, truncate_to_budget
from cprec.prepare.schema import Dataset, IssueLog, Item
from cprec.prepare.shards import ShardWriter, file_sha256
from cprec.prepare.split import split, train_sequences_table

log = logging.getLogger(__name__)

# Bump when the same inputs + config would give different output bytes (invalidates caches).
# 2: items with text but no events are in the catalogue; 3: the tokenizer corpus's sequences are a
# seeded bottom-k sample by spec key (the same in the distributed path), not the first specs.
PIPELINE_VERSION = 3
# Fields that do not change the output, so they stay out of the content hash.
_HASH_EXCLUDED = ("output_dir", "num_workers", "cache_dir", "strict", "ray_address", "bucket_retries")
_TOKENIZER_FILES = (".json", ".model", ".txt", ".tiktoken")


# ------------------------------------------------------------------------------ content hash
def content_hash(cfg: DataConfig, sources: list[dict]) -> str:
    """Hash of what determines the output: source bytes, data config, tokenizer files, versions."""
    import sentencepiece
    import tokenizers

    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _HASH_EXCLUDED}
    blob = {
        "pipeline": PIPELINE_VERSION,
        "format": FORMAT_VERSION,
        "config": conf,
        "sources": [(Path(s["path"]).name, s["sha256"]) for s in sources],
        "versions": [sentencepiece.__version__, tokenizers.__version__],
    }
    if cfg.tokenizer.path:
        blob["tokenizer_files"] = _folder_hash(Path(cfg.tokenizer.path).expanduser())
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _folder_hash(folder: Path) -> str:
    """Hash of a tokenizer folder's vocabulary/config files (weights and the like are skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data.tokenizer.path: tokenizer folder not found: {folder}")
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.endswith(_TOKENIZER_FILES):
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def describe_sources(paths: list[Path]) -> list[dict]:
    out = []
    for p in tqdm(paths, desc="hash sources", disable=None, leave=False):
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
        out.append({"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size})
    return out


def cached(out: Path, chash: str) -> dict | None:
    """The manifest of ``out`` if it was made from the same content hash and is complete."""
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    if manifest.get("content_hash") != chash or not shards_intact(out, manifest):
        return None
    needed = ["eval/items.parquet", "eval/users.parquet", "eval/train_sequences.parquet", "config.yaml"]
    if not all((out / p).is_file() for p in needed) or not (out / "tokenizer").is_dir():
        return None
    return manifest


# --------------------------------------------------------------------------------- pipeline
def run(cfg: Config) -> Path:
    """Prepare ``cfg.data`` into ``cfg.data.output_dir`` (or reuse it); returns the folder."""
    from cprec.model.bases import resolve_config

    t0 = time.perf_counter()
    cfg = resolve_config(cfg)  # a named base's tokenizer: fetched and converted on first use
    dcfg = cfg.data
    out = Path(dcfg.output_dir).expanduser()
    sources = describe_sources(readers.source_files(dcfg))
    chash = content_hash(dcfg, sources)
    if cached(out, chash) is not None:
        log.info("cache hit: %s already holds this content (hash %s…); reusing it", out, chash[:12])
        return out
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ValueError(
            f"data.output_dir {out} exists, is not empty and holds no manifest.json: refusing to replace it"
        )
    with atomic.atomic_path(out) as tmp:  # the old output is removed only after the swap
        tmp.mkdir()
        manifest = _prepare_into(tmp, cfg, sources, chash)
    _log_summary(manifest, out, time.perf_counter() - t0)
    return out


def _prepare_into(tmp: Path, cfg: Config, sources: list[dict], chash: str) -> dict:
    if cfg.data.engine == "ray":
        from cprec.prepare import distributed

        return distributed.prepare_into(tmp, cfg, sources, chash)
    dcfg = cfg.data
    clock = _Clock()
    issues = IssueLog(dcfg.strict)
    ds = readers.read_source(dcfg, issues)
    clock.lap("read")
    inter = clean(ds, dcfg, issues)
    held = split(inter, ds.presplit, dcfg.same_time_history)
    clock.lap("clean+split")
    issues.log_summary()
    counts = reconcile_counts(ds.interactions_in, held.counts, issues)

    used = np.unique(inter.item)
    catalogue = catalogue_of(ds, inter.items, used)
    renderer = PromptRenderer(dcfg.prompt, dcfg.prompt.domain_names)
    item_ids, item_index, raw = item_tables(catalogue, inter.items, renderer)
    specs = build_specs(held.train, item_index, dcfg.kinds, dcfg.mixed_min_domains, dcfg.seed)
    clock.lap("specs")

    picks = lambda: corpus_pick(specs, dcfg.seed)  # noqa: E731 - only needed to train a tokenizer
    tok, tok_info = make_tokenizer(tmp / "tokenizer", dcfg, raw, picks, renderer)
    clock.lap("tokenizer")
    state = encoder_state(tmp / "tokenizer", tok, tok_info, raw, frames_needed(specs), renderer, dcfg)
    clock.lap("item texts")

    (tmp / "eval").mkdir()
    write_items_file(tmp / "eval", catalogue, item_ids, state.texts["domain"])
    pq.write_table(held.eval_table(), tmp / "eval" / "users.parquet")
    pq.write_table(train_sequences_table(held.train), tmp / "eval" / "train_sequences.parquet")
    clock.lap("eval files")
    shards, streams, n_cut = write_shards(tmp, specs, state, dcfg, num_workers=dcfg.num_workers)
    clock.lap("tokenize+shards")
    save_config(cfg, tmp / "config.yaml")
    manifest = build_manifest(
        dcfg,
        chash,
        sources,
        tok_info,
        catalogue,
        with_events={inter.items[c] for c in used.tolist()},
        issues=issues,
        counts=counts,
        streams=streams,
        shards=[s.manifest_entry() for s in shards],
        documents={"specs": len(specs), "samples": sum(s.samples for s in shards), "cut_to_fit": n_cut},
    )
    write_manifest(tmp, manifest)
    log.info("stage times: %s", clock)
    return manifest


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
):
    """Encode the specs (``num_workers`` processes) and stream the samples into shards, in spec
    order. Returns (shards, streams, documents cut to fit)."""
    writer = ShardWriter(root, dcfg.shard_max_bytes, prefix=shard_prefix)
    streams: dict[str, dict[str, int]] = {}
    n_cut, key = 0, 0
    bar = tqdm(total=len(specs), desc="tokenize + write", unit=" seq", disable=None, leave=False)
    chunks = encode_all(specs, state, num_workers)
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


def _log_summary(manifest: dict, out: Path, seconds: float) -> None:
    c = manifest["counts"]
    log.info(
        "prepared %s in %.1fs: %d interactions in -> train %d, valid %d, test %d, dropped %s",
        out,
        seconds,
        c["interactions_in"],
        c["train"],
        c["valid"],
        c["test"],
        c["dropped"] or "none",
    )
    log.info("%-16s %12s %14s", "stream", "sequences", "tokens")
    for name, s in manifest["streams"].items():
        log.info("%-16s %12d %14d", name, s["sequences"], s["tokens"])
    shards = manifest["shards"]
    log.info(
        "%d shards, %d samples, tokenizer %s (vocab %d)",
        len(shards),
        sum(s["samples"] for s in shards),
        manifest["tokenizer"]["hash"],
        manifest["tokenizer"]["vocab_size"],
    )
