"""Amazon Reviews 2018 and 2023: one review file (+ optional metadata file) per domain, JSON lines."""

from __future__ import annotations

from pathlib import Path

from cprec.config import DataConfig
from cprec.prepare.readers.catalogue import build_catalogue, resolve_item_domains
from cprec.prepare.readers.records import EventReader, as_id, as_text, iter_jsonl, progress
from cprec.prepare.schema import Dataset, InteractionsBuilder, IssueLog

_AMAZON_KEYS = {
    # version: (user key, item keys in preference order, time key, time divisor, meta item keys)
    "amazon2018": ("reviewerID", ("asin",), "unixReviewTime", 1.0, ("asin",)),
    "amazon2023": ("user_id", ("parent_asin", "asin"), "timestamp", 1000.0, ("parent_asin", "asin")),
}


def read_amazon(cfg: DataConfig, issues: IssueLog, builder: InteractionsBuilder | None = None) -> Dataset:
    """Amazon Reviews 2018 / 2023: one review file (+ optional metadata file) per domain."""
    if not cfg.files:
        raise ValueError(f"data.files is empty: source '{cfg.source}' needs domain -> review file")
    user_key, item_keys, time_key, divisor, meta_keys = _AMAZON_KEYS[cfg.source]
    builder = builder if builder is not None else InteractionsBuilder()
    events = EventReader(builder, issues)
    sources = []
    for domain, file in cfg.files.items():
        path = Path(file).expanduser()
        sources.append(path)
        fcode = builder.file_code(path)
        for line, row in progress(iter_jsonl(path, issues.drop), f"read {domain} reviews"):
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
            for line, row in progress(iter_jsonl(path, issues.item_issue), f"read {domain} metadata"):
                item = next((as_id(row[k]) for k in meta_keys if row.get(k)), "")
                if not item:
                    issues.item_issue("item_row_without_id", path, line)
                    continue
                if item in texts:
                    continue  # the same product listed in two categories: first kept
                texts[item] = (as_text(row.get(title_key)), {k: as_text(row.get(k)) for k in other})
                domains[item] = domain
    return Dataset(inter, build_catalogue(inter, texts, domains, issues), sources, n_in)


def source_files(cfg: DataConfig) -> list[Path]:
    return [Path(p).expanduser() for p in (*cfg.files.values(), *cfg.meta_files.values())]
