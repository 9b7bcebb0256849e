"""Writes small prepared folders for loader tests, following the shard-sample and manifest contracts.

Each document's tokens are ``[BOS, stream code, doc number (2 tokens), filler..., EOS]`` so a test can
tell documents apart from their tokens alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import webdataset as wds

BOS, EOS, PAD = 1, 2, 0
STREAMS = {"A/domain": (12, 30), "B/domain": (30, 60), "all/mixed": (6, 14)}
"""Default streams: (min, max) document length in tokens."""


def make_docs(counts: dict[str, int], lengths: dict[str, tuple[int, int]] | None = None, seed: int = 0):
    """``[(key, stream, tokens)]`` for ``counts[stream]`` documents per stream."""
    lengths = lengths or STREAMS
    rng = random.Random(seed)
    docs = []
    for code, stream in enumerate(sorted(counts)):
        lo, hi = lengths[stream]
        for i in range(counts[stream]):
            n = rng.randint(lo, hi)
            body = [10 + code, 100 + i // 1000, 100 + i % 1000] + [rng.randint(3, 999) for _ in range(n - 5)]
            key = f"{stream.replace('/', '_')}-{i:06d}"
            docs.append((key, stream, np.asarray([BOS, *body, EOS][:n], dtype=np.int32)))
    return docs


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_prepared(
    root: Path,
    counts: dict[str, int] | None = None,
    n_shards: int = 4,
    seed: int = 0,
    lengths: dict[str, tuple[int, int]] | None = None,
) -> dict:
    """Write ``root/manifest.json`` and ``root/shards/shard-%06d.tar``; return ``{key: tokens}`` and more."""
    counts = counts or {"A/domain": 40, "B/domain": 30, "all/mixed": 50}
    docs = make_docs(counts, lengths, seed)
    random.Random(seed + 1).shuffle(docs)  # like `cprec prepare`: streams interleaved across shards
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    per = -(-len(docs) // n_shards)
    for s in range(n_shards):
        part = docs[s * per : (s + 1) * per]
        rel = f"shards/shard-{s:06d}.tar"
        with wds.TarWriter(str(root / rel)) as w:
            for key, stream, tokens in part:
                domain, kind = stream.split("/")
                meta = {"user": key, "domain": domain, "kind": kind, "n_tokens": len(tokens), "window": 0}
                w.write({"__key__": key, "ids.npy": _npy(tokens), "json": json.dumps(meta).encode()})
        data = (root / rel).read_bytes()
        shards.append(
            {
                "path": rel,
                "samples": len(part),
                "tokens": int(sum(len(t) for _, _, t in part)),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    streams = {
        s: {
            "sequences": sum(1 for _, st, _ in docs if st == s),
            "tokens": int(sum(len(t) for _, st, t in docs if st == s)),
        }
        for s in sorted(counts)
    }
    manifest = {
        "format_version": 1,
        "content_hash": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16],
        "config": {},
        "sources": [],
        "tokenizer": {
            "path": "tokenizer",
            "hash": "x",
            "vocab_size": 1000,
            "bos_id": BOS,
            "eos_id": EOS,
            "pad_id": PAD,
        },
        "domains": sorted({s.split("/")[0] for s in counts if not s.startswith("all/")}),
        "streams": streams,
        "shards": shards,
        "counts": {"interactions_in": 0, "train": 0, "valid": 0, "test": 0, "dropped": {}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"manifest": manifest, "docs": {k: t for k, _, t in docs}, "streams": {k: s for k, s, _ in docs}}
