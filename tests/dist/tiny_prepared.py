"""A tiny prepared folder for training tests, written to the prepared-folder contract.

Real parts: a sentencepiece tokenizer trained on the documents (an HF folder), WebDataset tars of
``ids.npy`` + ``json`` samples, a manifest with per-stream counts and shard hashes. Two domains
(``A``, ``B``) plus mixed sequences give three streams, so per-stream token counts are visible.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np

from cprec.config import TokenizerConfig

WORDS = "apple bread cheese dates eggs flour grapes honey knife ladle mixer oven pan spoon tray whisk".split()


def _documents(n_users: int, seed: int) -> list[tuple[str, str, str, str]]:
    rng = random.Random(seed)
    docs = []
    for u in range(n_users):
        items = {d: [rng.choice(WORDS) for _ in range(rng.randint(3, 12))] for d in ("A", "B")}
        for d, seq in items.items():
            docs.append((f"u{u}", d, "domain", f"A user's {d} history: " + "; ".join(seq)))
        mixed = [f"[{d}] {w}" for d in ("A", "B") for w in items[d]]
        rng.shuffle(mixed)
        docs.append((f"u{u}", "all", "mixed", "A user's history across all domains: " + "; ".join(mixed)))
    return docs


def write_tiny_prepared(out: Path, n_users: int = 60, n_shards: int = 4, seed: int = 0) -> Path:
    """Write manifest.json, shards/*.tar and tokenizer/ into ``out``; returns ``out``."""
    import webdataset as wds

    from cprec.data.tokenize import batch_encoder, load_tokenizer, tokenizer_hash, train_sentencepiece

    out = Path(out)
    docs = _documents(n_users, seed)
    tok_dir = train_sentencepiece(
        [t for *_, t in docs], out / "tokenizer", TokenizerConfig(vocab_size=320, train_sentences=10_000)
    )
    tok = load_tokenizer(tok_dir)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    encoded = batch_encoder(tok)([t for *_, t in docs])
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards, streams = [], {}
    for s in range(n_shards):
        path = out / "shards" / f"shard-{s:06d}.tar"
        samples = tokens = 0
        with wds.TarWriter(str(path)) as w:
            for i in range(s, len(docs), n_shards):
                user, domain, kind, _ = docs[i]
                ids = np.asarray([bos] + encoded[i] + [eos], dtype=np.int32)
                buf = io.BytesIO()
                np.save(buf, ids)
                meta = {"user": user, "domain": domain, "kind": kind, "n_tokens": len(ids), "window": 0}
                w.write(
                    {"__key__": f"d{i:06d}", "ids.npy": buf.getvalue(), "json": json.dumps(meta).encode()}
                )
                samples, tokens = samples + 1, tokens + len(ids)
                st = streams.setdefault(f"{domain}/{kind}", {"sequences": 0, "tokens": 0})
                st["sequences"] += 1
                st["tokens"] += len(ids)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        shards.append({"path": f"shards/{path.name}", "samples": samples, "tokens": tokens, "sha256": sha})
    manifest = {
        "format_version": 1,
        "content_hash": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16],
        "config": {},
        "sources": [],
        "tokenizer": {
            "path": "tokenizer",
            "hash": tokenizer_hash(tok),
            "vocab_size": len(tok),
            "bos_id": bos,
            "eos_id": eos,
            "pad_id": pad,
        },
        "domains": ["A", "B"],
        "streams": streams,
        "shards": shards,
        "counts": {"interactions_in": 0, "train": 0, "valid": 0, "test": 0, "dropped": {}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny_prepared(Path(sys.argv[1])))
