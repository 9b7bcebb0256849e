"""The training input pipeline: prepared shards -> packed batches for one rank, resumable exactly.

``build_loader(loader_settings(cfg), rank, world_size)`` -> ``PackedLoader``, an infinite iterable
of packed batches (the contract in README "Architecture") with ``state_dict``/``load_state_dict``.

The settings travel as one frozen ``LoaderSettings`` (``cprec.stream.settings``); what the worker
processes need of them, with the shard list and the manifest's checks, is one ``ReadPlan``.

How the work is split (details in ``cprec.stream.docstream``):

- Each epoch the shards are permuted with the seed and dealt to the ``world_size x num_workers``
  global workers (shards left over after the last full round are split at sample level), so over
  one epoch every sample is read by exactly one worker of one rank. Each worker shuffles through a
  seeded buffer that drains at the end of its epoch; its epochs then follow one another. Ranks can
  end an epoch a few documents apart; the loader is infinite, so every rank always has a batch.
- Workers (torch DataLoader processes) only read documents. Mixing weights are applied inside each
  worker (one reader per stream, token-deficit scheduling); packing happens here in the main process.
- Exact resume: the main process records, per worker, the worker's last state snapshot (sent with
  every ``chunk_docs``-th document) and how many documents it has consumed since. Documents already
  consumed but not yet in a batch sit in the packer, whose buffer is part of the state. Restarting a
  worker = load its snapshot, skip the consumed documents; the DataLoader polls workers round-robin,
  so the restarted loader relabels its workers to poll the one that was due next first.
- A state saved with another world size, worker count, seed, stream set or shard set restarts at
  epoch granularity (each stream at the oldest epoch any saved worker was in), with a warning.
  New weights over the same streams keep the positions and restart the mixing counters.

Costs and limits worth knowing: with mixing weights each worker reads its shards once per stream
(every stream's reader filters its own documents, which is what lets streams run through epochs
independently); the state is a few hundred KB of JSON per rank (shuffle-buffer positions and RNG
states, re-read from the shards on resume); take ``state_dict()`` right after the last batch the
step used. A worker whose shards hold no document at all stops (with a warning), after which the
exact-resume order is only guaranteed if that happens identically on resume (it does: same shards).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from cprec import manifest as contract
from cprec.stream.docstream import Chunk, Doc, ReadPlan, ShardChecks, WorkerSource
from cprec.stream.packing import collate_rows, make_packer
from cprec.stream.settings import LoaderSettings

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_DEFAULTS = LoaderSettings()


def _identity(x):
    return x


# -------------------------------------------------------------------------------- shard source
def read_manifest(folder: Path) -> dict:
    """``manifest.json`` of a prepared folder (read and version-checked by the writer's own
    `cprec.manifest.read_manifest`), which must list at least one shard."""
    manifest = contract.read_manifest(folder)
    if not manifest.get("shards"):
        raise ValueError(f"{folder / 'manifest.json'}: lists no shards")
    return manifest


def _names_folder(spec: str) -> Path | None:
    """The prepared folder ``spec`` names itself (the folder or its manifest.json), else None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    return path.parent if path.name == contract.MANIFEST and path.is_file() else None


def _manifest_near(urls: list[str]) -> Path | None:
    """For local shards, the folder next to the first one or one up that holds a manifest.json."""
    first = urls[0] if urls else ""
    if first and (":" not in first.split("/", 1)[0] or first.startswith("file:")):
        local = Path(first.removeprefix("file:")).expanduser()
        for folder in (local.parent, local.parent.parent):
            if (folder / contract.MANIFEST).is_file():
                return folder
    return None


def manifest_folder(spec: str) -> Path | None:
    """The prepared folder whose manifest.json describes the shards ``spec`` names (None: none found).

    The loader and the trainer's tokenizer check both ask here, so they read the same manifest.
    """
    if not spec:
        return None
    return _names_folder(spec) or _manifest_near(expand_urls(spec))


def resolve_shards(spec: str) -> tuple[list[str], dict | None]:
    """Shard URLs and manifest (if one is found) for a prepared folder, its manifest.json, or a spec.

    A spec is a path or URL with brace patterns (``shard-{000000..000015}.tar``), several joined with
    ``::``, or ``pipe:`` commands (``pipe:aws s3 cp s3://b/shard-{0..9}.tar -``). For a local spec the
    manifest is looked up next to the shards and one folder up.
    """
    if not spec:
        raise ValueError("config field 'train.loader.shards': empty, and data.output_dir is empty too")
    folder = _names_folder(spec)
    if folder is not None:
        manifest = read_manifest(folder)
        return [str(folder / s["path"]) for s in manifest["shards"]], manifest
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"config field 'train.loader.shards': {spec!r} names no shard")
    folder = _manifest_near(urls)
    return urls, (read_manifest(folder) if folder is not None else None)


def shard_checks(urls: list[str], manifest: dict | None, verify: bool = True) -> ShardChecks | None:
    """The sha256 (by shard file name) and vocabulary size the manifest gives for ``urls``.

    A URL whose file name the manifest does not list (or lists twice) is read unverified.
    """
    if not verify or not manifest:
        return None
    names: dict[str, str | None] = {}
    for entry in manifest.get("shards", []):
        name = os.path.basename(str(entry.get("path", "")))
        names[name] = None if name in names else (entry.get("sha256") or None)
    sha = tuple(names.get(os.path.basename(u)) for u in urls)
    vocab = manifest.get("tokenizer", {}).get("vocab_size")
    n = sum(x is not None for x in sha)
    if n < len(urls):
        log.info(
            "loader: %d of %d shards have no sha256 in the manifest; read unverified",
            len(urls) - n,
            len(urls),
        )
    return ShardChecks(sha, int(vocab) if vocab else None)


def resolve_mixing(mixing: dict[str, float] | None, manifest: dict | None) -> dict[str, float] | None:
    """Normalised positive weights per stream, or None for the natural mix (documents in shard order)."""
    if not mixing:
        return None
    if manifest is None or not manifest.get("streams"):
        raise ValueError(
            "config field 'train.loader.mixing': weights need the stream list of manifest.json; point "
            "train.loader.shards at the prepared folder (or leave mixing empty for the natural mix)"
        )
    known = sorted(manifest["streams"])
    for key, w in mixing.items():
        if key not in known:
            raise ValueError(
                f"config field 'train.loader.mixing.{key}': unknown stream; known streams: {known}"
            )
        if w < 0:
            raise ValueError(f"config field 'train.loader.mixing.{key}': weight must be >= 0, got {w}")
        if w > 0 and not manifest["streams"][key].get("sequences", 1):
            raise ValueError(f"config field 'train.loader.mixing.{key}': the stream has no documents")
    weights = {k: float(w) for k, w in mixing.items() if w > 0}
    if not weights:
        raise ValueError("config field 'train.loader.mixing': every weight is 0")
    left_out = [s for s in known if s not in weights]
    if left_out:
        log.info("loader mixing leaves out streams %s (weight 0 or not listed)", left_out)
    total = sum(weights.values())
    return {k: weights[k] / total for k in sorted(weights)}


# ------------------------------------------------------------------------- worker side
class DocumentDataset(IterableDataset):
    """Runs in each DataLoader worker (or in the main process when ``num_workers == 0``).

    Yields chunks of documents aligned to multiples of ``chunk_docs`` in the worker's own sequence;
    each aligned chunk carries the worker's ``state_dict`` from just before its first document.

    Torch worker ``i`` plays logical worker ``(i + rotation) % num_workers``, so a resumed loader whose
    next document was due from logical worker ``r`` gets it first (the DataLoader polls its workers
    round-robin from worker 0).
    """

    def __init__(
        self,
        plan: ReadPlan,
        *,
        rank: int,
        num_workers: int,
        chunk_docs: int,
        restore: list[tuple[dict | None, int]],
        start_epochs: dict[str, int] | None,
        rotation: int,
    ):
        super().__init__()
        self.plan, self.rank = plan, rank
        self.num_workers = max(1, num_workers)
        self.chunk_docs = chunk_docs
        self.restore, self.start_epochs, self.rotation = restore, start_epochs, rotation

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.num_workers
        source = WorkerSource(self.plan, self.rank * self.num_workers + w, self.start_epochs)
        snapshot, skip = self.restore[w]
        if snapshot is not None:
            source.load_state_dict(snapshot)
        for _ in range(skip):  # documents already consumed since the snapshot
            if source.next() is None:
                return
        K = self.chunk_docs
        while True:
            start = source.seq
            snap = source.state_dict() if start % K == 0 else None
            docs: list[Doc] = []
            doc = None
            while True:
                doc = source.next()
                if doc is None:
                    break
                docs.append(doc)
                if source.seq % K == 0:
                    break
            if docs:
                yield Chunk(w, start, snap, docs, *source.skipped())
            if doc is None:
                return


# ------------------------------------------------------------------------------------ loader
class PackedLoader:
    """Infinite iterable of packed batches for one rank, with exact ``state_dict``/``load_state_dict``.

    Iterating again (a new ``iter()``) continues from the last batch handed out, so
    ``loader.load_state_dict(s); iter(loader)`` resumes at the batch after the one ``s`` was taken at.
    """

    def __init__(
        self,
        urls: list[str],
        settings: LoaderSettings = _DEFAULTS,
        *,
        manifest: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not urls:
            raise ValueError("loader has no shard to read")
        s = self.settings = settings
        self.urls, self.manifest = list(urls), manifest
        self.rank, self.world_size, self.num_workers = rank, world_size, s.num_workers
        self.seq_len, self.batch_size, self.seed = s.seq_len, s.batch_size, s.seed
        self.weights = resolve_mixing(s.mixing, manifest)
        self.chunk_docs, self.log_every = s.chunk_docs, s.log_every
        self.checks = shard_checks(self.urls, manifest, s.verify)
        pad_id = s.pad_id
        if pad_id is None:
            pad_id = int((manifest or {}).get("tokenizer", {}).get("pad_id", 0))
        self.pad_id = pad_id
        self.packer = make_packer(s.packing, s.seq_len, s.bestfit_buffer)
        self._W = max(1, s.num_workers)
        self.plan = ReadPlan(
            tuple(self.urls),
            world_size * self._W,
            s.seed,
            s.shuffle_buffer,
            s.on_corrupt,
            self.checks,
            self.weights,
        )
        self._records = [self._fresh_record() for _ in range(self._W)]
        self._rotation = 0
        self._start_epochs: dict[str, int] | None = None
        self._counters = {"batches": 0, "docs": 0, "empty_docs": 0, "tokens": 0, "pad_tokens": 0}
        self._stream_tokens: dict[str, int] = {}
        self._active: Iterator | None = None
        if manifest and len(manifest.get("shards", [])) == len(self.urls):
            n = sum(int(s.get("samples", 0)) for s in manifest["shards"])
            log.info(
                "loader rank %d/%d: %d shards, %d samples per epoch over all ranks",
                rank,
                world_size,
                len(self.urls),
                n,
            )

    # ------------------------------------------------------------------ documents
    @staticmethod
    def _fresh_record() -> dict[str, Any]:
        return {
            "snapshot": None,
            "skip": 0,
            "epochs": {},
            "skipped_shards": 0,
            "skipped_samples": 0,
            "skipped_names": [],
        }

    def _dataset(self) -> DocumentDataset:
        return DocumentDataset(
            self.plan,
            rank=self.rank,
            num_workers=self.num_workers,
            chunk_docs=self.chunk_docs,
            restore=[(r["snapshot"], r["skip"]) for r in self._records],
            start_epochs=self._start_epochs,
            rotation=self._rotation,
        )

    def _chunks(self) -> Iterator[Chunk]:
        dataset = self._dataset()
        if self.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=4,
            in_order=True,  # round-robin over workers: what makes the order reproducible
        )
        return iter(loader)

    def iter_documents(self) -> Iterator[Doc]:
        """Documents in the order the packer receives them; consuming one advances the loader state."""
        chunks = self._chunks()
        try:
            yield from self._consume(chunks)
        finally:
            # Stop the workers now: left to the garbage collector (an exception's traceback keeps
            # this frame alive), the DataLoader's shutdown can stall for seconds per worker.
            stop = getattr(chunks, "_shutdown_workers", None) or getattr(chunks, "close", None)
            if stop is not None:
                stop()
        raise RuntimeError(
            f"loader rank {self.rank}: every worker ran out of documents "
            f"(all shards missing/corrupt, or no document of the mixed streams); see the warnings above"
        )

    def _consume(self, chunks: Iterator[Chunk]) -> Iterator[Doc]:
        for chunk in chunks:
            rec = self._records[chunk.worker]
            if chunk.snapshot is not None:
                rec["snapshot"], rec["skip"] = chunk.snapshot, 0
            expected = (rec["snapshot"]["seq"] if rec["snapshot"] else 0) + rec["skip"]
            if chunk.start != expected:
                raise RuntimeError(
                    f"loader worker {chunk.worker} sent document #{chunk.start}, expected #{expected}"
                )
            if chunk.skipped_shards > rec["skipped_shards"] or chunk.skipped_samples > rec["skipped_samples"]:
                log.warning(
                    "loader rank %d worker %d: %d shard(s) and %d sample(s) skipped so far (latest: %s)",
                    self.rank,
                    chunk.worker,
                    chunk.skipped_shards,
                    chunk.skipped_samples,
                    ", ".join(chunk.skipped_names) or "-",
                )
            rec["skipped_shards"], rec["skipped_samples"] = chunk.skipped_shards, chunk.skipped_samples
            rec["skipped_names"] = chunk.skipped_names
            # The next document is due from this worker while its chunk is unfinished, else the next.
            self._rotation = chunk.worker
            for i, doc in enumerate(chunk.docs):
                rec["skip"] += 1
                rec["epochs"][self._stream_key(doc)] = doc.epoch
                if i == len(chunk.docs) - 1:
                    self._rotation = (chunk.worker + 1) % self._W
                yield doc

    def _stream_key(self, doc: Doc) -> str:
        return doc.stream if self.weights else "*"

    # ------------------------------------------------------------------ batches
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._active = self._batches()
        return self._active

    def _batches(self) -> Iterator[dict[str, Any]]:
        docs = self.iter_documents()
        try:
            while True:
                while self.packer.n_ready < self.batch_size:
                    doc = next(docs)
                    if len(doc.tokens) == 0:
                        self._counters["empty_docs"] += 1
                        continue
                    self._counters["docs"] += 1
                    self.packer.push(doc.tokens, doc.stream)
                rows = [self.packer.pop_row() for _ in range(self.batch_size)]
                batch = collate_rows(rows, self.seq_len, self.pad_id)
                c = self._counters
                c["batches"] += 1
                c["tokens"] += batch["n_tokens"]
                c["pad_tokens"] += self.batch_size * self.seq_len - batch["n_tokens"]
                for s, n in batch["stream_tokens"].items():
                    self._stream_tokens[s] = self._stream_tokens.get(s, 0) + n
                if self.log_every and c["batches"] % self.log_every == 0:
                    self._log_mix()
                yield batch
        finally:
            docs.close()

    def close(self) -> None:
        """Stop the worker processes of the current iteration (the state stays as it is)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    # ------------------------------------------------------------------ reporting
    def targets(self) -> dict[str, float]:
        """Target token share per stream: the mixing weights, or the manifest's token shares."""
        if self.weights:
            return dict(self.weights)
        streams = (self.manifest or {}).get("streams", {})
        total = sum(int(v.get("tokens", 0)) for v in streams.values())
        return {s: int(v.get("tokens", 0)) / total for s, v in sorted(streams.items())} if total else {}

    def realised_mix(self) -> dict[str, dict[str, float]]:
        """Per stream: non-pad tokens delivered in batches so far, their share, and the target share."""
        total = sum(self._stream_tokens.values())
        targets = self.targets()
        out = {}
        for s in sorted(set(targets) | set(self._stream_tokens)):
            n = self._stream_tokens.get(s, 0)
            out[s] = {"tokens": n, "share": n / total if total else 0.0, "target": targets.get(s, 0.0)}
        return out

    def stats(self) -> dict[str, Any]:
        """Counters: batches, documents, tokens, packing efficiency (non-pad fraction), skips, epochs."""
        c = dict(self._counters)
        slots = c["tokens"] + c["pad_tokens"]
        c["efficiency"] = c["tokens"] / slots if slots else 0.0
        c["splits"] = self.packer.splits
        # Skips before a resume on another layout, which starts the worker records afresh.
        c["skipped_shards"] = c.pop("earlier_skipped_shards", 0) + sum(
            r["skipped_shards"] for r in self._records
        )
        c["skipped_samples"] = c.pop("earlier_skipped_samples", 0) + sum(
            r["skipped_samples"] for r in self._records
        )
        c["epochs"] = self.epochs()
        return c

    def epochs(self) -> dict[str, int]:
        """Per stream ('*' for the natural mix), the oldest epoch any of this rank's workers is in."""
        start = self._start_epochs or {}
        streams = list(self.weights) if self.weights else ["*"]
        return {s: min(int(r["epochs"].get(s, start.get(s, 0))) for r in self._records) for s in streams}

    def _log_mix(self) -> None:
        parts = [f"{s} {v['share']:.3f} (target {v['target']:.3f})" for s, v in self.realised_mix().items()]
        st = self.stats()
        log.info(
            "loader rank %d after %d batches: mix %s; non-pad %.2f%%; skipped %d shard(s), %d sample(s)",
            self.rank,
            st["batches"],
            ", ".join(parts),
            100 * st["efficiency"],
            st["skipped_shards"],
            st["skipped_samples"],
        )

    # ------------------------------------------------------------------ state
    def _layout(self) -> dict[str, Any]:
        """What must match for an exact resume."""
        if self.manifest and self.manifest.get("content_hash"):
            shards = str(self.manifest["content_hash"])
        else:
            names = "\n".join(os.path.basename(u.rstrip(" -|")) for u in self.urls)
            shards = hashlib.sha256(names.encode()).hexdigest()[:16]
        return {
            "world_size": self.world_size,
            "num_workers": self._W,
            "seed": self.seed,
            "streams": sorted(self.weights) if self.weights else None,
            "shards": f"{shards}/{len(self.urls)}",
            "chunk_docs": self.chunk_docs,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, taken between batches."""
        return copy.deepcopy(
            {
                "format": STATE_FORMAT,
                "rank": self.rank,
                "layout": self._layout(),
                "weights": self.weights,
                "rotation": self._rotation,
                "start_epochs": self._start_epochs,
                "workers": self._records,
                "packer": self.packer.state_dict(),
                "counters": self._counters,
                "stream_tokens": self._stream_tokens,
            }
        )

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Resume from ``state_dict()`` of this rank, or from the list of every rank's states.

        With the same layout (world size, workers, seed, streams, shards) the next batch is exactly the
        one after the batch the state was taken at. Otherwise the loader warns and restarts each
        stream at the start of the oldest epoch any saved worker was in.
        """
        self.close()
        states = state if isinstance(state, list) else [state]
        for s in states:
            if s.get("format") != STATE_FORMAT:
                raise ValueError(f"loader state format {s.get('format')!r}, this loader reads {STATE_FORMAT}")
        mine = [s for s in states if s["rank"] == self.rank]
        layout = self._layout()
        if mine and mine[0]["layout"] == layout:
            s = mine[0]
            self._records = copy.deepcopy(s["workers"])
            if s["weights"] != self.weights:
                # Same streams, new weights (e.g. a later phase): positions and buffers are kept; the
                # per-worker token counters restart so the new weights apply from here on smoothly.
                log.warning(
                    "loader mixing weights changed from %s to %s: shard positions kept, mixing counters "
                    "restart (documents pulled since each worker's last snapshot may differ)",
                    s["weights"],
                    self.weights,
                )
                for rec in self._records:
                    if rec["snapshot"] is not None:
                        rec["snapshot"]["tokens"] = dict.fromkeys(rec["snapshot"]["tokens"], 0)
            self._rotation = int(s["rotation"])
            self._start_epochs = s["start_epochs"]
            self.packer.load_state_dict(s["packer"])
            self._counters = dict(s["counters"])
            self._stream_tokens = dict(s["stream_tokens"])
            return
        self._restart_at_epoch(states, mine[0] if mine else states[0], layout)

    def _restart_at_epoch(self, states: list[dict], own: dict, layout: dict) -> None:
        saved = own["layout"]
        changed = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
        if not changed and own["rank"] != self.rank:
            changed = {"rank": (own["rank"], self.rank)}
        epochs: dict[str, int] = {}
        for s in states:
            for rec in s["workers"]:
                for stream, e in rec["epochs"].items():
                    epochs[stream] = min(epochs.get(stream, e), int(e))
        if self.weights:
            start = {s: epochs.get(s, 0) for s in self.weights}
        else:
            start = {"*": min(epochs.values(), default=0)}
        packer = own["packer"]
        held_rows = len(packer.get("ready", []))
        held_pieces = len(packer.get("buffer", packer.get("row", [])))
        log.warning(
            "loader state was saved with a different layout (%s): the shard-to-worker assignment is not "
            "the same, so the exact position cannot be kept. Restarting at epoch granularity: stream "
            "epochs %s start over from their first shard (samples of those epochs already seen are seen "
            "again), and the saved shuffle/packer buffers are dropped (%d finished row(s), %d buffered "
            "piece(s)); mixing counters and token totals carry over.",
            ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
            start,
            held_rows,
            held_pieces,
        )
        self._records = [self._fresh_record() for _ in range(self._W)]
        self._rotation = 0
        self._start_epochs = start
        self._counters = dict(own["counters"])
        self._stream_tokens = dict(own["stream_tokens"])
        # Skip counts survive the fresh records: given every saved rank's state, rank 0 takes them
        # all, so the sum over ranks stays the run's total; given its own, a rank keeps its own.
        own_only = len(states) == 1
        for kind in ("shards", "samples"):
            total = sum(
                int(s["counters"].get(f"earlier_skipped_{kind}", 0))
                + sum(int(rec[f"skipped_{kind}"]) for rec in s["workers"])
                for s in states
            )
            self._counters[f"earlier_skipped_{kind}"] = total if own_only or self.rank == 0 else 0


# ----------------------------------------------------------------------------------- builder
def build_loader(settings: LoaderSettings, rank: int, world_size: int) -> PackedLoader:
    """One rank's loader over the shards ``settings.shards`` names (see ``loader_settings(cfg)``)."""
    urls, manifest = resolve_shards(settings.shards)
    return PackedLoader(urls, settings, manifest=manifest, rank=rank, world_size=world_size)
