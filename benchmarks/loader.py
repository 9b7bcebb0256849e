"""Streaming loader throughput and packing efficiency, against baselines measured in the same run.

Measured on the prepared shards (``--prepared``, default out/prepared/food_kitchen; with
``--synthetic`` or when that folder is absent and ``--synthetic-if-missing`` is given, synthetic
shards with a food-kitchen-like length distribution are written to a temporary folder and the
result says so):

- reading: documents/s and tokens/s of the shard reader alone (one process), and of the plain
  ``webdataset.WebDataset(...).decode()`` pipeline over the same shards (the reading baseline);
- the loader (read + shuffle + pack + collate into packed batches) for greedy and best-fit packing
  and each ``--num-workers``: samples/s, tokens/s (non-pad), batches/s, packing efficiency
  (non-pad fraction) and the fraction of documents cut;
- one best-fit run with mixing weights (``--mixing``): its speed (each worker reads its shards once
  per mixed stream) and the realised token shares against the weights;
- naive one-document-per-row batching of the same documents (the packing baseline): padding every
  document to ``seq_len``, and padding each batch to its longest document.

    python benchmarks/loader.py --out benchmarks/results/loader.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from cprec.data.loader import PackedLoader, resolve_shards
from cprec.data.packing import padding_efficiency

log = logging.getLogger("benchmarks.loader")


def write_synthetic(folder: Path, n_docs: int, seed: int = 0, shard_docs: int = 8000) -> Path:
    """Shards + manifest like `cprec prepare` writes; lognormal lengths like food-kitchen's (median ~100)."""
    rng = np.random.default_rng(seed)
    streams = ["A/domain", "B/domain", "all/mixed"]
    p = np.array([0.15, 0.6, 0.25])
    lengths = np.clip(rng.lognormal(np.log(100), 0.6, n_docs).astype(int), 15, 512)
    which = rng.choice(len(streams), n_docs, p=p)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    shards, totals = [], {s: [0, 0] for s in streams}
    for s0 in range(0, n_docs, shard_docs):
        rel = f"shards/shard-{s0 // shard_docs:06d}.tar"
        n_tok = 0
        with wds.TarWriter(str(folder / rel)) as w:
            for i in range(s0, min(n_docs, s0 + shard_docs)):
                stream = streams[which[i]]
                ids = rng.integers(3, 8000, lengths[i], dtype=np.int32)
                buf = io.BytesIO()
                np.save(buf, ids)
                domain, kind = stream.split("/")
                meta = {
                    "user": str(i),
                    "domain": domain,
                    "kind": kind,
                    "n_tokens": int(lengths[i]),
                    "window": 0,
                }
                w.write(
                    {"__key__": f"d{i:08d}", "ids.npy": buf.getvalue(), "json": json.dumps(meta).encode()}
                )
                totals[stream][0] += 1
                totals[stream][1] += int(lengths[i])
                n_tok += int(lengths[i])
        shards.append(
            {"path": rel, "samples": min(n_docs, s0 + shard_docs) - s0, "tokens": n_tok, "sha256": ""}
        )
    manifest = {
        "format_version": 1,
        "content_hash": f"synthetic-{n_docs}-{seed}",
        "tokenizer": {"pad_id": 0, "bos_id": 1, "eos_id": 2, "vocab_size": 8000},
        "streams": {s: {"sequences": v[0], "tokens": v[1]} for s, v in totals.items()},
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def bench_reader(urls: list[str], manifest: dict | None, max_docs: int) -> tuple[dict, np.ndarray]:
    """The shard reader alone (no workers, no packing); also returns the document lengths in order."""
    loader = PackedLoader(urls, manifest=manifest, shuffle_buffer=1000, seed=0, log_every=0)
    lengths = []
    t0 = time.perf_counter()
    for doc in loader.iter_documents():
        if doc.epoch > 0 or len(lengths) >= max_docs:
            break
        lengths.append(len(doc.tokens))
    dt = time.perf_counter() - t0
    n = np.asarray(lengths, dtype=np.int64)
    return {"docs": len(n), "seconds": dt, "docs_per_s": len(n) / dt, "tokens_per_s": float(n.sum()) / dt}, n


def bench_webdataset(urls: list[str], max_docs: int) -> dict:
    """Baseline reader: the stock webdataset pipeline with its npy/json decoders."""
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    n_docs = n_tok = 0
    t0 = time.perf_counter()
    for sample in ds:
        n_tok += len(sample["ids.npy"])
        n_docs += 1
        if n_docs >= max_docs:
            break
    dt = time.perf_counter() - t0
    return {"docs": n_docs, "seconds": dt, "docs_per_s": n_docs / dt, "tokens_per_s": n_tok / dt}


def bench_loader(urls, manifest, packing: str, workers: int, args, n_docs: int, mixing=None) -> dict:
    """Full pipeline for ``n_docs`` documents: batches out, timed from the first call."""
    loader = PackedLoader(
        urls,
        manifest=manifest,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=0,
        packing=packing,
        bestfit_buffer=args.bestfit_buffer,
        shuffle_buffer=1000,
        num_workers=workers,
        mixing=mixing,
        log_every=0,
    )
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    docs0, tok0 = loader.stats()["docs"], loader.stats()["tokens"]
    t1 = time.perf_counter()
    while loader.stats()["docs"] < n_docs:
        next(it)
    t2 = time.perf_counter()
    loader.close()
    st = loader.stats()
    steady = t2 - t1
    return {
        "packing": packing,
        "num_workers": workers,
        "mixing": loader.weights or "natural",
        "batches": st["batches"],
        "docs": st["docs"],
        "first_batch_s": t_first,
        "seconds": t2 - t0,
        "samples_per_s": (st["docs"] - docs0) / steady,
        "tokens_per_s": (st["tokens"] - tok0) / steady,
        "batches_per_s": (st["batches"] - 1) / steady,
        "efficiency": st["efficiency"],
        "docs_split_fraction": st["splits"] / max(1, st["docs"]),
        "realised_mix": {
            s: {"share": round(v["share"], 4), "target": round(v["target"], 4)}
            for s, v in loader.realised_mix().items()
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default="out/prepared/food_kitchen", help="prepared folder or shard spec")
    ap.add_argument("--synthetic", action="store_true", help="use synthetic shards whatever exists")
    ap.add_argument(
        "--synthetic-if-missing", action="store_true", help="synthetic shards if --prepared is absent"
    )
    ap.add_argument("--synthetic-docs", type=int, default=60000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bestfit-buffer", type=int, default=64)
    ap.add_argument("--num-workers", default="0,2", help="comma-separated worker counts to time")
    ap.add_argument("--max-docs", type=int, default=0, help="documents per measurement (0 = one epoch)")
    ap.add_argument(
        "--mixing",
        default="A/domain=0.3,B/domain=0.4,all/mixed=0.3",
        help="weights for one extra best-fit run with mixing (stream=weight,...; empty = skip)",
    )
    ap.add_argument("--out", default="benchmarks/results/loader.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    tmp = None
    source = args.prepared
    synthetic = args.synthetic or (args.synthetic_if_missing and not Path(args.prepared).exists())
    if synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="cprec-bench-loader-")
        log.info("writing %d synthetic documents to %s", args.synthetic_docs, tmp.name)
        source = str(write_synthetic(Path(tmp.name), args.synthetic_docs))
    urls, manifest = resolve_shards(source)
    max_docs = args.max_docs or 10**12
    reader, lengths = bench_reader(urls, manifest, max_docs)
    n_docs = len(lengths)
    log.info(
        "reader: %d docs, %.0f docs/s, %.0f tokens/s", n_docs, reader["docs_per_s"], reader["tokens_per_s"]
    )
    baseline_reader = bench_webdataset(urls, min(n_docs, 20000))
    log.info("webdataset baseline: %.0f docs/s", baseline_reader["docs_per_s"])

    runs = []
    for workers in [int(w) for w in args.num_workers.split(",")]:
        for packing in ("greedy", "bestfit"):
            r = bench_loader(urls, manifest, packing, workers, args, n_docs)
            log.info(
                "%s workers=%d: %.0f samples/s, %.0f tokens/s, non-pad %.2f%%",
                packing,
                workers,
                r["samples_per_s"],
                r["tokens_per_s"],
                100 * r["efficiency"],
            )
            runs.append(r)
    if args.mixing:
        weights = {k: float(v) for k, v in (kv.split("=") for kv in args.mixing.split(","))}
        known = set((manifest or {}).get("streams", {}))
        weights = {k: v for k, v in weights.items() if k in known}
        if weights:
            r = bench_loader(urls, manifest, "bestfit", 0, args, n_docs, mixing=weights)
            log.info(
                "bestfit with mixing %s: %.0f samples/s, mix %s",
                weights,
                r["samples_per_s"],
                r["realised_mix"],
            )
            runs.append(r)

    L = args.seq_len
    naive = {
        "pad_each_to_seq_len": padding_efficiency(lengths, L),
        "pad_batch_to_longest": padding_efficiency(lengths, L, batch_size=args.batch_size),
    }
    natural = [r for r in runs if r["mixing"] == "natural"]
    best = {p: max(r["efficiency"] for r in natural if r["packing"] == p) for p in ("greedy", "bestfit")}
    result = {
        "benchmark": "loader",
        "data": "synthetic" if synthetic else str(source),
        "shards": len(urls),
        "documents_per_epoch": n_docs,
        "doc_tokens": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
        },
        "seq_len": L,
        "batch_size": args.batch_size,
        "reader": reader,
        "baseline_webdataset_reader": baseline_reader,
        "loader": runs,
        "baseline_naive_padding_efficiency": naive,
        "packing_efficiency": best,
        "goal_98_percent_met": {p: e >= 0.98 for p, e in best.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
