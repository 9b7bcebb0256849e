"""Documents out of webdataset shards, for one loader worker, resumable to the exact document.

Layers, bottom up (tar reading itself is ``cprec.stream.tars``):

- ``ShardChecks``: what a reader verifies - each shard's sha256 and every document's token ids
  against the vocabulary (``0 <= id < vocab_size``). A sha256 is only known at the end of its
  shard, and a document handed out cannot be taken back, so a shard with a sha256 is read into
  memory first (hashed as it is read: still one pass over the bytes) and parsed only once it
  matched: no document of a corrupt shard ever reaches training, for one shard's bytes in memory
  per reader (a reused buffer; keep ``data.shard_max_bytes`` moderate, 64 MB by default; with
  mixing weights a worker has one reader per stream). Holding back decoded documents instead
  would cost ~3x more (tens of thousands of live Python objects per shard); the net effect of
  verification on the loader is measured by ``benchmarks/loader.py --only verify``. Any failure - mismatch,
  truncation, bad header - drops the whole shard (``on_corrupt``: fail raises, skip counts it). A
  bad document (out-of-vocabulary ids, bad meta) is a sample error: skip counts the sample, fail
  raises a ``ShardError`` naming shard and sample. Shards without a sha256 (no manifest, or
  ``train.loader.verify=false``) are streamed as before, up to the point where they break.
- ``epoch_units``: which shards each of the ``world_size x num_workers`` global workers reads in an
  epoch. Shards are permuted with a seed per epoch and dealt round-robin; shards left over after the
  last full round are split at sample level (sample ``j`` of the shard to part ``j % parts``), so
  every sample is read by exactly one worker and the workers' shares differ by at most one part.
- ``StreamReader``: one worker's documents of one stream (or of all streams), epoch after epoch,
  through a seeded shuffle buffer. Its cursor (epoch, unit, sample offset), the positions of the
  documents in its shuffle buffer and its RNG state form its ``state_dict``; loading it re-reads
  the buffered documents from their shards.
- ``WorkerSource``: the worker's document stream; with mixing weights, one reader per stream and a
  token-deficit scheduler (next stream = the one furthest below its weight in tokens delivered).

The worker processes and the resume protocol around ``WorkerSource`` are in ``cprec.stream.loader``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from cprec.stream.tars import SampleError, ShardBuffer, ShardError, decode_ids, decode_meta, iter_tar_samples

log = logging.getLogger(__name__)


class EmptyStream(RuntimeError):
    """A reader went through a whole epoch of its shards without finding one document."""


class ShardChecks(NamedTuple):
    """What readers verify; ``None`` entries are not checked (no manifest, or not listed there)."""

    sha256: tuple[str | None, ...]
    """Expected sha256 hex digest per shard URL (same order as the URLs)."""
    vocab_size: int | None
    """Token ids must be in ``[0, vocab_size)``."""


@dataclass(frozen=True)
class ReadPlan:
    """What every reader of one rank's loader shares, fixed for the loader's life (derived from its
    ``LoaderSettings`` and the manifest by ``PackedLoader``; pickled into each worker process)."""

    urls: tuple[str, ...]
    """Shard URLs, in manifest order."""
    n_global: int
    """Readers over all ranks: ``world_size x num_workers``."""
    seed: int
    """Seed of the shard permutation and the shuffle buffers."""
    shuffle_buffer: int
    """Documents per reader's shuffle buffer."""
    on_corrupt: str
    """fail or skip, for a bad shard or sample."""
    checks: ShardChecks | None = None
    """sha256 and vocabulary checks (None: read unverified)."""
    weights: dict[str, float] | None = None
    """Normalised token weight per stream; None = the natural mix (one reader over all streams)."""


class Doc(NamedTuple):
    """One tokenized document and where it came from."""

    tokens: np.ndarray
    stream: str
    key: str
    epoch: int
    unit: int
    offset: int


class Chunk(NamedTuple):
    """What a worker hands to the main process: consecutive documents of its sequence."""

    worker: int
    start: int
    """Worker sequence number of ``docs[0]``."""
    snapshot: dict | None
    """Worker state just before ``docs[0]`` (only on chunks starting at a multiple of chunk_docs)."""
    docs: list[Doc]
    skipped_shards: int
    skipped_samples: int
    skipped_names: list[str]


def seed_int(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_VOCAB_BATCH = 64  # documents per vocabulary check


def _ids_in_vocab(tokens: np.ndarray, vocab: int) -> bool:
    """All ids in ``[0, vocab)``; one pass for int32 (negatives wrap to huge unsigned values)."""
    if not len(tokens):
        return True
    if tokens.dtype == np.int32:
        return int(tokens.view(np.uint32).max()) < vocab
    return int(tokens.min()) >= 0 and int(tokens.max()) < vocab


def _vocab_checked(items: list, vocab: int | None, url: str) -> list:
    """``items`` with each document holding an id outside ``[0, vocab)`` replaced by its error."""
    docs = [d for _, d in items if isinstance(d, Doc)]
    if not vocab or not docs or _ids_in_vocab(np.concatenate([d.tokens for d in docs]), vocab):
        return items
    out = []
    for j, d in items:
        if isinstance(d, Doc) and not _ids_in_vocab(d.tokens, vocab):
            bad = d.tokens[(d.tokens < 0) | (d.tokens >= vocab)]
            d = SampleError(
                f"shard {url} sample {d.key}: {len(bad)} token id(s) outside the vocabulary "
                f"[0, {vocab}) of the manifest (first: {int(bad[0])})"
            )
        out.append((j, d))
    return out


# ------------------------------------------------------------------------- shard assignment
def epoch_units(n_shards: int, n_global: int, seed: int, epoch: int) -> list[list[tuple[int, int, int]]]:
    """Per global worker, the ``(shard, part, parts)`` units it reads in ``epoch``, in order.

    ``parts == 1`` means the whole shard; otherwise the unit is the shard's samples ``j`` with
    ``j % parts == part``.
    """
    perm = np.random.default_rng(seed_int(seed, "shards", epoch)).permutation(n_shards).tolist()
    whole = n_shards - n_shards % n_global
    units = [(s, 0, 1) for s in perm[:whole]]
    rest = perm[whole:]
    if rest:
        parts = -(-n_global // len(rest))
        units += [(s, p, parts) for s in rest for p in range(parts)]
    return [units[g::n_global] for g in range(n_global)]


# ------------------------------------------------------------------------------ one stream
class StreamReader:
    """One global worker's documents of one stream (``stream=None``: all), shuffled, epoch after epoch."""

    def __init__(self, plan: ReadPlan, worker: int, stream: str | None, start_epoch: int = 0):
        self.urls, self.worker, self.n_global, self.seed = plan.urls, worker, plan.n_global, plan.seed
        self.stream, self.buffer_size, self.on_corrupt = stream, plan.shuffle_buffer, plan.on_corrupt
        self.checks = plan.checks
        self._shard_buffer = ShardBuffer()
        self.rng = random.Random(seed_int(plan.seed, "shuffle", worker, stream))
        self.epoch, self.unit, self.offset = start_epoch, 0, 0
        self.exhausted = False
        self.epoch_docs = 0
        self.buffer: list[Doc] = []
        self._pos: list[int] = []  # (unit, offset) of each buffered document, flat: the buffer's state
        self.skipped_shards = 0
        self.skipped_samples = 0
        self.skipped_names: list[str] = []
        self._it: Iterator | None = None
        self._units_cache: tuple[int, list] | None = None

    def _units(self) -> list[tuple[int, int, int]]:
        if self._units_cache is None or self._units_cache[0] != self.epoch:
            units = epoch_units(len(self.urls), self.n_global, self.seed, self.epoch)[self.worker]
            self._units_cache = (self.epoch, units)
        return self._units_cache[1]

    def _unit_docs(self, unit: int, start: int) -> Iterator[tuple[int, Doc | SampleError]]:
        """``(sample number, document or its error)`` of this stream in ``unit`` from ``start`` on.

        With a sha256 for the shard nothing comes out unless the whole file matched it. Token ids
        are checked against the vocabulary a batch of documents at a time (one numpy reduction per
        batch instead of one per document, which would cost several % of the loader's speed).
        """
        shard, part, parts = self._units()[unit]
        url = self.urls[shard]
        sha = self.checks.sha256[shard] if self.checks else None
        vocab = self.checks.vocab_size if self.checks else None
        pending: list[tuple[int, Doc | SampleError]] = []
        try:
            for j, (key, sample) in enumerate(iter_tar_samples(url, sha, self._shard_buffer)):
                if j < start or j % parts != part:
                    continue
                try:
                    doc = self._decode(unit, url, j, key, sample)
                except SampleError as exc:
                    pending.append((j, exc))
                    continue
                if doc is not None:
                    pending.append((j, doc))
                    if len(pending) >= _VOCAB_BATCH:
                        yield from _vocab_checked(pending, vocab, url)
                        pending = []
        except Exception:
            yield from _vocab_checked(pending, vocab, url)  # what was read before a truncation
            raise
        yield from _vocab_checked(pending, vocab, url)

    def _decode(self, unit: int, url: str, j: int, key: str, sample: dict) -> Doc | None:
        where = f"shard {url} sample {key}"
        meta = decode_meta(sample, where)
        if self.stream is not None and meta["stream"] != self.stream:
            return None
        tokens = decode_ids(sample["ids.npy"], where)
        if "n_tokens" in meta and int(meta["n_tokens"]) != len(tokens):
            raise SampleError(f"{where}: json n_tokens={meta['n_tokens']} but ids.npy has {len(tokens)}")
        return Doc(tokens, meta["stream"], key, self.epoch, unit, j)

    def _corrupt(self, what: str, exc: Exception, sample: bool) -> None:
        if self.on_corrupt == "fail":
            if isinstance(exc, ShardError):
                raise exc
            if isinstance(exc, SampleError):  # names shard and sample
                raise ShardError(str(exc)) from exc
            raise ShardError(f"corrupt or missing shard {what}: {type(exc).__name__}: {exc}") from exc
        if sample:
            self.skipped_samples += 1
            log.warning("skipping bad sample (%s); %d sample(s) skipped so far", exc, self.skipped_samples)
        else:
            self.skipped_shards += 1
            self.skipped_names = (self.skipped_names + [what])[-5:]
            log.warning(
                "skipping corrupt or missing shard %s (epoch %d, worker %d): %s; %d shard(s) skipped so far",
                what,
                self.epoch,
                self.worker,
                exc,
                self.skipped_shards,
            )

    def _read_one(self) -> Doc | None:
        """Next document at the cursor, or None at the end of this epoch's units."""
        while True:
            units = self._units()
            if self.unit >= len(units):
                return None
            if self._it is None:
                self._it = self._unit_docs(self.unit, self.offset)
            try:
                j, doc = next(self._it)
            except StopIteration:
                self._it, self.unit, self.offset = None, self.unit + 1, 0
                continue
            except Exception as exc:  # missing file, truncated tar, sha256 mismatch, failed pipe:, ...
                self._it = None
                self._corrupt(self.urls[units[self.unit][0]], exc, sample=False)
                self.unit, self.offset = self.unit + 1, 0
                continue
            self.offset = j + 1
            if isinstance(doc, SampleError):
                self._corrupt(str(doc), doc, sample=True)
                continue
            return doc

    def next(self) -> Doc:
        """The next document; raises ``EmptyStream`` if a whole epoch held none."""
        while True:
            while not self.exhausted and len(self.buffer) < self.buffer_size:
                doc = self._read_one()
                if doc is None:
                    self.exhausted = True
                    break
                self.buffer.append(doc)
                self._pos += (doc.unit, doc.offset)
            if self.buffer:
                i = self.rng.randrange(len(self.buffer))
                doc = self.buffer[i]
                self.buffer[i] = self.buffer[-1]
                self.buffer.pop()
                self._pos[2 * i : 2 * i + 2] = self._pos[-2:]
                del self._pos[-2:]
                self.epoch_docs += 1
                return doc
            # The buffer drains at the end of each epoch, so epochs never mix.
            if self.epoch_docs == 0:
                raise EmptyStream(
                    f"worker {self.worker}: no document of stream {self.stream or 'any'} in its "
                    f"{len(self._units())} shard unit(s) of epoch {self.epoch}"
                )
            self.epoch, self.unit, self.offset = self.epoch + 1, 0, 0
            self.exhausted, self.epoch_docs = False, 0

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "epoch": self.epoch,
            "unit": self.unit,
            "offset": self.offset,
            "exhausted": self.exhausted,
            "epoch_docs": self.epoch_docs,
            "rng": [version, list(internal), gauss],
            "buffer": list(self._pos),  # flat (unit, offset) pairs
            "skipped_shards": self.skipped_shards,
            "skipped_samples": self.skipped_samples,
            "skipped_names": list(self.skipped_names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor and RNG, and re-read the documents of the shuffle buffer."""
        self.epoch, self.unit, self.offset = int(state["epoch"]), int(state["unit"]), int(state["offset"])
        self.exhausted, self.epoch_docs = bool(state["exhausted"]), int(state["epoch_docs"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.skipped_shards = int(state["skipped_shards"])
        self.skipped_samples = int(state["skipped_samples"])
        self.skipped_names = list(state.get("skipped_names", []))
        self._it = None
        flat = [int(x) for x in state["buffer"]]
        positions = list(zip(flat[::2], flat[1::2]))
        found: dict[tuple[int, int], Doc] = {}
        units = self._units()
        for u in sorted({u for u, _ in positions}):
            wanted = {o for uu, o in positions if uu == u}
            it = self._unit_docs(u, min(wanted))
            try:
                for j, doc in it:
                    if j in wanted:
                        if isinstance(doc, SampleError):
                            raise doc
                        found[(u, j)] = doc
                        wanted.discard(j)
                        if not wanted:
                            break
            except Exception as exc:
                raise ShardError(
                    f"cannot restore the shuffle buffer from shard {self.urls[units[u][0]]}: {exc}"
                ) from exc
            finally:
                it.close()
        missing = [p for p in positions if p not in found]
        if missing:
            u, o = missing[0]
            raise ShardError(
                f"cannot restore the shuffle buffer: sample #{o} of shard {self.urls[units[u][0]]} "
                f"is gone or changed ({len(missing)} missing); were the shards rewritten?"
            )
        self.buffer = [found[p] for p in positions]
        self._pos = flat


# ---------------------------------------------------------------------------- one worker
class WorkerSource:
    """A global worker's document stream: natural order, or mixed by weight over per-stream readers."""

    def __init__(self, plan: ReadPlan, worker: int, start_epochs: dict[str, int] | None = None):
        self.worker = worker
        self.weights = dict(plan.weights) if plan.weights else {"*": 1.0}
        start_epochs = start_epochs or {}
        self.readers = {
            s: StreamReader(plan, worker, None if s == "*" else s, int(start_epochs.get(s, 0)))
            for s in self.weights
        }
        self.tokens = {s: 0 for s in self.weights}
        self.inactive: list[str] = []
        self.seq = 0

    def next(self) -> Doc | None:
        """The next document, or None when none of this worker's streams has any document."""
        while True:
            active = [s for s in self.weights if s not in self.inactive]
            if not active:
                return None
            # Token-deficit scheduling: exact token shares without a random walk, no RNG state.
            stream = min(active, key=lambda s: self.tokens[s] / self.weights[s])
            try:
                doc = self.readers[stream].next()
            except EmptyStream as exc:
                self.inactive.append(stream)
                if len(self.weights) > 1:
                    log.warning("%s; its weight goes to this worker's other streams", exc)
                else:
                    log.warning("%s; this worker stops", exc)
                continue
            self.tokens[stream] += len(doc.tokens)
            self.seq += 1
            return doc

    def skipped(self) -> tuple[int, int, list[str]]:
        rs = self.readers.values()
        names = [n for r in rs for n in r.skipped_names][-5:]
        return sum(r.skipped_shards for r in rs), sum(r.skipped_samples for r in rs), names

    def state_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "tokens": dict(self.tokens),
            "inactive": list(self.inactive),
            "readers": {s: r.state_dict() for s, r in self.readers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state["readers"]) != sorted(self.readers):
            raise ValueError(
                f"worker state has streams {sorted(state['readers'])}, expected {sorted(self.readers)}"
            )
        self.seq = int(state["seq"])
        self.tokens = {s: int(v) for s, v in state["tokens"].items()}
        self.inactive = list(state["inactive"])
        for s, r in self.readers.items():
            r.load_state_dict(state["readers"][s])
