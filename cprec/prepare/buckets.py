"""Events partitioned by user into bucket files, out of core: the first step of the distributed path.

Leave-one-out, duplicates and ``min_interactions`` are decided per user, so a job that gives every
user's events to exactly one task can clean, split, render and shard each bucket on its own
(``cprec.prepare.distributed``). ``BucketWriter`` takes the readers' events (it has the interface of
``schema.InteractionsBuilder``, so every reader works unchanged, with its bad-record accounting) and
streams them, a batch of ``flush_rows`` at a time, into one Parquet dataset partitioned by
``bucket=<b>``. A user's bucket is a function of the user id alone - the top bits of a 64-bit
BLAKE2b hash, scaled to ``n_buckets`` (``bucket_of``) - so a user is in one bucket by construction,
the same one in every run, on every machine (Python's own ``hash`` is salted per process), and
bucket ``b`` holds a contiguous range of hashes.

What stays in memory is catalogue-sized: the item, domain and file vocabularies and the per
(item, domain) summary (``schema.ItemDomainPairs``: event counts, first/last positions) that the
whole-log decisions about items need (each item's domain, which items have events). Users are
never interned here: they are as many as the events.

Why pyarrow datasets and not DuckDB or Polars: pyarrow is already a dependency (every eval file is
Parquet), ``pyarrow.dataset.write_dataset`` is exactly a streaming partitioned writer (it takes a
record-batch stream, keeps a bounded number of files open, ``preserve_order`` keeps read order in
each bucket) and a bucket reads back as one table. The events arrive from CPRec's own readers
(bad records counted per file and line), not from files a SQL engine or a dataframe library could
scan itself, so DuckDB's and Polars' strength - planning queries over raw files - would go unused,
while either would add a large dependency (and a second in-memory format) to every install.
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from cprec.prepare.schema import NO_TARGET, Interactions, ItemDomainPairs, SpilledEvents, intern

EVENT_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("user", pa.string()),
        ("item", pa.int32()),
        ("domain", pa.int32()),
        ("time", pa.float64()),
        ("order", pa.int64()),
        ("file", pa.int32()),
        ("line", pa.int64()),
        ("target", pa.int8()),
    ]
)
_COLUMNS = ("user", "item", "domain", "time", "file", "line", "target")
_DOMAIN_BITS = 20  # (item, domain) key = item << 20 | domain: a million domains is plenty
_PARTITIONING = pads.partitioning(pa.schema([("bucket", pa.int32())]), flavor="hive")


def user_hash(user: str) -> int:
    """A stable 64-bit hash of a user id (BLAKE2b of its UTF-8 bytes)."""
    return int.from_bytes(hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest(), "big")


def bucket_of(user: str, n_buckets: int) -> int:
    """The bucket of a user: its hash scaled to ``n_buckets`` (contiguous hash ranges)."""
    return (user_hash(user) * n_buckets) >> 64


def bucket_path(folder: str | Path, bucket: int) -> Path:
    return Path(folder) / f"bucket={bucket}"


class BucketWriter:
    """``InteractionsBuilder``'s interface (``add``, ``file_code``, ``len``, ``build``); events go to
    ``folder/bucket=<b>/*.parquet`` instead of memory, ``build`` returns ``SpilledEvents``.

    Batches are handed to a writer thread (``pyarrow.dataset.write_dataset`` releases the GIL while
    it encodes and writes), so parsing and writing overlap; at most two batches wait in between.
    """

    def __init__(self, folder: str | Path, n_buckets: int, flush_rows: int = 1 << 19):
        if n_buckets < 1:
            raise ValueError(f"config field 'data.buckets': must be >= 1, got {n_buckets}")
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.n_buckets = n_buckets
        self.flush_rows = flush_rows
        self._codes: dict[str, dict[str, int]] = {"item": {}, "domain": {}, "file": {}}
        self._cols: dict[str, list] = {k: [] for k in _COLUMNS}  # rows of ``add``
        self._chunks: list[dict] = []  # batches of ``add_batch`` (and sealed rows), in read order
        self._buffered = 0  # rows in _chunks
        self._n = 0
        self._pairs: dict[int, list[int]] = {}  # key -> [count, first, last, first_file, first_line]
        self._bucket_rows = np.zeros(n_buckets, dtype=np.int64)
        self._bucket_files = [set() for _ in range(n_buckets)]
        self._targets: set[int] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="cprec-bucket-writer", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------- InteractionsBuilder interface
    def _code(self, kind: str, value: str) -> int:
        codes = self._codes[kind]
        c = codes.get(value)
        if c is None:
            c = codes[value] = len(codes)
        return c

    def file_code(self, path: str | Path) -> int:
        return self._code("file", str(path))

    def add(
        self,
        user: str,
        item: str,
        domain: str,
        time: float,
        file_code: int,
        line: int,
        target: int = NO_TARGET,
    ) -> None:
        c = self._cols
        c["user"].append(user)
        c["item"].append(self._code("item", item))
        c["domain"].append(self._code("domain", domain))
        c["time"].append(time)
        c["file"].append(file_code)
        c["line"].append(line)
        c["target"].append(target)
        if self._buffered + len(c["user"]) >= self.flush_rows:
            self._flush()

    def add_batch(self, user, item, domain, time, file_code: int, line, target) -> None:
        """``add`` for a batch (``schema.InteractionsBuilder.add_batch``'s arguments)."""
        self._seal_rows()
        item, domain = intern(self._codes["item"], item), intern(self._codes["domain"], domain)
        self._chunk(user.cast(pa.string()), item, domain, time, np.full(len(user), file_code), line, target)
        if self._buffered >= self.flush_rows:
            self._flush()

    def _seal_rows(self) -> None:
        """The rows ``add`` buffered, as one chunk (so that rows and batches keep read order)."""
        c = self._cols
        if c["user"]:
            self._chunk(pa.array(c["user"], pa.string()), *(c[k] for k in _COLUMNS[1:]))
            self._cols = {k: [] for k in _COLUMNS}

    def _chunk(self, user: pa.Array, *coded) -> None:
        """Buffer one chunk: users as Arrow strings, the coded columns (``_COLUMNS[1:]``) in
        their dtypes of ``EVENT_SCHEMA``."""
        chunk = {
            k: np.asarray(v, dtype=EVENT_SCHEMA.field(k).type.to_pandas_dtype())
            for k, v in zip(_COLUMNS[1:], coded)
        }
        self._chunks.append({"user": user, **chunk})
        self._buffered += len(user)

    def __len__(self) -> int:
        return self._n + self._buffered + len(self._cols["user"])

    def build(self) -> SpilledEvents:
        """Write what is buffered, wait for the writer, and describe the spilled events."""
        self._flush()
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(
                f"writing bucket files under {self.folder} failed: {self._error}"
            ) from self._error
        keys = np.array(sorted(self._pairs), dtype=np.int64)
        vals = np.array([self._pairs[k] for k in keys.tolist()], dtype=np.int64).reshape(-1, 5)
        pairs = ItemDomainPairs(
            item=(keys >> _DOMAIN_BITS).astype(np.int32),
            domain=(keys & ((1 << _DOMAIN_BITS) - 1)).astype(np.int32),
            count=vals[:, 0],
            first=vals[:, 1],
            last=vals[:, 2],
            first_file=vals[:, 3].astype(np.int32),
            first_line=vals[:, 4],
        )
        return SpilledEvents(
            folder=self.folder,
            n_buckets=self.n_buckets,
            n_rows=self._n,
            items=list(self._codes["item"]),
            domains=list(self._codes["domain"]),
            files=list(self._codes["file"]),
            pairs=pairs,
            bucket_rows=self._bucket_rows.copy(),
            bucket_files=[sorted(s) for s in self._bucket_files],
            targets_seen=np.array(sorted(self._targets), dtype=np.int8),
        )

    # ---------------------------------------------------------------------------------- writing
    def _flush(self) -> None:
        self._seal_rows()
        if not self._chunks:
            return
        chunks, self._chunks, n, self._buffered = self._chunks, [], self._buffered, 0
        col = {k: np.concatenate([ch[k] for ch in chunks]) for k in _COLUMNS if k != "user"}
        users = pa.concat_arrays([ch["user"] for ch in chunks])
        enc = users.dictionary_encode()  # a user's bucket is hashed once per batch
        distinct = enc.dictionary.to_pylist()
        of_user = np.fromiter(
            ((user_hash(u) * self.n_buckets) >> 64 for u in distinct), np.int32, len(distinct)
        )
        bucket = of_user[enc.indices.to_numpy(zero_copy_only=False)]
        order = np.arange(self._n, self._n + n, dtype=np.int64)
        self._summarise(col["item"], col["domain"], col["file"], col["line"], order)
        self._bucket_rows += np.bincount(bucket, minlength=self.n_buckets)
        n_files = len(self._codes["file"])
        pair = np.flatnonzero(np.bincount(bucket.astype(np.int64) * n_files + col["file"]))
        for b, f in zip((pair // n_files).tolist(), (pair % n_files).tolist()):
            self._bucket_files[b].add(f)
        self._targets.update(np.unique(col["target"]).tolist())
        batch = pa.record_batch(
            [
                pa.array(bucket),
                users,
                pa.array(col["item"]),
                pa.array(col["domain"]),
                pa.array(col["time"]),
                pa.array(order),
                pa.array(col["file"]),
                pa.array(col["line"]),
                pa.array(col["target"]),
            ],
            schema=EVENT_SCHEMA,
        )
        self._n += n
        self._put(batch)

    def _summarise(self, item, domain, file, line, order) -> None:
        """Fold a batch into the per (item, domain) counts and first/last positions."""
        n_domains = max(len(self._codes["domain"]), 1)
        if len(self._codes["item"]) * n_domains <= 4 * len(item):  # dense pair index: no sort
            key = item.astype(np.int64) * n_domains + domain
            counts = np.bincount(key)
            uniq = np.flatnonzero(counts)
            at = np.arange(len(key))
            first = np.full(len(counts), len(key), np.int64)
            np.minimum.at(first, key, at)
            last = np.full(len(counts), -1, np.int64)
            np.maximum.at(last, key, at)
            first, last, counts = first[uniq], last[uniq], counts[uniq]
            uniq = ((uniq // n_domains) << _DOMAIN_BITS) | (uniq % n_domains)
        else:
            key = (item.astype(np.int64) << _DOMAIN_BITS) | domain
            uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
            _, last_rev = np.unique(key[::-1], return_index=True)
            last = len(key) - 1 - last_rev
        pairs = self._pairs
        for k, f, n, la in zip(uniq.tolist(), first.tolist(), counts.tolist(), last.tolist()):
            rec = pairs.get(k)
            if rec is None:
                pairs[k] = [n, int(order[f]), int(order[la]), int(file[f]), int(line[f])]
            else:
                rec[0] += n
                rec[2] = int(order[la])

    def _put(self, batch) -> None:
        while True:  # a writer that died must not leave the reader blocked on a full queue
            if self._error is not None:
                raise RuntimeError(f"writing bucket files under {self.folder} failed: {self._error}")
            try:
                self._queue.put(batch, timeout=1.0)
                return
            except queue.Full:
                continue

    def _write(self) -> None:
        try:
            stream = pa.RecordBatchReader.from_batches(EVENT_SCHEMA, iter(self._queue.get, None))
            pads.write_dataset(
                stream,
                self.folder,
                format="parquet",
                partitioning=_PARTITIONING,
                basename_template="part-{i}.parquet",
                existing_data_behavior="overwrite_or_ignore",
                preserve_order=True,
                max_rows_per_group=1 << 17,
            )
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread, raised there
            self._error = e
            while self._queue.get() is not None:  # drain, so a blocked put returns
                pass


def read_bucket(folder: str | Path, bucket: int, spilled: SpilledEvents) -> Interactions:
    """One bucket's events as ``Interactions`` in read order: global item/domain/file codes (the
    vocabularies of ``spilled``), user codes local to the bucket in order of first appearance."""
    path = bucket_path(folder, bucket)
    if path.is_dir():
        table = pads.dataset(path, format="parquet", schema=EVENT_SCHEMA.remove(0)).to_table()
        table = table.sort_by("order")
    else:
        table = EVENT_SCHEMA.remove(0).empty_table()
    return interactions_from_table(table, spilled.items, spilled.domains, spilled.files)


def interactions_from_table(table: pa.Table, items: list, domains: list, files: list) -> Interactions:
    """``Interactions`` from a table with the event columns (user as strings, other codes global)."""
    users = pc.unique(table["user"])
    codes = pc.index_in(table["user"], value_set=users)
    col = lambda name, dt: table[name].to_numpy().astype(dt, copy=False)  # noqa: E731
    return Interactions(
        user=codes.to_numpy().astype(np.int32, copy=False) if len(table) else np.zeros(0, np.int32),
        item=col("item", np.int32),
        domain=col("domain", np.int32),
        time=col("time", np.float64),
        order=col("order", np.int64),
        file=col("file", np.int32),
        line=col("line", np.int64),
        target=col("target", np.int8),
        users=users.to_pylist(),
        items=items,
        domains=domains,
        files=files,
    )


def interactions_table(inter: Interactions) -> pa.Table:
    """The inverse of ``interactions_from_table`` (users as strings): a bucket's kept events on disk."""
    users = np.array(inter.users, dtype=object)[inter.user] if len(inter) else np.zeros(0, dtype=object)
    return pa.table(
        {
            "user": pa.array(users.tolist(), pa.string()),
            "item": pa.array(inter.item, pa.int32()),
            "domain": pa.array(inter.domain, pa.int32()),
            "time": pa.array(inter.time, pa.float64()),
            "order": pa.array(inter.order, pa.int64()),
            "file": pa.array(inter.file, pa.int32()),
            "line": pa.array(inter.line, pa.int64()),
            "target": pa.array(inter.target, pa.int8()),
        }
    )
