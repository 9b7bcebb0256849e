"""Generic JSONL / CSV(TSV) / Parquet event logs with configurable column names (``data.columns``)."""

from __future__ import annotations

import logging
from pathlib import Path

from cprec.config import DataConfig
from cprec.prepare.readers.catalogue import add_item_text, build_catalogue, resolve_item_domains
from cprec.prepare.readers.columnar import BatchRules, columnar_reads, read_parquet_events
from cprec.prepare.readers.records import (
    EventReader,
    as_id,
    as_text,
    files_of,
    iter_rows,
    progress,
    require_columns,
)
from cprec.prepare.schema import (
    NO_TARGET,
    TEST_TARGET,
    VALID_TARGET,
    Dataset,
    InteractionsBuilder,
    IssueLog,
    has_targets,
)

log = logging.getLogger(__name__)

_SPLIT_TARGET = {"train": NO_TARGET, "valid": VALID_TARGET, "test": TEST_TARGET}


def _event_files(cfg: DataConfig) -> list[tuple[Path, str | None]]:
    """(file, split of all its events or None) for a generic source: ``data.path``'s files, or
    those of ``data.split_files`` (train first, so read order follows the split)."""
    if not cfg.split_files:
        return [(p, None) for p in files_of(cfg.path, cfg.source)]
    order = [s for s in ("train", "valid", "test") if s in cfg.split_files]
    return [(p, s) for s in order for p in files_of(cfg.split_files[s], cfg.source)]


def columnar_rules(cfg: DataConfig) -> BatchRules:
    """The row path's checks of ``read_generic`` for the columnar reader."""
    return BatchRules(cfg.columns.split or None, cfg.split_values, _SPLIT_TARGET)


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


def read_generic(
    cfg: DataConfig, issues: IssueLog, builder: InteractionsBuilder | None = None, columnar: bool = True
) -> Dataset:
    """JSONL / CSV / Parquet events with ``data.columns`` names, optional item text file.

    Pre-split logs: with ``data.columns.split`` each event names its split, with ``data.split_files``
    each file holds one split. Then every valid/test event is a held-out target and the user's
    events before it (every split, every domain) its history; no leave-one-out.

    Parquet files are read a batch of columns at a time (``columnar``, the same result as the row
    path, which ``columnar=False`` forces and files of other column types take).
    """
    fmt, col = cfg.source, cfg.columns
    builder = builder if builder is not None else InteractionsBuilder()
    events = EventReader(builder, issues)
    event_files = _event_files(cfg)
    files = [p for p, _ in event_files]
    required = {"data.columns.user": col.user, "data.columns.item": col.item}
    if col.split:
        required["data.columns.split"] = col.split
    events_have_domain = False
    rules = columnar_rules(cfg)
    for path, file_split in event_files:
        header, rows = iter_rows(path, fmt, issues.drop)
        require_columns(header, required, path)
        target = _SPLIT_TARGET[file_split] if file_split else NO_TARGET
        fcode = builder.file_code(path)
        has_domain = has_time = None
        if header is not None:
            has_domain, has_time = col.domain in header, col.timestamp in header
        names = {
            "user": col.user,
            "item": col.item,
            "domain": col.domain if has_domain else None,
            "time": col.timestamp if has_time else None,
            "split": col.split or None,
        }
        if columnar and fmt == "parquet" and columnar_reads(path, names):
            events_have_domain = events_have_domain or has_domain
            read_parquet_events(path, fcode, builder, issues, names, cfg.default_domain, target, rules)
            continue
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
    if presplit and not has_targets(inter):
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
    for f in files_of(path, fmt):
        header, rows = iter_rows(f, fmt, issues.item_issue)
        require_columns(header, {"data.columns.item": col.item}, f)
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


def source_files(cfg: DataConfig) -> list[Path]:
    files = [p for p, _ in _event_files(cfg)]
    return files + (files_of(cfg.item_path, cfg.source) if cfg.item_path else [])
