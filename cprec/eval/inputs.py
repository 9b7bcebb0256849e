"""Read the evaluation inputs that `cprec prepare` writes under ``<prepared>/eval/``.

Files (see the prepared-folder contract):
- ``items.parquet``: item, domain, title, text — the catalogue, one row per item;
- ``users.parquet``: user, split, domain, history (list), target — one held-out target per row;
- ``train_sequences.parquet``: user, items (list), domains (list) — pre-training interactions.

Everything is validated on the way in: a missing file or column, a duplicate item id, or a
target missing from its domain's catalogue is reported naming the file. Rows that cannot be used
are counted in ``EvalInputs.skipped`` (never dropped silently).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_COLUMNS = {
    "items.parquet": ("item", "domain", "title", "text"),
    "users.parquet": ("user", "split", "domain", "history", "target"),
    "train_sequences.parquet": ("user", "items", "domains"),
}


@dataclass
class Catalogue:
    """All items, in file order; ``index`` maps item id -> row."""

    items: list[str]
    domains: list[str]
    titles: list[str]
    texts: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.index:
            self.index = {it: i for i, it in enumerate(self.items)}

    def domain_rows(self, domain: str) -> list[int]:
        """Catalogue rows of one domain, in file order."""
        return [i for i, d in enumerate(self.domains) if d == domain]

    def subset_hash(self, rows: list[int]) -> str:
        """Content hash of some rows (ids, domains, titles, texts): keys the item-embedding cache."""
        h = hashlib.sha256()
        for i in rows:
            for part in (self.items[i], self.domains[i], self.titles[i], self.texts[i]):
                h.update(part.encode("utf-8"))
                h.update(b"\x00")
        return h.hexdigest()[:16]


@dataclass
class EvalUser:
    user: str
    domain: str
    history: list[str]
    target: str


@dataclass
class EvalInputs:
    catalogue: Catalogue
    users: list[EvalUser]
    """Rows of users.parquet for the requested split, targets known to the catalogue."""
    train_sequences: list[tuple[str, list[str], list[str]]]
    """(user, items, domains) per training user."""
    domains: list[str]
    """Domains of the catalogue, sorted."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows not used, by reason."""


def _read(path: Path) -> dict[str, list]:
    if not path.is_file():
        raise FileNotFoundError(f"evaluation input not found: {path} (run `cprec prepare` first)")
    table = pq.read_table(path)
    missing = [c for c in _COLUMNS[path.name] if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return {c: table.column(c).to_pylist() for c in _COLUMNS[path.name]}


def _split_users(path: Path, split: str, cat: Catalogue, skipped: Counter) -> list[EvalUser]:
    users = _read(path)
    out = []
    for u, sp, dom, hist, tgt in zip(*(users[c] for c in _COLUMNS["users.parquet"])):
        if sp != split:
            continue
        row = cat.index.get(tgt)
        if row is None:
            skipped["target_not_in_items"] += 1
            continue
        if cat.domains[row] != dom:
            raise ValueError(
                f"{path}: user {u!r} target {tgt!r} has domain {dom!r} but items.parquet says "
                f"{cat.domains[row]!r}"
            )
        out.append(EvalUser(str(u), str(dom), [str(h) for h in (hist or [])], str(tgt)))
    return out


def load_split_users(
    prepared_dir: str | Path, split: str, catalogue: Catalogue
) -> tuple[list[EvalUser], dict]:
    """The users.parquet rows of another split against an already loaded catalogue (e.g. the
    validation users that SASRec's early stopping watches while the report ranks the test users);
    returns (users, skipped rows by reason). No rows is not an error here: the caller decides."""
    skipped: Counter = Counter()
    users = _split_users(Path(prepared_dir) / "eval" / "users.parquet", split, catalogue, skipped)
    return users, dict(skipped)


def load_inputs(prepared_dir: str | Path, split: str) -> EvalInputs:
    """Load and validate the eval inputs; keep users.parquet rows of ``split``."""
    folder = Path(prepared_dir) / "eval"
    items = _read(folder / "items.parquet")
    dup = [k for k, n in Counter(items["item"]).items() if n > 1]
    if dup:
        raise ValueError(f"{folder / 'items.parquet'}: duplicate item ids, e.g. {dup[:5]}")
    cat = Catalogue(
        items=[str(x) for x in items["item"]],
        domains=[str(x) for x in items["domain"]],
        titles=[x or "" for x in items["title"]],
        texts=[x or "" for x in items["text"]],
    )
    skipped: Counter = Counter()

    eval_users = _split_users(folder / "users.parquet", split, cat, skipped)
    if not eval_users:
        raise ValueError(f"{folder / 'users.parquet'}: no usable rows with split={split!r}")
    seqs = _read(folder / "train_sequences.parquet")
    train = []
    for u, its, doms in zip(seqs["user"], seqs["items"], seqs["domains"]):
        its, doms = its or [], doms or []
        if len(its) != len(doms):
            raise ValueError(
                f"{folder / 'train_sequences.parquet'}: user {u!r} has {len(its)} items but "
                f"{len(doms)} domains"
            )
        train.append((str(u), [str(i) for i in its], [str(d) for d in doms]))
    if skipped:
        log.warning("eval inputs: skipped rows %s", dict(skipped))
    return EvalInputs(cat, eval_users, train, sorted(set(cat.domains)), dict(skipped))
