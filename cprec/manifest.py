"""The prepared folder's contract between ``cprec.prepare`` (writer) and its readers.

``cprec prepare`` writes ``<prepared>/manifest.json`` next to ``shards/shard-NNNNNN.tar``; the stream
(``cprec.stream``), the trainer and the evaluation read it, all through ``read_manifest`` here, so
the format is checked in one place. What it holds: ``format_version``, ``pipeline_version``,
``content_hash``, ``config`` (the data section), ``sources``, ``tokenizer`` (hash, vocab_size, special
ids), ``domains``, ``streams`` (``"<domain>/<kind>"`` -> sequences, tokens), ``shards`` (path,
samples, tokens, sha256, bytes), ``counts``, ``items``, ``documents``, and with ``data.engine=ray``
``buckets`` (count, non-empty).

A shard is a ustar tar of 512-byte blocks; each sample is ``<key>.ids.npy`` (int32 token ids) and
``<key>.json`` (user, domain, kind, n_tokens, window). A document's stream is ``stream_key``.
This module imports nothing from the rest of ``cprec``, so every part can depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TAR_BLOCK = 512
"""Bytes per tar block: headers and member data are padded to whole blocks."""
TAR_RECORD = 20 * TAR_BLOCK
"""Bytes per tar record: an archive is padded to whole records (``tarfile.RECORDSIZE``)."""


def stream_key(meta: dict) -> str:
    """The stream a sample belongs to, ``"<domain>/<kind>"``, from its json meta."""
    return f"{meta['domain']}/{meta['kind']}"


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json`` into ``folder`` atomically (the last file of a prepared folder)."""
    from cprec.atomic import write_text

    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    return write_text(Path(folder) / "manifest.json", text)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a prepared folder (plain JSON), with a clear error when absent."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: run `cprec prepare` first")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    return manifest


def shards_intact(folder: str | Path, manifest: dict) -> bool:
    """All shards listed exist with their recorded sizes (cheap check; no re-hashing)."""
    root = Path(folder)
    for s in manifest.get("shards", []):
        p = root / s["path"]
        if not p.is_file() or ("bytes" in s and p.stat().st_size != s["bytes"]):
            return False
    return True
