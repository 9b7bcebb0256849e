"""The two-domain food-kitchen set (Amazon Grocery = A, Home & Kitchen = B; LLMCDSR, TOIS 2025).

Files: ``train_A/train_B/train_overlap.txt`` (training-only users), ``valid.txt``/``test.txt``
(separate users whose last item is the held-out target), ``num.txt`` (items per domain), and
pickled ``item_set_*``/``text_*`` dicts (ASIN -> index, ASIN -> title). User ids restart in each
file, so users become ``trainA-12``, ``valid-3``, ...; item ids are the global integers as strings
(A: 0..n_A-1, B: n_A..); there are no timestamps, file order is time order. The pickles are read
with an unpickler that refuses every global, so only plain dict/str/int data can load.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

from cprec.config import DataConfig
from cprec.prepare.readers.records import open_text, progress
from cprec.prepare.schema import (
    NO_TARGET,
    TEST_TARGET,
    VALID_TARGET,
    Dataset,
    InteractionsBuilder,
    IssueLog,
    Item,
)


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global: only built-in containers and scalars can be rebuilt."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain dict/str/int pickles")


def load_plain_dict(path: Path, value_type: type) -> dict[str, Any]:
    """Unpickle a ``dict[str, value_type]`` without running any code; anything else is an error."""
    with open(path, "rb") as f:
        try:
            data = _PlainDataUnpickler(f).load()
        except Exception as e:
            raise ValueError(f"{path}: not a plain-data pickle ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(k, str) or type(v) is not value_type:
            raise ValueError(f"{path}: expected dict[str, {value_type.__name__}], found {k!r}: {v!r}")
    return data


FOOD_KITCHEN_FILES = {
    # file: (user id prefix, target kind of the last item)
    "train_A.txt": ("trainA", NO_TARGET),
    "train_B.txt": ("trainB", NO_TARGET),
    "train_overlap.txt": ("overlap", NO_TARGET),
    "valid.txt": ("valid", VALID_TARGET),
    "test.txt": ("test", TEST_TARGET),
}
FOOD_KITCHEN_META = ("num.txt", "item_set_A.pkl", "item_set_B.pkl", "text_A.pkl", "text_B.pkl")


def read_food_kitchen(
    cfg: DataConfig, issues: IssueLog, builder: InteractionsBuilder | None = None
) -> Dataset:
    """The LLMCDSR Grocery(A) / Home&Kitchen(B) set: pre-split, file order = time order."""
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: food-kitchen folder not found: {root}")
    for name in (*FOOD_KITCHEN_META, *FOOD_KITCHEN_FILES):
        if not (root / name).is_file():
            raise FileNotFoundError(f"food-kitchen folder {root} lacks {name}")
    try:
        n_a, n_b = (int(x) for x in (root / "num.txt").read_text().split()[:2])
    except ValueError:
        raise ValueError(f"{root / 'num.txt'}: expected two integers (items in A, in B)") from None
    items = _food_kitchen_items(root, n_a, n_b, issues)
    builder = builder if builder is not None else InteractionsBuilder()
    n_items = n_a + n_b
    for name, (prefix, target_kind) in FOOD_KITCHEN_FILES.items():
        path = root / name
        fcode = builder.file_code(path)
        with open_text(path) as f:
            for lineno, line in enumerate(progress(f, f"read {name}"), 1):
                if not line.strip():
                    continue
                user, sep, rest = line.rstrip("\r\n").partition("\t")
                if not sep or not user.strip():
                    issues.drop("unparsable_line", path, lineno, "expected 'user<TAB>item,item,...'")
                    continue
                tokens = [t.strip() for t in rest.split(",") if t.strip()]
                kept: list[str] = []
                for tok in tokens:
                    if not tok.isdigit() or int(tok) >= n_items:
                        issues.drop("unknown_item", path, lineno, f"item id {tok!r} not in 0..{n_items - 1}")
                    else:
                        kept.append(str(int(tok)))
                uid = f"{prefix}-{user.strip()}"
                for pos, item in enumerate(kept):
                    target = target_kind if pos == len(kept) - 1 else NO_TARGET
                    builder.add(uid, item, "A" if int(item) < n_a else "B", math.nan, fcode, lineno, target)
    inter = builder.build()
    sources = [root / n for n in (*FOOD_KITCHEN_META, *FOOD_KITCHEN_FILES)]
    return Dataset(
        inter, items, sources, len(builder) + issues.total_dropped, presplit=True, closed_catalogue=True
    )


def _food_kitchen_items(root: Path, n_a: int, n_b: int, issues: IssueLog) -> dict[str, Item]:
    """Global id (A: 0..n_a-1, B: n_a..) -> Item with the title from text_*.pkl."""
    items: dict[str, Item] = {}
    for domain, offset, n in (("A", 0, n_a), ("B", n_a, n_b)):
        index = load_plain_dict(root / f"item_set_{domain}.pkl", int)
        titles = load_plain_dict(root / f"text_{domain}.pkl", str)
        for asin, local in sorted(index.items(), key=lambda kv: kv[1]):
            if not 0 <= local < n:
                raise ValueError(
                    f"{root / f'item_set_{domain}.pkl'}: index {local} of {asin!r} not in 0..{n - 1}"
                )
            gid = str(local + offset)
            title = titles.get(asin, "").strip()
            items[gid] = Item(gid, domain, title or gid, {"asin": asin}, has_text=bool(title))
    return items


def source_files(cfg: DataConfig) -> list[Path]:
    """The folder's files, in the order they are hashed."""
    root = Path(cfg.path).expanduser()
    return [root / n for n in (*FOOD_KITCHEN_META, *FOOD_KITCHEN_FILES)]
