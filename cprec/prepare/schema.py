"""The one internal schema every reader produces, and the ledger of records that were skipped.

Interactions are held column-wise (numpy code arrays + vocabularies) rather than as one Python
object per event: ML-1M alone has a million events, and cleaning/splitting are sorts and masks.

Every record a reader sees is accounted for exactly once: it either becomes a row of
``Interactions`` or is counted in ``IssueLog.dropped`` under a reason. Later stages (cleaning,
splitting) move rows from "kept" to "dropped" through the same ledger, so the manifest can state
``interactions_in == train + valid + test + sum(dropped)``.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

# Why a record was dropped. Readers and cleaning use these names; the manifest counts them.
DROP_REASONS = {
    "unparsable_line": "a line/row that could not be parsed (bad JSON, wrong number of fields)",
    "missing_field": "a record without a user or item value (or without a timestamp in a timed file)",
    "bad_timestamp": "a timestamp that is neither a number nor an ISO date",
    "unknown_item": "an item id outside the item catalogue of a closed-catalogue source",
    "unknown_domain": "an event whose domain is not in data.domains",
    "unknown_split": "an event whose split-column value is not in data.split_values",
    "no_domain_for_genre": "ML-1M: a movie none of whose genres is in data.domain_map",
    "item_domain_conflict": (
        "an event of an item whose events are mostly in another domain (item ids are global)"
    ),
    "item_without_text": "an event on an item without text, with data.missing_text=drop",
    "duplicate_event": "a repeated (user, item, timestamp) event, with data.dedup=keep_first",
    "user_too_few_interactions": "events of a user with fewer than data.min_interactions events",
}

# Targets of pre-split sources (food-kitchen valid/test users) are marked on the event itself.
NO_TARGET, VALID_TARGET, TEST_TARGET = 0, 1, 2
TARGET_NAMES = {VALID_TARGET: "valid", TEST_TARGET: "test"}


class IssueLog:
    """Counts skipped records by reason, or raises at the first one in strict mode."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.dropped: Counter[str] = Counter()
        self.item_issues: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def drop(self, reason: str, file: str | Path, line: int | str, detail: str = "", n: int = 1) -> None:
        """Record ``n`` dropped interaction records (one location given for all of them)."""
        if reason not in DROP_REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        where = f"{file}:{line}"
        if self.strict:
            raise ValueError(f"{where}: {reason} ({DROP_REASONS[reason]}){': ' + detail if detail else ''}")
        self.dropped[reason] += n
        self.examples.setdefault(reason, f"{where}: {detail}")

    def item_issue(self, reason: str, file: str | Path, line: int | str, detail: str = "") -> None:
        """Record a problem with an item record (not an interaction), e.g. a duplicate item row."""
        if self.strict:
            raise ValueError(f"{file}:{line}: {reason}{': ' + detail if detail else ''}")
        self.item_issues[reason] += 1
        self.examples.setdefault(reason, f"{file}:{line}: {detail}")

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def log_summary(self) -> None:
        for reason, n in sorted(self.dropped.items()):
            log.info("dropped %d records: %s%s", n, reason, self._first(reason))
        for reason, n in sorted(self.item_issues.items()):
            log.info("item issue x%d: %s%s", n, reason, self._first(reason))

    def _first(self, reason: str) -> str:
        """`` (first: <where>)``, or nothing when no example was recorded."""
        return f" (first: {self.examples[reason]})" if self.examples.get(reason) else ""


@dataclass
class Item:
    """One catalogue item. ``fields`` are the text fields other than the title, in order."""

    item: str
    domain: str
    title: str
    fields: dict[str, str] = field(default_factory=dict)
    has_text: bool = True


@dataclass
class Interactions:
    """Events column-wise: integer codes into the vocabularies, plus where each event came from.

    ``time`` is NaN where the source has no timestamps; ``order`` is the position in read order and
    breaks ties (so "file order" is the fallback time). ``file``/``line`` name the source record for
    error messages. ``target`` marks held-out events of pre-split sources.
    """

    user: np.ndarray  # int32 codes into users
    item: np.ndarray  # int32 codes into items
    domain: np.ndarray  # int32 codes into domains
    time: np.ndarray  # float64, NaN = unknown
    order: np.ndarray  # int64 read order
    file: np.ndarray  # int32 codes into files
    line: np.ndarray  # int64 line (or row) number, 1-based
    target: np.ndarray  # int8: NO_TARGET / VALID_TARGET / TEST_TARGET
    users: list[str]
    items: list[str]
    domains: list[str]
    files: list[str]

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask_or_index: np.ndarray) -> Interactions:
        """Rows picked by a boolean mask or an index array; vocabularies are shared."""
        cols = {k: getattr(self, k)[mask_or_index] for k in _COLUMNS}
        return Interactions(
            **cols, users=self.users, items=self.items, domains=self.domains, files=self.files
        )

    def where(self, row: int) -> tuple[str, int]:
        """(file, line) of a row, for error messages."""
        return self.files[int(self.file[row])], int(self.line[row])

    def sort_by_user_time(self) -> Interactions:
        """Rows grouped by user, each user's events in time order (ties: read order)."""
        time = np.where(np.isnan(self.time), -np.inf, self.time)
        idx = np.lexsort((self.order, time, self.user))
        return self.select(idx)


_COLUMNS = ("user", "item", "domain", "time", "order", "file", "line", "target")


def intern(codes: dict[str, int], values: pa.Array) -> np.ndarray:
    """The codes of ``values`` (strings, no nulls) in the vocabulary ``codes``, new values added in
    order of first appearance - as interning them one by one would - with Python work per
    distinct value, not per row (Arrow's dictionary encoding numbers values by first appearance)."""
    enc = values.dictionary_encode()
    distinct = enc.dictionary.to_pylist()
    mapping = np.fromiter((codes.setdefault(v, len(codes)) for v in distinct), np.int32, len(distinct))
    return mapping[enc.indices.to_numpy(zero_copy_only=False)]


class InteractionsBuilder:
    """Appends events one by one or a batch at a time (readers), interning ids into code
    vocabularies."""

    def __init__(self):
        self._codes: dict[str, dict[str, int]] = {"user": {}, "item": {}, "domain": {}, "file": {}}
        self._cols = {
            "user": array("i"),
            "item": array("i"),
            "domain": array("i"),
            "time": array("d"),
            "file": array("i"),
            "line": array("q"),
            "target": array("b"),
        }

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
        c["user"].append(self._code("user", user))
        c["item"].append(self._code("item", item))
        c["domain"].append(self._code("domain", domain))
        c["time"].append(time)
        c["file"].append(file_code)
        c["line"].append(line)
        c["target"].append(target)

    def add_batch(self, user, item, domain, time, file_code: int, line, target) -> None:
        """``add`` for a batch: ``user``/``item``/``domain`` Arrow string arrays (no missing
        values), ``time``/``line``/``target`` numpy arrays of the same length."""
        c, n = self._cols, len(user)
        for kind, values in (("user", user), ("item", item), ("domain", domain)):
            c[kind].frombytes(intern(self._codes[kind], values).tobytes())
        c["time"].frombytes(np.asarray(time, dtype=np.float64).tobytes())
        c["file"].frombytes(np.full(n, file_code, dtype=np.int32).tobytes())
        c["line"].frombytes(np.asarray(line, dtype=np.int64).tobytes())
        c["target"].frombytes(np.asarray(target, dtype=np.int8).tobytes())

    def __len__(self) -> int:
        return len(self._cols["user"])

    def build(self) -> Interactions:
        cols = {
            k: np.frombuffer(v, dtype=dt).copy() if len(v) else np.zeros(0, dtype=dt)
            for (k, v), dt in zip(
                self._cols.items(), (np.int32, np.int32, np.int32, np.float64, np.int32, np.int64, np.int8)
            )
        }
        vocab = {k: list(v) for k, v in self._codes.items()}  # dicts keep insertion order = code order
        return Interactions(
            **cols,
            order=np.arange(len(self), dtype=np.int64),
            users=vocab["user"],
            items=vocab["item"],
            domains=vocab["domain"],
            files=vocab["file"],
        )


@dataclass
class ItemDomainPairs:
    """Per (item, domain) pair of a log: how many events, and where the first and last of them are.

    What the decisions about items need from the whole log (each item's domain, which items have
    events), at catalogue size rather than event size. ``first``/``last`` are read positions
    (``Interactions.order``); ``first_file``/``first_line`` locate the first event for messages.
    """

    item: np.ndarray  # int32 item codes
    domain: np.ndarray  # int32 domain codes
    count: np.ndarray  # int64 events
    first: np.ndarray  # int64 read position of the first event
    last: np.ndarray  # int64 read position of the last event
    first_file: np.ndarray  # int32 file code of the first event
    first_line: np.ndarray  # int64 line of the first event


@dataclass
class SpilledEvents:
    """Events written to bucket files by a hash of the user (``cprec.prepare.buckets``) instead of
    being held in memory: the distributed path's stand-in for ``Interactions`` in the readers.

    It holds the vocabularies of items, domains and files (catalogue-sized; users are not interned,
    they are as many as the events), the per (item, domain) summary and, once the readers'
    whole-log decisions are made (``readers.catalogue.resolve_item_domains``), those decisions, which
    every bucket task applies to its own events (their drops are counted here, once).
    """

    folder: Path
    n_buckets: int
    n_rows: int
    items: list[str]
    domains: list[str]
    files: list[str]
    pairs: ItemDomainPairs
    bucket_rows: np.ndarray
    """Events per bucket."""
    bucket_files: list[list[int]]
    """File codes of each bucket's events (for messages naming a failed bucket's input files)."""
    targets_seen: np.ndarray
    """The distinct target kinds of the events (``NO_TARGET`` ... ``TEST_TARGET``)."""
    allowed_domains: np.ndarray | None = None
    """Per domain code: events of this domain are kept (None = all), set by the readers' domain filter."""
    item_domain: np.ndarray | None = None
    """Per item code: the one domain its events are kept in (-1: none), set by ``resolve_item_domains``."""

    def __len__(self) -> int:
        return self.n_rows

    def keep_mask(self, inter: Interactions) -> np.ndarray:
        """Which events of one bucket (global item/domain codes) survive the whole-log decisions."""
        keep = np.ones(len(inter), dtype=bool)
        if self.allowed_domains is not None:
            keep &= self.allowed_domains[inter.domain]
        if self.item_domain is not None:
            keep &= self.item_domain[inter.item] == inter.domain
        return keep


Events = Interactions | SpilledEvents


def has_targets(inter: Events) -> bool:
    """Whether any event is a held-out target (pre-split sources)."""
    targets = inter.targets_seen if isinstance(inter, SpilledEvents) else inter.target
    return bool((targets != NO_TARGET).any())


@dataclass
class Dataset:
    """What a reader returns: events, the item catalogue and the files they came from."""

    interactions: Events
    """In memory, or spilled to bucket files (the distributed path, ``cprec.prepare.buckets``)."""
    items: dict[str, Item]
    sources: list[Path]
    interactions_in: int
    """Records seen by the reader (kept + dropped while reading)."""
    presplit: bool = False
    """Held-out targets are given by the source (``Interactions.target``), not leave-one-out."""
    closed_catalogue: bool = False
    """The catalogue lists every rankable item (kept even if never interacted with)."""
