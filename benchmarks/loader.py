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
- ``--only verify``: what the integrity checks cost (``train.loader.verify``: each shard's sha256
  hashed as it streams, every document's ids against the vocabulary). The loader (greedy, no
  workers, one epoch) and the reader alone, without checks / with the sha256 only / with both,
  measured in interleaved repeats (the order rotates) and compared by their medians. The result is
  merged into the existing JSON as ``verification``; pin it to one core for stable figures:

    python benchmarks/loader.py --out benchmarks/results/loader.json
    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/loader.py --only verify --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

from cprec.stream.docstream import ShardChecks
from cprec.stream.loader import PackedLoader, resolve_shards, shard_checks
from cprec.stream.packing import padding_efficiency
from cprec.stream.settings import LoaderSettings

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
        sha = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        shards.append(
            {"path": rel, "samples": min(n_docs, s0 + shard_docs) - s0, "tokens": n_tok, "sha256": sha}
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
    loader = PackedLoader(urls, LoaderSettings(shuffle_buffer=1000, seed=0, log_every=0), manifest=manifest)
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
    settings = LoaderSettings(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=0,
        packing=packing,
        bestfit_buffer=args.bestfit_buffer,
        shuffle_buffer=1000,
        num_workers=workers,
        mixing=mixing or {},
        log_every=0,
    )
    loader = PackedLoader(urls, settings, manifest=manifest)
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


def _checks(urls, manifest, variant: str) -> ShardChecks | None:
    full = shard_checks(urls, manifest, verify=True)
    if variant == "none" or full is None:
        return None
    return full if variant == "sha256+vocab" else ShardChecks(full.sha256, None)


def _time_epoch(urls, manifest, variant: str, args, reader_only: bool) -> tuple[float, float]:
    """Documents per CPU second and per wall second over one epoch: the reader alone, or the
    loader into packed greedy batches. CPU time (this process) is what the checks cost; on a shared
    machine the wall time also counts the other jobs on the core."""
    loader = PackedLoader(
        urls,
        LoaderSettings(
            seq_len=args.seq_len, batch_size=args.batch_size, seed=0, shuffle_buffer=1000, log_every=0
        ),
        manifest=manifest,
    )
    loader.plan = dataclasses.replace(loader.plan, checks=_checks(urls, manifest, variant))
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    if reader_only:
        for doc in loader.iter_documents():
            if doc.epoch > 0:
                break
            n += 1
    else:
        for _ in loader:
            if min(loader.epochs().values()) > 0:
                break
        n = loader.stats()["docs"]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    loader.close()
    return n / dc, n / dt


def bench_verification(urls, manifest, args) -> dict:
    """Docs/s without checks, with the sha256 only, with sha256 + vocabulary: interleaved repeats."""
    variants = ["none", "sha256", "sha256+vocab"]
    checks = shard_checks(urls, manifest, verify=True)
    verified = sum(s is not None for s in checks.sha256) if checks else 0
    if verified < len(urls):
        raise SystemExit(f"--only verify: {len(urls) - verified} of {len(urls)} shards have no sha256")
    out = {}
    for pipeline in ("loader", "reader"):
        cpu, wall = {v: [] for v in variants}, {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants[r % 3 :] + variants[: r % 3]:  # rotate: no variant always runs first
                c, w = _time_epoch(urls, manifest, v, args, reader_only=pipeline == "reader")
                cpu[v].append(c)
                wall[v].append(w)
        med = {v: float(np.median(x)) for v, x in cpu.items()}
        med_wall = {v: float(np.median(x)) for v, x in wall.items()}
        out[pipeline] = {
            "docs_per_cpu_s_median": med,
            "docs_per_wall_s_median": med_wall,
            "docs_per_cpu_s_runs": cpu,
            "docs_per_wall_s_runs": wall,
            "cost_sha256": 1 - med["sha256"] / med["none"],
            "cost_sha256_and_vocab": 1 - med["sha256+vocab"] / med["none"],
            "cost_sha256_wall": 1 - med_wall["sha256"] / med_wall["none"],
            "cost_sha256_and_vocab_wall": 1 - med_wall["sha256+vocab"] / med_wall["none"],
        }
        log.info(
            "%s: %s docs per CPU s (median of %d); sha256 costs %.1f%%, sha256 + vocabulary %.1f%% "
            "(wall: %.1f%%, %.1f%%)",
            pipeline,
            {v: round(m) for v, m in med.items()},
            args.repeats,
            100 * out[pipeline]["cost_sha256"],
            100 * out[pipeline]["cost_sha256_and_vocab"],
            100 * out[pipeline]["cost_sha256_wall"],
            100 * out[pipeline]["cost_sha256_and_vocab_wall"],
        )
    # The hash alone over the same bytes (read in 1 MB blocks, as the loader does): its share of a
    # plain epoch. Verified shards skip the per-header byte sums that guard unverified ones (the
    # sha256 covers every header byte), which is why the net cost above can be below this.
    hash_cpu = []
    for _ in range(args.repeats):
        c0 = time.process_time()
        for u in urls:
            h = hashlib.sha256()
            with open(u.removeprefix("file:"), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        hash_cpu.append(time.process_time() - c0)
    n_docs = sum(int(s["samples"]) for s in manifest["shards"])
    plain_epoch_cpu = n_docs / out["loader"]["docs_per_cpu_s_median"]["none"]
    out["sha256_alone_cpu_s_per_epoch"] = float(np.median(hash_cpu))
    out["sha256_alone_share_of_plain_loader_epoch"] = float(np.median(hash_cpu)) / plain_epoch_cpu
    out["goal_sha256_under_5_percent_of_loader"] = out["loader"]["cost_sha256"] < 0.05
    out["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    out["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", "")
    out["repeats"] = args.repeats
    out["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out


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
    ap.add_argument("--only", choices=["verify"], help="only the integrity-check cost, merged into --out")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats for --only verify")
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
    if args.only == "verify":
        label = "synthetic" if synthetic else str(source)
        return _merge_verification(Path(args.out), bench_verification(urls, manifest, args), tmp, label)
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
    if out.is_file() and "verification" in (old := json.loads(out.read_text())):
        result["verification"] = old["verification"]  # measured separately (--only verify): kept
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result


def _merge_verification(out: Path, verification: dict, tmp, data: str) -> dict:
    """``verification`` into the existing result file (other entries kept)."""
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "loader"}
    verification["data"] = data
    result["verification"] = verification
    print(json.dumps(verification, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
