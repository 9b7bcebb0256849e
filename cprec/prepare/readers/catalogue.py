"""Items of a source: one domain per item, the candidate catalogue, item-file rows.

Shared by the readers that build a catalogue from events plus an optional item text file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cprec.prepare.clean import drop_unknown_domains
from cprec.prepare.schema import Events, IssueLog, Item, SpilledEvents

log = logging.getLogger(__name__)


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


def choose_item_domains(
    item: np.ndarray, domain: np.ndarray, count: np.ndarray, first: np.ndarray, n_items: int
) -> np.ndarray:
    """Per item code, the domain most of its events are in (a tie: the domain of its earliest
    event), from (item, domain) pairs with their event counts and first read positions; -1 for an
    item without events. The one rule, for the log in memory and for a log spilled to buckets."""
    order = np.lexsort((first, -count, item))
    pair_item = item[order]
    winner = order[np.r_[True, pair_item[1:] != pair_item[:-1]]] if len(order) else order
    chosen = np.full(n_items, -1, dtype=np.int64)
    chosen[item[winner]] = domain[winner]
    return chosen


def resolve_item_domains(inter: Events, issues: IssueLog, domains: list[str] = ()) -> Events:
    """Item ids are global, so each item gets one domain; events of the item in another are dropped.

    Events of domains outside ``domains`` (``data.domains``; empty = all) are dropped first, as
    ``unknown_domain``, so they never take part in the choice. An item's domain is the one most of
    its events are in (a tie goes to the domain of its earliest event): one stray event in a wrong
    domain costs that one event, never the item's other events. In strict mode the error names the
    first event outside the chosen domain - the record that is wrong.

    Events spilled to buckets (``SpilledEvents``) are decided from their (item, domain) summary
    with the same rule and counted here; each bucket task applies the decision to its events.
    """
    if isinstance(inter, SpilledEvents):
        return _resolve_spilled(inter, issues, list(domains))
    inter = drop_unknown_domains(inter, list(domains), issues)
    if len(inter) == 0:
        return inter
    n_dom = len(inter.domains)
    key = inter.item.astype(np.int64) * n_dom + inter.domain
    # Rows are in read order, so each (item, domain)'s first index is its earliest event.
    keys, first, counts = np.unique(key, return_index=True, return_counts=True)
    chosen = choose_item_domains(keys // n_dom, keys % n_dom, counts, first, len(inter.items))
    item_domain = chosen[inter.item]
    bad = inter.domain != item_domain
    if bad.any():
        rows = np.flatnonzero(bad)
        r = int(rows[0])
        file, line = inter.where(r)
        item = inter.item[r]
        n_item = int(counts[keys // n_dom == item].sum())
        n_kept = int(counts[keys == item * n_dom + item_domain[r]][0])
        detail = _conflict_detail(inter, item, inter.domain[r], item_domain[r], n_kept, n_item)
        issues.drop("item_domain_conflict", file, line, detail, n=len(rows))
        inter = inter.select(~bad)
    return inter


def _conflict_detail(inter, item, domain, chosen, n_kept: int, n_item: int) -> str:
    return (
        f"item {inter.items[item]!r} in domain {inter.domains[domain]!r}, while "
        f"{n_kept} of its {n_item} events are in {inter.domains[chosen]!r}"
    )


def _drop_pairs(inter: SpilledEvents, bad: np.ndarray, reason: str, issues: IssueLog, detail) -> None:
    """Count the events of the (item, domain) pairs where ``bad``; the first of them (in read
    order) is the one named, as the in-memory rule names its first bad row."""
    p = inter.pairs
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    first = int(rows[np.argmin(p.first[rows])])
    file = inter.files[int(p.first_file[first])]
    issues.drop(reason, file, int(p.first_line[first]), detail(first), n=int(p.count[rows].sum()))


def _resolve_spilled(inter: SpilledEvents, issues: IssueLog, domains: list[str]) -> SpilledEvents:
    p = inter.pairs
    if domains:
        allowed = np.array([d in domains for d in inter.domains], dtype=bool)
        _drop_pairs(
            inter, ~allowed[p.domain], "unknown_domain", issues, lambda i: repr(inter.domains[p.domain[i]])
        )
        inter.allowed_domains = allowed
    kept = (
        inter.allowed_domains[p.domain] if inter.allowed_domains is not None else np.ones(len(p.item), bool)
    )
    k = np.flatnonzero(kept)
    chosen = choose_item_domains(p.item[k], p.domain[k], p.count[k], p.first[k], len(inter.items))
    bad = kept & (chosen[p.item] != p.domain)
    if bad.any():
        per_item = np.bincount(p.item[k], weights=p.count[k], minlength=len(inter.items))
        winner_count = {
            int(i): int(c) for i, d, c in zip(p.item[k], p.domain[k], p.count[k]) if chosen[i] == d
        }

        def detail(i: int) -> str:
            item = int(p.item[i])
            return _conflict_detail(
                inter, item, p.domain[i], chosen[item], winner_count[item], int(per_item[item])
            )

        _drop_pairs(inter, bad, "item_domain_conflict", issues, detail)
    inter.item_domain = chosen
    return inter


def seen_item_domains(inter: Events) -> np.ndarray:
    """Per item code, the domain of its (kept) events, -1 for an item without any. After
    ``resolve_item_domains`` an item's events share one domain; otherwise its last event's wins."""
    if isinstance(inter, SpilledEvents):
        p = inter.pairs
        kept = np.ones(len(p.item), dtype=bool)
        if inter.allowed_domains is not None:
            kept &= inter.allowed_domains[p.domain]
        if inter.item_domain is not None:
            kept &= inter.item_domain[p.item] == p.domain
        k = np.flatnonzero(kept)
        order = k[np.argsort(p.last[k], kind="stable")]  # the last event's pair is written last
        out = np.full(len(inter.items), -1, dtype=np.int64)
        out[p.item[order]] = p.domain[order]
        return out
    out = np.full(len(inter.items), -1, dtype=np.int64)
    out[inter.item] = inter.domain
    return out


def build_catalogue(
    inter: Events,
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
    item_domain = seen_item_domains(inter)
    out: dict[str, Item] = {}
    for code in np.flatnonzero(item_domain >= 0):
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
