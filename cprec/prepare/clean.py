"""Cleaning between reading and splitting: domain filter, items without text, duplicates, short users.

Each rule has a config policy, moves rows from "kept" to the ``IssueLog`` under its reason (or
raises naming file and line in strict mode), and runs in a fixed order so every event is counted
once: unknown_domain -> unknown_item -> item_without_text -> duplicate_event ->
user_too_few_interactions.

Two halves: ``clean_catalogue`` decides about items once, for the whole log (prunes the catalogue,
says per item what its events get), and ``clean_events`` applies that and the per-user rules to a
set of whole users - all of them here, one bucket of users in the distributed path
(``cprec.prepare.distributed``), where the per-bucket counts add up to the same totals. No rule
needs another user's events: duplicates are per (user, item, time), ``min_interactions`` per user.
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


# What an item's events get from the catalogue (``clean_catalogue``), per item code.
ITEM_OK, ITEM_UNKNOWN, ITEM_WITHOUT_TEXT = 0, 1, 2


def clean(ds: Dataset, cfg: DataConfig, issues: IssueLog) -> Interactions:
    """The kept events of ``ds``, grouped by user in time order; ``ds.items`` is pruned in place."""
    status = clean_catalogue(ds, cfg, issues)
    return clean_events(ds.interactions, status, cfg, issues)


def clean_catalogue(ds: Dataset, cfg: DataConfig, issues: IssueLog) -> np.ndarray:
    """The catalogue half of cleaning, decided once for the whole log: prunes ``ds.items`` (items
    of other domains than ``data.domains``; items without text with ``data.missing_text=drop``) and
    returns, per item code of ``ds.interactions``, what its events get: ``ITEM_OK``,
    ``ITEM_UNKNOWN`` (not in the catalogue) or ``ITEM_WITHOUT_TEXT``. Items without text kept as
    placeholders are counted here (once, not per bucket of the distributed path)."""
    vocab = ds.interactions.items
    if cfg.domains:
        for item in [i for i, it in ds.items.items() if it.domain not in cfg.domains]:
            del ds.items[item]
        unknown = sorted(set(cfg.domains) - set(ds.interactions.domains))
        if unknown:
            log.warning(
                "data.domains lists %s, which no event has (domains: %s)", unknown, ds.interactions.domains
            )
    status = np.full(len(vocab) + 1, ITEM_OK, dtype=np.int8)  # + 1: never indexed, keeps it non-empty
    for code, item in enumerate(vocab):
        it = ds.items.get(item)
        status[code] = ITEM_UNKNOWN if it is None else (ITEM_OK if it.has_text else ITEM_WITHOUT_TEXT)
    if cfg.missing_text == "drop":
        for item in [i for i, it in ds.items.items() if not it.has_text]:
            del ds.items[item]
    else:
        textless = [i for i, it in ds.items.items() if not it.has_text]
        if textless:
            n = len(textless)
            issues.item_issues["placeholder_text"] += n
            issues.examples.setdefault("placeholder_text", f"item {textless[0]!r} has no text")
            log.warning("%d items have no text: rendered by their id (data.missing_text=placeholder)", n)
    return status


def clean_events(inter: Interactions, status: np.ndarray, cfg: DataConfig, issues: IssueLog) -> Interactions:
    """The event half of cleaning, in the fixed order of the module docstring. Each rule looks at
    one event and the catalogue (``status`` from ``clean_catalogue``), or at one user's events, so
    it runs on any set of whole users (a bucket of the distributed path) and counts add up."""
    name = _name
    if cfg.domains:
        inter = drop_unknown_domains(inter, cfg.domains, issues)
    inter = _drop_rows(
        inter, status[inter.item] == ITEM_UNKNOWN, "unknown_item", issues, name(inter.items, inter.item)
    )
    bad = status[inter.item] == ITEM_WITHOUT_TEXT
    if cfg.missing_text == "drop":
        inter = _drop_rows(inter, bad, "item_without_text", issues, name(inter.items, inter.item))
    elif bad.any() and issues.strict:
        file, line = inter.where(int(np.flatnonzero(bad)[0]))
        raise ValueError(f"{file}:{line}: item_without_text: item {inter.items[inter.item[bad][0]]!r}")

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
