"""Documents out of webdataset shards, for one loader worker, resumable to the exact document.

Layers, bottom up:

- ``iter_tar_samples(url)``: a small streaming tar reader (local path, ``file:``, ``pipe:``, http via
  ``webdataset.gopen``) that groups members into webdataset samples. Python's ``tarfile`` reads
  ~5k samples/s; parsing the 512-byte headers directly is ~30x faster, and reading is the loader's
  hot path. A short read, a bad header checksum or a missing end-of-archive marker raises
  ``ShardError``, so a truncated shard is never mistaken for a short one. Given the manifest's
  sha256 it first reads the file into a ``ShardBuffer`` (hashed as read: no second read) and
  raises ``ShardError`` before any sample when they differ; the header checksums are then skipped,
  the sha256 covering every byte of them.
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

The worker processes and the resume protocol around ``WorkerSource`` are in ``cprec.data.loader``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import webdataset

log = logging.getLogger(__name__)

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ_SIZE = 1 << 20


class ShardError(RuntimeError):
    """A shard is missing, truncated or malformed (the message names it)."""


class _Truncated(ShardError):
    """The shard ended early."""


class SampleError(ValueError):
    """One sample in a shard is malformed (the message names shard and key)."""


class EmptyStream(RuntimeError):
    """A reader went through a whole epoch of its shards without finding one document."""


class ShardChecks(NamedTuple):
    """What readers verify; ``None`` entries are not checked (no manifest, or not listed there)."""

    sha256: tuple[str | None, ...]
    """Expected sha256 hex digest per shard URL (same order as the URLs)."""
    vocab_size: int | None
    """Token ids must be in ``[0, vocab_size)``."""


class _HashingReader:
    """A read-only stream that feeds every byte read into a sha256."""

    def __init__(self, stream):
        self.stream = stream
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.hash.update(data)
        return data

    def close(self) -> None:
        self.stream.close()


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


# ------------------------------------------------------------------------------ reading tars
def _refill(stream, buf: bytes, pos: int, need: int) -> bytes:
    """``buf[pos:]`` plus big reads from ``stream`` until it holds ``need`` bytes (fewer at EOF).

    Big reads matter: ``pipe:`` streams poll their subprocess on every read.
    """
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < need:
        block = stream.read(max(_READ_SIZE, need - have))
        if not block:
            break
        parts.append(block)
        have += len(block)
    return b"".join(parts)


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ")
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    if b" path=" not in data:
        return None
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def open_url(url: str):
    """Open a shard for reading: a path, ``file:``, ``pipe:cmd`` or anything ``webdataset.gopen`` knows."""
    stream = webdataset.gopen(url, "rb")
    if url.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream)
    return stream


def iter_tar_samples(
    url: str, sha256: str | None = None, buffer: ShardBuffer | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` per sample, grouping members as webdataset does.

    The key is the member path up to the first dot of its base name; members without a dot in their
    base name are skipped, as webdataset does. With ``sha256`` the file is read into ``buffer`` (a
    reader's reusable ``ShardBuffer``; a new one if None) first and a mismatch raises
    ``ShardError`` before any sample is yielded.
    """
    buf, pos = ((buffer or ShardBuffer()).fill(url, sha256), 0) if sha256 else (b"", 0)
    stream = _Drained() if sha256 else open_url(url)
    check_headers = not sha256
    try:
        key: str | None = None
        sample: dict[str, bytes] = {}
        long_name: str | None = None
        n_members = 0
        while True:
            if pos + _BLOCK > len(buf):
                buf, pos = _refill(stream, buf, pos, _BLOCK), 0
                if len(buf) < _BLOCK:
                    raise _Truncated(
                        f"shard {url}: truncated (ends without the tar end-of-archive marker "
                        f"after {n_members} members)"
                    )
            end = pos + _BLOCK
            header = bytes(buf[pos:end])  # no copy when buf is bytes
            if header[0] == 0 and header == _ZERO_BLOCK:
                break
            typeflag = header[156:157]
            # Magic on every header; the checksum on file headers (a damaged pax/long-name header
            # misaligns what follows, which the next magic check catches) unless the whole file
            # matched its sha256, which covers every header byte (and summing 512 bytes twice per
            # sample costs more than hashing them).
            if header[257:262] != b"ustar" or (
                check_headers
                and typeflag in (b"0", b"\0")
                and _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32
            ):
                raise ShardError(f"shard {url}: bad tar header after {n_members} members")
            size = _octal(header[124:136])
            stop = end + size + (-size % _BLOCK)  # data and its padding to a full block
            if stop > len(buf):
                buf = _refill(stream, buf, pos, stop - pos)
                pos, end, stop = 0, _BLOCK, stop - pos
                if stop > len(buf):
                    raise _Truncated(
                        f"shard {url}: truncated inside member {n_members} ({len(buf) - _BLOCK}/{size} bytes)"
                    )
            data = bytes(buf[end : end + size])
            pos = stop
            n_members += 1
            if typeflag == b"L":  # GNU long name for the next member
                long_name = data.rstrip(b"\0").decode("utf-8")
                continue
            if typeflag == b"x":  # pax header for the next member
                long_name = _pax_path(data) or long_name
                continue
            if typeflag not in (b"0", b"\0", b"7"):
                continue
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                if header[345]:  # ustar prefix field
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
            dirname, _, base = name.rpartition("/")
            if "." not in base:  # no extension: not part of a sample (as in webdataset)
                continue
            stem, _, ext = base.partition(".")
            member_key = f"{dirname}/{stem}" if dirname else stem
            if member_key != key:
                if key is not None:
                    yield key, sample
                key, sample = member_key, {}
            if ext.lower() in sample:
                raise ShardError(f"shard {url}: duplicate member {name}")
            sample[ext.lower()] = data
        if key is not None:
            yield key, sample
    except GeneratorExit:  # the reader stopped early: a pipe: command killed by SIGPIPE is no error
        _close_quietly(stream)
        raise
    except _Truncated:
        # A pipe: command that failed (missing object, no access) looks like a short stream: report
        # the command's failure, which says why.
        try:
            stream.close()
        except Exception as exc:
            raise ShardError(f"shard {url}: {exc}") from exc
        raise
    except BaseException:
        _close_quietly(stream)
        raise
    else:
        stream.close()  # a pipe: reports its command's failure here


class _Drained:
    """The stream of a shard already read into memory: at its end."""

    def read(self, n: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class ShardBuffer:
    """One shard's bytes in memory, verified against its sha256 before anything is parsed.

    A sha256 is only known at the end of the file, and a sample handed out cannot be taken back, so
    a verified shard is read whole first - in 1 MB blocks, each hashed while still in the CPU cache
    and copied into this buffer, which is reused from shard to shard (a fresh shard-sized
    allocation each time would cost its page faults again). Still one pass over the bytes.
    """

    def __init__(self):
        self._buf = bytearray()

    def fill(self, url: str, sha256: str) -> memoryview:
        """The file's bytes, or ``ShardError`` when their sha256 is not ``sha256``."""
        stream = _HashingReader(open_url(url))
        n = 0
        try:
            while block := stream.read(_READ_SIZE):
                try:
                    self._buf[n : n + len(block)] = block
                except BufferError:  # growing while a view of the last shard is alive: a new buffer
                    self._buf = bytearray(self._buf[:n]) + block
                n += len(block)
            stream.close()  # a pipe: reports its command's failure here
        except BaseException:
            _close_quietly(stream)
            raise
        got = stream.hash.hexdigest()
        if got != sha256:
            raise ShardError(
                f"shard {url}: sha256 {got} of its {n} bytes does not match the manifest's "
                f"{sha256} (the file is corrupt, truncated or changed after it was prepared)"
            )
        return memoryview(self._buf)[:n]


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


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


_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': False, 'shape': \((\d+),\), \}"
)


def decode_ids(data: bytes, where: str) -> np.ndarray:
    """``ids.npy`` bytes -> 1-D integer array (header parsed by hand: ``np.load`` costs ~40 us)."""
    if data[:6] != b"\x93NUMPY":
        raise SampleError(f"{where}: ids.npy is not a .npy file")
    start = 10 if data[6] == 1 else 12
    hlen = int.from_bytes(data[8:start], "little")
    m = _NPY_HEADER.match(data[start : start + hlen])
    if m:
        dtype = np.dtype(m.group(1).decode())
        arr = np.frombuffer(data, dtype=dtype, count=int(m.group(2)), offset=start + hlen)
    else:
        import io

        arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise SampleError(f"{where}: ids.npy must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr


def decode_meta(sample: dict[str, bytes], where: str) -> dict:
    if "json" not in sample or "ids.npy" not in sample:
        raise SampleError(f"{where}: sample needs ids.npy and json, has {sorted(sample)}")
    try:
        meta = json.loads(sample["json"])
        meta["stream"] = f"{meta['domain']}/{meta['kind']}"
    except (ValueError, KeyError, TypeError) as exc:
        raise SampleError(f"{where}: bad json meta ({exc})") from None
    return meta


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

    def __init__(
        self,
        urls: list[str],
        worker: int,
        n_global: int,
        seed: int,
        stream: str | None,
        buffer_size: int,
        on_corrupt: str,
        start_epoch: int = 0,
        checks: ShardChecks | None = None,
    ):
        self.urls, self.worker, self.n_global, self.seed = urls, worker, n_global, seed
        self.stream, self.buffer_size, self.on_corrupt = stream, buffer_size, on_corrupt
        self.checks = checks
        self._shard_buffer = ShardBuffer()
        self.rng = random.Random(seed_int(seed, "shuffle", worker, stream))
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

    def __init__(
        self,
        urls: list[str],
        worker: int,
        n_global: int,
        seed: int,
        weights: dict[str, float] | None,
        buffer_size: int,
        on_corrupt: str,
        start_epochs: dict[str, int] | None = None,
        checks: ShardChecks | None = None,
    ):
        self.worker = worker
        self.weights = dict(weights) if weights else {"*": 1.0}
        start_epochs = start_epochs or {}
        self.readers = {
            s: StreamReader(
                urls,
                worker,
                n_global,
                seed,
                None if s == "*" else s,
                buffer_size,
                on_corrupt,
                int(start_epochs.get(s, 0)),
                checks,
            )
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
