"""RecBole atomic files: ``.inter`` events (+ ``.item`` texts next to it, or ``data.item_path``)."""

from __future__ import annotations

import math
from pathlib import Path

from cprec.config import DataConfig
from cprec.prepare.readers.catalogue import add_item_text, build_catalogue, resolve_item_domains
from cprec.prepare.readers.records import iter_atomic, open_text, parse_time, progress, require_columns
from cprec.prepare.schema import Dataset, InteractionsBuilder, IssueLog


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
    require_columns(names, {"data.columns.user": col.user, "data.columns.item": col.item}, path)
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
    require_columns(names, {"data.columns.item": item_col}, path)
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


def read_recbole(cfg: DataConfig, issues: IssueLog, builder: InteractionsBuilder | None = None) -> Dataset:
    """RecBole atomic ``.inter`` (+ ``.item`` next to it, or ``data.item_path``)."""
    inter_path, item_path = _recbole_paths(cfg)
    builder = builder if builder is not None else InteractionsBuilder()
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


def source_files(cfg: DataConfig) -> list[Path]:
    inter, item = _recbole_paths(cfg)
    return [inter] + ([item] if item else [])
