"""Cleaning between reading and splitting: domain filter, items without text, duplicates, short users.

Each rule has a config policy, moves rows from "kept" to the ``IssueLog`` under its reason (or
raises naming file and line in strict mode), and runs in a fixed order so every event is counted
once: unknown_domain -> unknown_item -> item_without_text -> duplicate_event ->
user_too_few_interactions.
"""

from __future__ import annotations

import logging

import numpy as np

from cprec.config import DataConfig
from cprec.prepare.schema import Dataset, Interactions, IssueLog

log = logging.getLogger(__name__)


def _drop_rows(inter: Interactions, bad: np.ndarray, reason: str, issues: IssueLog, detail) -> Interactions:
    """Remove rows where ``bad``; count them (location and detail of the first one for the log)."""
    if not bad.any():
        return inter
    rows = np.flatnonzero(bad)
    first = int(rows[0])
    file, line = inter.where(first)
    issues.drop(reason, file, line, detail(first), n=len(rows))
    return inter.select(~bad)


def _name(vocab, codes):
    return lambda r: repr(vocab[codes[r]])


def drop_unknown_domains(inter: Interactions, domains: list[str], issues: IssueLog) -> Interactions:
    """Events whose domain is not in ``domains`` (empty = all allowed), counted as unknown_domain.

    Readers call this before deciding each item's domain, so that a bad event never decides
    anything about the good events of its item (and strict mode names the bad event itself).
    """
    if not domains:
        return inter
    allowed = np.array([d in domains for d in inter.domains] + [False], dtype=bool)
    return _drop_rows(
        inter, ~allowed[inter.domain], "unknown_domain", issues, _name(inter.domains, inter.domain)
    )


def clean(ds: Dataset, cfg: DataConfig, issues: IssueLog) -> Interactions:
    """The kept events of ``ds``, grouped by user in time order; ``ds.items`` is pruned in place."""
    inter = ds.interactions
    name = _name

    if cfg.domains:
        inter = drop_unknown_domains(inter, cfg.domains, issues)
        for item in [i for i, it in ds.items.items() if it.domain not in cfg.domains]:
            del ds.items[item]
        unknown = sorted(set(cfg.domains) - set(inter.domains))
        if unknown:
            log.warning("data.domains lists %s, which no event has (domains: %s)", unknown, inter.domains)

    in_catalogue = np.array([i in ds.items for i in inter.items] + [False], dtype=bool)
    inter = _drop_rows(
        inter, ~in_catalogue[inter.item], "unknown_item", issues, name(inter.items, inter.item)
    )

    no_text = np.array(
        [i in ds.items and not ds.items[i].has_text for i in inter.items] + [False], dtype=bool
    )
    bad = no_text[inter.item]
    if cfg.missing_text == "drop":
        inter = _drop_rows(inter, bad, "item_without_text", issues, name(inter.items, inter.item))
        for item in [i for i, it in ds.items.items() if not it.has_text]:
            del ds.items[item]
    else:
        if bad.any() and issues.strict:
            file, line = inter.where(int(np.flatnonzero(bad)[0]))
            raise ValueError(f"{file}:{line}: item_without_text: item {inter.items[inter.item[bad][0]]!r}")
        textless = [i for i, it in ds.items.items() if not it.has_text]
        if textless:
            n = len(textless)
            issues.item_issues["placeholder_text"] += n
            issues.examples.setdefault("placeholder_text", f"item {textless[0]!r} has no text")
            log.warning("%d items have no text: rendered by their id (data.missing_text=placeholder)", n)

    if cfg.dedup == "keep_first":
        inter = _drop_rows(
            inter, _duplicates(inter), "duplicate_event", issues, name(inter.items, inter.item)
        )

    counts = np.bincount(inter.user, minlength=len(inter.users))
    few = counts[inter.user] < cfg.min_interactions
    inter = _drop_rows(
        inter,
        few,
        "user_too_few_interactions",
        issues,
        lambda r: f"user {inter.users[inter.user[r]]!r} has {counts[inter.user[r]]} < {cfg.min_interactions}",
    )
    return inter.sort_by_user_time()


def _duplicates(inter: Interactions) -> np.ndarray:
    """Rows repeating an earlier (user, item, timestamp); events without a timestamp never repeat."""
    dup = np.zeros(len(inter), dtype=bool)
    timed = ~np.isnan(inter.time)
    if not timed.any():
        return dup
    idx = np.flatnonzero(timed)
    order = np.lexsort((inter.order[idx], inter.time[idx], inter.item[idx], inter.user[idx]))
    s = idx[order]
    same = (
        (inter.user[s[1:]] == inter.user[s[:-1]])
        & (inter.item[s[1:]] == inter.item[s[:-1]])
        & (inter.time[s[1:]] == inter.time[s[:-1]])
    )
    dup[s[1:][same]] = True
    return dup
