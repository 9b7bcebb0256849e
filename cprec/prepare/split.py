"""Held-out targets: leave-one-out per user and domain, or the targets a pre-split source gives.

Leave-one-out: for each user and each domain where the user has at least 3 events, the last event
in that domain is the test target and the second last the validation target. Pre-split sources
(food-kitchen, generic sources with a split column) mark their targets on the events. Either way an
eval row's history is *all* of the user's events (every domain) before the target, in time order —
so a test history holds the validation target — and the pre-training events are the user's events
minus **every** held-out target. Targets leave the pipeline here and never come back into
pre-training text.

"Before" (``data.same_time_history``): with ``exclude`` (the default) the history holds only
events with a strictly earlier timestamp, since the order of same-time events against the target
is unknown (a basket, a batch of ratings submitted at once); with ``include`` the events at the
target's time that come earlier in the file count as before it, ties broken by file order (what
the leave-one-out choice of the target does either way). Untimed events (file order is time order)
are never ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cprec.prepare.schema import NO_TARGET, TARGET_NAMES, TEST_TARGET, VALID_TARGET, Interactions

MIN_DOMAIN_EVENTS = 3  # train + valid + test


@dataclass
class Split:
    """Pre-training events and eval rows (parallel lists, one row per held-out target)."""

    train: Interactions
    """Pre-training events, grouped by user in time order."""
    eval_user: list[str]
    eval_split: list[str]
    eval_domain: list[str]
    eval_history: list[list[str]]
    eval_target: list[str]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "valid": sum(s == "valid" for s in self.eval_split),
            "test": sum(s == "test" for s in self.eval_split),
        }

    def eval_table(self) -> pa.Table:
        """``eval/users.parquet``: user, split, domain, history (list<str>), target."""
        return pa.table(
            {
                "user": pa.array(self.eval_user, pa.string()),
                "split": pa.array(self.eval_split, pa.string()),
                "domain": pa.array(self.eval_domain, pa.string()),
                "history": pa.array(self.eval_history, pa.list_(pa.string())),
                "target": pa.array(self.eval_target, pa.string()),
            }
        )


def leave_one_out_targets(inter: Interactions) -> np.ndarray:
    """Target kind per row (rows grouped by user in time order): last/second-last per user-domain."""
    n = len(inter)
    target = np.zeros(n, dtype=np.int8)
    if n == 0:
        return target
    key = inter.user.astype(np.int64) * (len(inter.domains) + 1) + inter.domain
    order = np.argsort(key, kind="stable")  # stable: time order kept inside each (user, domain)
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_end = np.repeat(starts + sizes, sizes)
    from_end = group_end - np.arange(n) - 1  # 0 = last event of its (user, domain)
    big = np.repeat(sizes >= MIN_DOMAIN_EVENTS, sizes)
    target[order[big & (from_end == 0)]] = TEST_TARGET
    target[order[big & (from_end == 1)]] = VALID_TARGET
    return target


def history_ends(inter: Interactions, rows: np.ndarray, same_time_history: str) -> np.ndarray:
    """End (exclusive) of the history of each target row: the row itself with ``include``; with
    ``exclude`` the first row of the run of same-user, same-timestamp rows the target is in."""
    if same_time_history == "include" or len(rows) == 0:
        return rows
    if same_time_history != "exclude":
        raise ValueError(
            f"config field 'data.same_time_history': exclude or include, got {same_time_history!r}"
        )
    n = len(inter)
    t = inter.time
    # NaN != NaN: untimed rows never start a tie with their predecessor.
    tied = np.r_[False, (inter.user[1:] == inter.user[:-1]) & (t[1:] == t[:-1])]
    run_start = np.maximum.accumulate(np.where(~tied, np.arange(n), 0))
    return run_start[rows]


def split(inter: Interactions, presplit: bool, same_time_history: str = "exclude") -> Split:
    """Held-out targets (leave-one-out unless ``presplit``) and the pre-training events.

    ``inter`` must be grouped by user in time order (``Interactions.sort_by_user_time``);
    ``same_time_history`` is ``data.same_time_history`` (see the module docstring).
    """
    target = inter.target.copy() if presplit else leave_one_out_targets(inter)
    rows = np.flatnonzero(target != NO_TARGET)
    n = len(inter)
    user_start = np.flatnonzero(np.r_[True, inter.user[1:] != inter.user[:-1]]) if n else np.zeros(0, int)
    # Row r's user starts at the last user boundary <= r.
    first_row = user_start[np.searchsorted(user_start, rows, side="right") - 1] if len(rows) else rows
    ends = history_ends(inter, rows, same_time_history)
    items = np.array(inter.items, dtype=object)
    out = Split(inter.select(target == NO_TARGET), [], [], [], [], [])
    for r, start, end in zip(rows.tolist(), first_row.tolist(), ends.tolist()):
        out.eval_user.append(inter.users[inter.user[r]])
        out.eval_split.append(TARGET_NAMES[int(target[r])])
        out.eval_domain.append(inter.domains[inter.domain[r]])
        out.eval_history.append(items[inter.item[start:end]].tolist())
        out.eval_target.append(inter.items[inter.item[r]])
    return out


def train_sequences_table(train: Interactions) -> pa.Table:
    """``eval/train_sequences.parquet``: user, items, domains — each user's pre-training events."""
    n = len(train)
    starts = np.flatnonzero(np.r_[True, train.user[1:] != train.user[:-1]]) if n else np.zeros(0, int)
    bounds = np.r_[starts, n]
    items = np.array(train.items, dtype=object)[train.item]
    domains = np.array(train.domains, dtype=object)[train.domain]
    offsets = pa.array(bounds.astype(np.int32))
    return pa.table(
        {
            "user": pa.array([train.users[train.user[s]] for s in starts.tolist()], pa.string()),
            "items": pa.ListArray.from_arrays(offsets, pa.array(items.tolist(), pa.string())),
            "domains": pa.ListArray.from_arrays(offsets, pa.array(domains.tolist(), pa.string())),
        }
    )
