"""`cprec prepare` with ``data.engine=ray``: users partitioned into buckets, each bucket a Ray task.

Leave-one-out, duplicates and ``min_interactions`` are per user, so the job splits by user:

1. **Partition** (driver, out of core). The source's own reader streams its events into a
   ``buckets.BucketWriter`` (pyarrow datasets; the choice is argued there), which writes them into
   ``data.buckets`` Parquet buckets by a stable hash of the user - a user is in exactly one bucket
   by construction - and keeps only catalogue-sized state: the item/domain/file vocabularies and
   the per (item, domain) event counts.
2. **Whole-log decisions** (driver, catalogue-sized). What depends on every user is decided once,
   from that summary, with the same rules the single-process path applies to events in memory:
   each item's domain (``resolve_item_domains``: the domain most of its events are in; events
   elsewhere and of domains outside ``data.domains`` are counted here), the catalogue's pruning
   and what the events of each item get (``clean.clean_catalogue``: unknown item, no text).
   Nothing else in cleaning needs more than one user: duplicates are per (user, item, time),
   ``min_interactions`` counts a user's events, and no rule counts an item's events across users.
3. **Clean + split per bucket** (Ray tasks). Each task applies those decisions to its events, runs
   ``clean.clean_events`` and ``split.split``, writes its pre-training events and its rows of the
   eval files, and returns its counts (they add up: each rule looks at one event or one user),
   the items its kept events use, and its ``documents.corpus_pick`` (the smallest seeded spec
   keys).
4. **Catalogue, tokenizer, item texts** (driver). The catalogue needs the items with kept events
   of every bucket (an item without text stays only while it has some), so it is built after 3:
   then the sentencepiece tokenizer is trained **once**, on the item texts and the merged bottom-k
   sample of sequences - the same lines the single-process path trains on, so the tokenizer is the
   same - and item texts are cut to the token budget. ``eval/items.parquet`` is written; the
   buckets' eval rows are appended into ``eval/users.parquet`` and ``eval/train_sequences.parquet``
   bucket by bucket (one bucket in memory at a time).
5. **Render + tokenize + shard per bucket** (Ray tasks): ``shards/shard-b<bucket>-NNNNNN.tar``, so
   shard names are unique per bucket; a task writes each shard under a temporary name first.
6. **Merge** (driver): streams and counts summed, shard lists concatenated in bucket order, and
   ``manifest.json`` written **last**, into the temporary output folder that replaces
   ``data.output_dir`` only when complete (``pipeline.run``): no partial shard set is published.

The result holds the same documents (token ids and meta) and the same counts as
``data.engine=local`` on the same input; the shuffle of documents into shards is per bucket, so
shard order and names differ, and eval rows come bucket by bucket. It depends only on
``data.buckets``, never on the number of Ray workers.

A failing task is retried by Ray (``data.bucket_retries``, application errors included); a bucket
that keeps failing fails the job with ``BucketFailed`` naming the bucket, its attempts, its bucket
file and the source files its events come from. Ray must see the output folder at the same path
on every node (a shared file system), as the bucket files live inside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from cprec.config import Config, DataConfig, save_config
from cprec.manifest import write_manifest
from cprec.prepare import readers
from cprec.prepare.buckets import (
    BucketWriter,
    bucket_path,
    interactions_from_table,
    interactions_table,
    read_bucket,
)
from cprec.prepare.clean import clean_catalogue, clean_events
from cprec.prepare.documents import EncoderState, build_specs, corpus_pick, merge_corpus_picks
from cprec.prepare.prompts import PromptRenderer
from cprec.prepare.schema import IssueLog, SpilledEvents
from cprec.prepare.split import split, train_sequences_table
from cprec.prepare.stages import (
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

WORK_DIR = "_buckets"  # inside the temporary output folder; removed before the manifest is written
_EVAL_FILES = ("users.parquet", "train_sequences.parquet")


class BucketFailed(ValueError):
    """A bucket task failed in every attempt. A ``ValueError`` so that the CLI prints it as one
    line: most such failures are the input's (``data.strict``, a record a task cannot take)."""


@dataclass
class BucketJob:
    """What every task needs, put into Ray's object store once per phase."""

    work: str
    """The work folder: bucket files (``events/``), per-bucket outputs, attempt logs."""
    out: str
    """The temporary output folder (shards are written into its ``shards/``)."""
    data: DataConfig
    events: SpilledEvents
    """Vocabularies and the whole-log decisions about items (``SpilledEvents.keep_mask``)."""
    item_status: np.ndarray
    """Per item code, what its events get (``clean.clean_catalogue``)."""
    presplit: bool
    item_index: np.ndarray | None = None
    """Phase 2: item code -> catalogue row."""
    state: EncoderState | None = None
    """Phase 2: tokenizer folder, budget-cut item texts, template frames."""


def bucket_dir(work: str | Path, bucket: int) -> Path:
    return Path(work) / f"b{bucket:05d}"


def _attempt(job: BucketJob, bucket: int, phase: str) -> None:
    """Start an attempt: keep the task to the one core Ray gave it, and log the attempt (the driver
    counts them for its error message).

    Arrow decodes and writes Parquet on a thread pool as wide as the machine, so a task left alone
    would use every core while Ray counts one: on a node that Ray fills with a task per core, they
    would oversubscribe it (and one worker would look faster than one core is)."""
    import pyarrow as pa

    pa.set_cpu_count(1)
    folder = Path(job.work) / "attempts"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{phase}-b{bucket:05d}", "a", encoding="utf-8") as f:
        f.write(f"{socket.gethostname()} pid {os.getpid()}\n")


# ------------------------------------------------------------------------------------ tasks
def split_bucket(job: BucketJob, bucket: int) -> dict:
    """Phase 1 of a bucket: whole-log decisions, clean, split; pre-training events and eval rows
    to the bucket's folder. Returns counts, drops, used item codes and the corpus pick."""
    _attempt(job, bucket, "split")
    dcfg = job.data
    inter = read_bucket(Path(job.work) / "events", bucket, job.events)
    inter = inter.select(job.events.keep_mask(inter))  # decided and counted by the driver
    issues = IssueLog(dcfg.strict)
    inter = clean_events(inter, job.item_status, dcfg, issues)
    held = split(inter, job.presplit, dcfg.same_time_history)
    folder = bucket_dir(job.work, bucket)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(interactions_table(held.train), folder / "train.parquet")
    pq.write_table(held.eval_table(), folder / "users.parquet")
    pq.write_table(train_sequences_table(held.train), folder / "train_sequences.parquet")
    codes = np.arange(len(inter.items), dtype=np.int64)  # specs in item codes: rows come later
    specs = build_specs(held.train, codes, dcfg.kinds, dcfg.mixed_min_domains, 0)
    return {
        "counts": held.counts,
        "dropped": dict(issues.dropped),
        "examples": dict(issues.examples),
        "used": np.unique(inter.item).astype(np.int32),
        "picks": [] if dcfg.tokenizer.path else corpus_pick(specs, dcfg.seed),
        "frames": frames_needed(specs),
    }


def shard_bucket(job: BucketJob, bucket: int) -> dict:
    """Phase 2 of a bucket: specs (shuffled with (seed, bucket)), render, tokenize, shards."""
    _attempt(job, bucket, "shards")
    dcfg = job.data
    table = pq.read_table(bucket_dir(job.work, bucket) / "train.parquet")
    train = interactions_from_table(table, job.events.items, job.events.domains, job.events.files)
    specs = build_specs(train, job.item_index, dcfg.kinds, dcfg.mixed_min_domains, (dcfg.seed, bucket))
    shards, streams, n_cut = write_shards(
        Path(job.out),
        specs,
        job.state,
        dcfg,
        num_workers=0,  # the task is the unit of parallelism: one core, one tokenizer thread
        threads=1,
        shard_prefix=f"shard-b{bucket:05d}-",
        key_prefix=f"b{bucket:05d}_",
    )
    return {
        "shards": [s.manifest_entry() for s in shards],
        "streams": streams,
        "cut": n_cut,
        "specs": len(specs),
    }


# ----------------------------------------------------------------------------------- driver
@contextmanager
def ray_session(dcfg: DataConfig):
    """The Ray cluster to run on: one already initialised in this process (tests, notebooks), the
    one at ``data.ray_address``, or a local one with ``data.num_workers`` CPUs for this job."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "data.engine=ray needs Ray: pip install 'cprec[ray]' (or pip install ray)"
        ) from None
    if ray.is_initialized():
        yield ray
        return
    if dcfg.ray_address:
        ray.init(address=dcfg.ray_address, log_to_driver=True)
    else:
        start_local_ray(num_cpus=max(1, dcfg.num_workers))
    try:
        yield ray
    finally:
        ray.shutdown()


def start_local_ray(num_cpus: int, **kwargs) -> None:
    """``ray.init`` of a local cluster, tried twice: Ray waits a fixed 30 s for its raylet to
    register, which a loaded machine can exceed once."""
    import ray

    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
            return
        except Exception as e:  # Ray raises a plain Exception for this
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("Ray's local node did not start in time; trying once more")


def run_buckets(
    ray, fn: Callable, job_ref, buckets: list[int], phase: str, job: BucketJob, fold: Callable
) -> None:
    """Run ``fn(job, bucket)`` for every bucket as a Ray task, handing each result to
    ``fold(bucket, result)`` as it arrives (so the driver holds the merge, not every result). Ray
    retries a failed task ``data.bucket_retries`` times; a bucket that still fails cancels the
    rest and raises ``BucketFailed`` naming it."""
    remote = ray.remote(fn).options(
        num_cpus=1, max_retries=job.data.bucket_retries, retry_exceptions=True, name=f"cprec-{phase}"
    )
    refs = {remote.remote(job_ref, b): b for b in buckets}
    pending = list(refs)
    bar = tqdm(total=len(buckets), desc=f"buckets ({phase})", disable=None, leave=False)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            b = refs[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                for other in pending:
                    ray.cancel(other, force=True)
                raise _bucket_failed(e, b, phase, job) from None
            fold(b, result)
            bar.update(1)
    bar.close()


def _bucket_failed(e: Exception, bucket: int, phase: str, job: BucketJob) -> BucketFailed:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    reason = f"{type(cause).__name__}: {text[-1] if text else ''}"
    log_file = Path(job.work) / "attempts" / f"{phase}-b{bucket:05d}"
    attempts = len(log_file.read_text().splitlines()) if log_file.is_file() else 0
    events = job.events
    files = [events.files[f] for f in events.bucket_files[bucket]]
    return BucketFailed(
        f"bucket {bucket} of {events.n_buckets} failed in its {phase} task, {attempts} attempt(s) "
        f"(data.bucket_retries={job.data.bucket_retries}); bucket file "
        f"{bucket_path(Path(job.work) / 'events', bucket)} holds {int(events.bucket_rows[bucket])} "
        f"events from {files}: {reason}"
    )


def prepare_into(tmp: Path, cfg: Config, sources: list[dict], chash: str) -> dict:
    """The distributed path of ``pipeline._prepare_into`` (same outputs in ``tmp``)."""
    dcfg = cfg.data
    clock = _Clock()
    work = tmp / WORK_DIR
    issues = IssueLog(dcfg.strict)
    ds = readers.read_source(dcfg, issues, builder=BucketWriter(work / "events", dcfg.buckets))
    events = ds.interactions
    if not isinstance(events, SpilledEvents):
        raise RuntimeError(f"reader of data.source={dcfg.source!r} did not use the bucket writer")
    clock.lap("read+partition")
    status = clean_catalogue(ds, dcfg, issues)
    buckets = [b for b in range(events.n_buckets) if events.bucket_rows[b] > 0]
    log.info(
        "%d events in %d buckets (%d non-empty, largest %d events)",
        len(events),
        events.n_buckets,
        len(buckets),
        int(events.bucket_rows.max(initial=0)),
    )
    job = BucketJob(str(work), str(tmp), dcfg, events, status, ds.presplit)
    with ray_session(dcfg) as ray:
        merged = _SplitMerge(issues, len(events.items))
        run_buckets(ray, split_bucket, ray.put(job), buckets, "split", job, merged.fold)
        clock.lap("clean+split")
        issues.log_summary()
        counts = reconcile_counts(ds.interactions_in, merged.held_counts(), issues)
        used = merged.used

        catalogue = catalogue_of(ds, events.items, np.flatnonzero(used))
        renderer = PromptRenderer(dcfg.prompt, dcfg.prompt.domain_names)
        item_ids, item_index, raw = item_tables(catalogue, events.items, renderer)
        picks = lambda: [(key, item_index[idx]) for key, idx in merged.picks]  # noqa: E731 - codes -> rows
        tok, tok_info = make_tokenizer(tmp / "tokenizer", dcfg, raw, picks, renderer)
        clock.lap("tokenizer")
        state = encoder_state(tmp / "tokenizer", tok, tok_info, raw, merged.frames, renderer, dcfg)
        clock.lap("item texts")
        (tmp / "eval").mkdir()
        write_items_file(tmp / "eval", catalogue, item_ids, state.texts["domain"])
        _merge_eval_files(work, buckets, tmp / "eval")
        clock.lap("eval files")

        job.item_index, job.state = item_index, state
        outs: dict[int, dict] = {}
        run_buckets(ray, shard_bucket, ray.put(job), buckets, "shards", job, outs.__setitem__)
        clock.lap("tokenize+shards")
    streams: dict[str, dict[str, int]] = {}
    for b in buckets:
        for name, s in outs[b]["streams"].items():
            acc = streams.setdefault(name, {"sequences": 0, "tokens": 0})
            acc["sequences"] += s["sequences"]
            acc["tokens"] += s["tokens"]
    shards = [s for b in buckets for s in outs[b]["shards"]]
    save_config(cfg, tmp / "config.yaml")
    shutil.rmtree(work)  # bucket files and per-bucket outputs: not part of the prepared folder
    manifest = build_manifest(
        dcfg,
        chash,
        sources,
        tok_info,
        catalogue,
        with_events={events.items[c] for c in np.flatnonzero(used).tolist()},
        issues=issues,
        counts=counts,
        streams=streams,
        shards=shards,
        documents={
            "specs": sum(o["specs"] for o in outs.values()),
            "samples": sum(s["samples"] for s in shards),
            "cut_to_fit": sum(o["cut"] for o in outs.values()),
        },
    )
    manifest["buckets"] = {"count": events.n_buckets, "non_empty": len(buckets)}
    write_manifest(tmp, manifest)  # last: the shard set is complete
    log.info("stage times: %s", clock)
    return manifest


class _SplitMerge:
    """Folds the buckets' phase-1 results as they arrive: counts into the ``IssueLog``, the union of
    used items, the running bottom-k corpus pick and the template frames in use."""

    def __init__(self, issues: IssueLog, n_items: int):
        self.issues = issues
        self.held: Counter[str] = Counter()
        self.used = np.zeros(n_items, dtype=bool)
        self.picks: list = []
        self.frames: set[tuple[str, str]] = set()

    def fold(self, bucket: int, p: dict) -> None:
        self.held.update(p["counts"])
        self.issues.dropped.update(p["dropped"])
        for reason, example in p["examples"].items():
            self.issues.examples.setdefault(reason, example)
        self.used[p["used"]] = True
        self.picks = merge_corpus_picks([self.picks, p["picks"]])
        self.frames |= p["frames"]

    def held_counts(self) -> dict[str, int]:
        return {k: self.held[k] for k in ("train", "valid", "test")}


def _merge_eval_files(work: Path, buckets: list[int], out: Path) -> None:
    """Append the buckets' eval rows, bucket by bucket (one bucket's rows in memory at a time)."""
    for name in _EVAL_FILES:
        writer = None
        try:
            for b in buckets:
                table = pq.read_table(bucket_dir(work, b) / name)
                if writer is None:
                    writer = pq.ParquetWriter(out / name, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
