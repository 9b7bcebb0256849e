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
import pyarrow.parquet as pq
from tqdm import tqdm

from cprec import atomic
from cprec.config import Config, DataConfig, save_config
from cprec.manifest import FORMAT_VERSION, read_manifest, shards_intact, write_manifest
from cprec.prepare import readers
from cprec.prepare.clean import clean
from cprec.prepare.documents import build_specs, corpus_pick
from cprec.prepare.prompts import PromptRenderer
from cprec.prepare.schema import IssueLog
from cprec.prepare.shards import file_sha256
from cprec.prepare.split import split, train_sequences_table
from cprec.prepare.stages import (
    PIPELINE_VERSION,
    _Clock,
    build_manifest,
    catalogue_of,
    encoder_state,
    frames_needed,
    item_tables,
    make_tokenizer,
    reconcile_counts,
    write_items_file,
    write_shards,
)

log = logging.getLogger(__name__)

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
