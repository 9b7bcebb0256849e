"""Items of a source: one domain per item, the candidate catalogue, item-file rows.

Shared by the readers that build a catalogue from events plus an optional item text file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cprec.prepare.clean import drop_unknown_domains
from cprec.prepare.schema import Interactions, IssueLog, Item

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
