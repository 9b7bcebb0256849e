"""Cleaning policies, leave-one-out, pre-split targets, and no leakage of targets into pre-training."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from raw_fixtures import write_food_kitchen, write_jsonl

from cprec.config import DataConfig, PromptConfig
from cprec.prepare.clean import clean
from cprec.prepare.documents import build_specs
from cprec.prepare.prompts import PromptRenderer
from cprec.prepare.readers import read_source
from cprec.prepare.schema import IssueLog
from cprec.prepare.split import leave_one_out_targets, split, train_sequences_table


def prepare_split(cfg: DataConfig, strict: bool = False):
    issues = IssueLog(strict)
    ds = read_source(cfg, issues)
    inter = clean(ds, cfg, issues)
    held = split(inter, ds.presplit, cfg.same_time_history)
    return ds, issues, held


def jsonl_cfg(tmp_path, rows, **kw) -> DataConfig:
    return DataConfig(source="jsonl", path=str(write_jsonl(tmp_path / "e.jsonl", rows)), **kw)


def ev(user, item, t, domain="d"):
    return {"user_id": user, "item_id": item, "timestamp": t, "domain": domain}


def reconciles(ds, issues, held) -> bool:
    c = held.counts
    return ds.interactions_in == c["train"] + c["valid"] + c["test"] + issues.total_dropped


def test_leave_one_out_per_user_and_domain(tmp_path):
    rows = [
        ev("u", "a1", 1, "A"),
        ev("u", "b1", 2, "B"),
        ev("u", "a2", 3, "A"),
        ev("u", "b2", 4, "B"),
        ev("u", "a3", 5, "A"),
        ev("u", "a4", 7, "A"),
        ev("u", "b3", 6, "B"),
        ev("u", "c1", 8, "C"),  # only one C event: no C targets, stays in training
    ]
    ds, issues, held = prepare_split(jsonl_cfg(tmp_path, rows))
    table = held.eval_table().to_pylist()
    by = {(r["split"], r["domain"]): r for r in table}
    assert set(by) == {("valid", "A"), ("test", "A"), ("valid", "B"), ("test", "B")}
    assert by[("test", "A")]["target"] == "a4" and by[("valid", "A")]["target"] == "a3"
    assert by[("test", "B")]["target"] == "b3" and by[("valid", "B")]["target"] == "b2"
    # history = everything before the target in time order, all domains (test includes valid)
    assert by[("test", "A")]["history"] == ["a1", "b1", "a2", "b2", "a3", "b3"]
    assert by[("valid", "B")]["history"] == ["a1", "b1", "a2"]
    train = train_sequences_table(held.train).to_pylist()
    assert train == [{"user": "u", "items": ["a1", "b1", "a2", "c1"], "domains": ["A", "B", "A", "C"]}]
    assert held.counts == {"train": 4, "valid": 2, "test": 2} and reconciles(ds, issues, held)


def test_time_order_ties_keep_file_order(tmp_path):
    rows = [ev("u", "x", 5), ev("u", "y", 5), ev("u", "z", 5), ev("u", "w", 1)]
    _, _, held = prepare_split(jsonl_cfg(tmp_path, rows))
    targets = {r["split"]: r["target"] for r in held.eval_table().to_pylist()}
    assert targets == {"valid": "y", "test": "z"}


@pytest.mark.parametrize(
    "rule, test_history, valid_history",
    [("exclude", ["a", "b"], ["a", "b"]), ("include", ["a", "b", "c", "d"], ["a", "b", "c"])],
)
def test_same_time_events_and_the_history(tmp_path, rule, test_history, valid_history):
    """data.same_time_history: events at the target's timestamp are left out (default) or count as
    before it when read earlier."""
    rows = [ev("u", "a", 1), ev("u", "b", 2), ev("u", "c", 5), ev("u", "d", 5), ev("u", "e", 5)]
    kw = {} if rule == "exclude" else {"same_time_history": rule}
    _, _, held = prepare_split(jsonl_cfg(tmp_path, rows, **kw))
    by = {r["split"]: r for r in held.eval_table().to_pylist()}
    assert (by["test"]["target"], by["valid"]["target"]) == ("e", "d")
    assert by["test"]["history"] == test_history and by["valid"]["history"] == valid_history


def test_untimed_events_are_never_ties(tmp_path):
    rows = [{"user_id": "u", "item_id": k, "domain": "d"} for k in "abcd"]
    _, _, held = prepare_split(jsonl_cfg(tmp_path, rows))
    assert {r["split"]: r["history"] for r in held.eval_table().to_pylist()} == {
        "valid": ["a", "b"],
        "test": ["a", "b", "c"],
    }
    with pytest.raises(ValueError, match="data.same_time_history"):
        DataConfig(same_time_history="before")


def test_loo_targets_vectorized_matches_definition():
    rng = np.random.default_rng(0)
    from cprec.prepare.schema import InteractionsBuilder

    b = InteractionsBuilder()
    f = b.file_code("f")
    for k in range(400):
        b.add(f"u{rng.integers(20)}", f"i{k}", f"d{rng.integers(3)}", float(rng.integers(50)), f, k + 1)
    inter = b.build().sort_by_user_time()
    target = leave_one_out_targets(inter)
    groups = defaultdict(list)
    for r in range(len(inter)):
        groups[(inter.user[r], inter.domain[r])].append(r)
    for rows in groups.values():
        want = [0] * len(rows)
        if len(rows) >= 3:
            want[-1], want[-2] = 2, 1
        assert target[rows].tolist() == want


def test_cleaning_policies_are_counted(tmp_path):
    rows = [
        ev("u", "a", 1),
        ev("u", "a", 1),  # duplicate (user, item, time)
        ev("u", "b", 2),
        ev("u", "c", 3),
        ev("u", "z", 4, domain="other"),  # not in data.domains
        ev("short", "a", 1),
        ev("short", "b", 2),  # only 2 events: dropped
    ]
    ds, issues, held = prepare_split(jsonl_cfg(tmp_path, rows, domains=["d"]))
    assert dict(issues.dropped) == {"duplicate_event": 1, "unknown_domain": 1, "user_too_few_interactions": 2}
    assert held.counts == {"train": 1, "valid": 1, "test": 1} and reconciles(ds, issues, held)
    ds, issues, held = prepare_split(jsonl_cfg(tmp_path, rows, domains=["d"], dedup="keep_all"))
    assert "duplicate_event" not in issues.dropped and held.counts["train"] == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"domains": ["d"]}, r"e\.jsonl:5: unknown_domain"),
        ({"domains": ["d", "other"]}, r"e\.jsonl:2: duplicate_event"),
    ],
)
def test_cleaning_strict_names_file_and_line(tmp_path, kw, match):
    rows = [
        ev("u", "a", 1),
        ev("u", "a", 1),
        ev("u", "b", 2),
        ev("u", "c", 3),
        ev("u", "z", 4, domain="other"),
    ]
    with pytest.raises(ValueError, match=match):
        prepare_split(jsonl_cfg(tmp_path, rows, **kw), strict=True)


def test_too_few_interactions_strict(tmp_path):
    rows = [ev("u", "a", 1), ev("u", "b", 2), ev("u", "c", 3), ev("s", "a", 1)]
    with pytest.raises(ValueError, match=r"e\.jsonl:4: user_too_few_interactions.*'s' has 1 < 3"):
        prepare_split(jsonl_cfg(tmp_path, rows), strict=True)


def test_items_without_text(tmp_path):
    rows = [ev("u", k, t) for t, k in enumerate("abcd")]
    items = write_jsonl(
        tmp_path / "items.jsonl",
        [
            {"item_id": "a", "title": "A"},
            {"item_id": "b", "title": "B"},
            {"item_id": "c", "title": "C"},
            {"item_id": "d", "title": ""},
        ],
    )
    cfg = jsonl_cfg(tmp_path, rows, item_path=str(items))
    ds, issues, held = prepare_split(cfg)
    assert ds.items["d"].title == "d" and issues.item_issues["placeholder_text"] == 1
    assert held.counts["test"] == 1
    cfg = jsonl_cfg(tmp_path, rows, item_path=str(items), missing_text="drop")
    ds, issues, held = prepare_split(cfg)
    assert issues.dropped == {"item_without_text": 1} and "d" not in ds.items and reconciles(ds, issues, held)
    with pytest.raises(ValueError, match=r"e\.jsonl:4: item_without_text"):
        prepare_split(jsonl_cfg(tmp_path, rows, item_path=str(items)), strict=True)


def test_item_issue_summary_names_the_item_never_an_empty_location(tmp_path, caplog):
    rows = [ev("u", k, t) for t, k in enumerate("abcd")]
    items = write_jsonl(tmp_path / "items.jsonl", [{"item_id": k, "title": k.upper()} for k in "abc"])
    ds, issues, held = prepare_split(jsonl_cfg(tmp_path, rows, item_path=str(items)))
    with caplog.at_level("INFO", logger="cprec.prepare.schema"):
        issues.log_summary()
        bare = IssueLog()
        bare.item_issues["placeholder_text"] += 2  # counted where no location is known
        bare.log_summary()
    lines = [r.getMessage() for r in caplog.records]
    assert "item issue x1: placeholder_text (first: item 'd' has no text)" in lines
    assert "item issue x2: placeholder_text" in lines
    assert not any("(first: )" in line for line in lines)


def test_presplit_food_kitchen_targets(tmp_path):
    root = write_food_kitchen(tmp_path)
    ds, issues, held = prepare_split(DataConfig(source="food_kitchen", path=str(root)))
    table = {r["user"]: r for r in held.eval_table().to_pylist()}
    assert set(table) == {"valid-1", "valid-2", "test-1", "test-2"}
    assert table["valid-1"] == {
        "user": "valid-1",
        "split": "valid",
        "domain": "B",
        "history": ["0", "7", "2"],
        "target": "11",
    }
    assert table["test-1"]["domain"] == "A" and table["test-1"]["target"] == "4"
    # training-only users give no targets; valid/test histories stay in pre-training
    train = {r["user"]: r["items"] for r in train_sequences_table(held.train).to_pylist()}
    assert train["valid-1"] == ["0", "7", "2"] and train["trainA-1"] == ["0", "1", "2", "3"]
    assert held.counts == {"train": 35, "valid": 2, "test": 2} and reconciles(ds, issues, held)


def assert_no_leakage(ds, held, renderer: PromptRenderer, kinds=("domain", "mixed")):
    """No held-out target is a pre-training interaction, nor appears in the user's rendered text."""
    train = held.train
    per_user = defaultdict(Counter)
    for u, i in zip(train.user, train.item):
        per_user[train.users[u]][train.items[i]] += 1
    targets = list(zip(held.eval_user, held.eval_target, held.eval_history))
    assert targets
    for user, target, history in targets:
        # a repeat of the target earlier in the history may legitimately be in pre-training
        assert per_user[user][target] <= history.count(target), (user, target)
    # rendered documents: what the tokenizer would see
    items = list(ds.items)
    index = np.full(len(train.items), -1)
    pos = {k: n for n, k in enumerate(items)}
    for code, k in enumerate(train.items):
        index[code] = pos.get(k, -1)
    specs = build_specs(train, index, list(kinds), 2, seed=0)
    docs = defaultdict(list)
    for user, domain, kind, idx in specs:
        texts = [renderer.item(ds.items[items[i]], mixed=kind == "mixed") for i in idx.tolist()]
        docs[user].append(renderer.sequence(kind, domain, texts))
    checked = 0
    for user, target, history in targets:
        title = ds.items[target].title
        trained = {ds.items[k].title for k in per_user[user]}
        if target in history or any(title in t for t in trained):
            continue  # same title on another (kept) item: text cannot tell them apart
        assert not any(title in d for d in docs[user]), (user, target, title)
        checked += 1
    return checked


def test_no_leakage_on_fixture(tmp_path):
    rows = [
        ev(f"u{u}", f"item{(u * 7 + k) % 23}", k, "A" if k % 3 else "B") for u in range(10) for k in range(9)
    ]
    ds, _, held = prepare_split(jsonl_cfg(tmp_path, rows))
    assert assert_no_leakage(ds, held, PromptRenderer(PromptConfig())) > 0


def test_no_leakage_on_real_food_kitchen(food_kitchen_dir):
    """The real data: no validation/test target in any user's pre-training interactions or text."""
    ds, issues, held = prepare_split(DataConfig(source="food_kitchen", path=str(food_kitchen_dir)))
    assert held.counts["valid"] == 960 and held.counts["test"] == 937 and reconciles(ds, issues, held)
    checked = assert_no_leakage(ds, held, PromptRenderer(PromptConfig()))
    assert checked > 1800  # nearly every target has a distinctive title


# ----------------------------------------------------------------- one bad record, one drop
def poisoned_rows() -> tuple[list[dict], int]:
    """Users u0..u10 each eat i5 (food) once; a single ``video`` event on i5 comes before all of
    them. Returns the rows and the poisoned row's line number (1-based, like the reader's)."""
    rows = []
    for u in range(10):
        rows += [ev(f"u{u}", f"f{u}", 1, "food"), ev(f"u{u}", f"k{u}", 2, "kitchen")]
    rows.append(ev("u2", "i5", 3, "video"))  # line 21: the one bad record
    line = len(rows)
    for u in range(11):
        rows += [ev(f"u{u}", "i5", 4, "food"), ev(f"u{u}", f"g{u}", 5, "food")]
    rows += [ev("u10", "f10", 1, "food"), ev("u10", "k10", 2, "kitchen")]
    return rows, line


def test_unknown_domain_event_does_not_decide_its_items_domain(tmp_path):
    rows, _ = poisoned_rows()
    ds, issues, held = prepare_split(jsonl_cfg(tmp_path, rows, domains=["food", "kitchen"]))
    assert dict(issues.dropped) == {"unknown_domain": 1}  # no cascading item_domain_conflict
    assert ds.items["i5"].domain == "food"
    kept = sum(held.train.items[c] == "i5" for c in held.train.item)
    kept += sum(t == "i5" for t in held.eval_target)
    assert kept == 11 and reconciles(ds, issues, held)


def test_strict_mode_names_the_poisoned_record(tmp_path):
    rows, line = poisoned_rows()
    assert line == 21
    with pytest.raises(ValueError, match=rf"e\.jsonl:{line}: unknown_domain.*'video'"):
        prepare_split(jsonl_cfg(tmp_path, rows, domains=["food", "kitchen"]), strict=True)


def test_an_item_takes_the_domain_of_most_of_its_events(tmp_path):
    """A stray event in an allowed but wrong domain costs itself only, and strict mode names it."""
    rows = [ev("u0", "x", 1, "kitchen")] + [ev(f"u{u}", "x", 2, "food") for u in range(5)]
    ds = read_source(jsonl_cfg(tmp_path, rows), issues := IssueLog())
    assert dict(issues.dropped) == {"item_domain_conflict": 1} and len(ds.interactions) == 5
    assert ds.items["x"].domain == "food"
    match = r"e\.jsonl:1: item_domain_conflict.*5 of its 6 events are in 'food'"
    with pytest.raises(ValueError, match=match):
        read_source(jsonl_cfg(tmp_path, rows), IssueLog(strict=True))


# ------------------------------------------------------------------ pre-split generic sources
def _presplit_rows() -> list[dict]:
    """u1: 4 train events, then a valid and a test event (the log's own split, labelled 'val' and
    'eval'); u2: training only, long enough that leave-one-out would hold out two of its events."""
    rows = [ev("u1", f"a{k}", k) | {"part": "train"} for k in range(4)]
    rows += [ev("u1", "a8", 8) | {"part": "val"}, ev("u1", "a9", 9) | {"part": "eval"}]
    rows += [ev("u2", f"a{k}", k) | {"part": "train"} for k in range(6)]
    rows.append(ev("u2", "a7", 7) | {"part": "holdout"})  # not in data.split_values: counted
    return rows


def _write_rows(path, rows, fmt):
    if fmt == "jsonl":
        return write_jsonl(path, rows)
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    return path


SPLIT_VALUES = {"train": "train", "val": "valid", "eval": "test"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_split_column_of_a_generic_source_is_used_not_leave_one_out(tmp_path, fmt):
    path = _write_rows(tmp_path / f"e.{fmt}", _presplit_rows(), fmt)
    cfg = DataConfig(source=fmt, path=str(path), split_values=SPLIT_VALUES)
    cfg.columns.split = "part"
    ds, issues, held = prepare_split(cfg)
    assert ds.presplit and dict(issues.dropped) == {"unknown_split": 1}
    table = held.eval_table().to_pylist()
    assert [(r["user"], r["split"], r["target"], r["history"]) for r in table] == [
        ("u1", "valid", "a8", ["a0", "a1", "a2", "a3"]),
        ("u1", "test", "a9", ["a0", "a1", "a2", "a3", "a8"]),
    ]
    assert held.counts == {"train": 10, "valid": 1, "test": 1} and reconciles(ds, issues, held)
    with pytest.raises(ValueError, match=rf"e\.{fmt}:\d+: unknown_split.*'holdout'"):
        prepare_split(cfg, strict=True)


def test_separate_files_per_split(tmp_path):
    rows = [r for r in _presplit_rows() if r["part"] != "holdout"]
    files = {}
    for part, name in SPLIT_VALUES.items():
        mine = [{k: v for k, v in r.items() if k != "part"} for r in rows if r["part"] == part]
        files[name] = str(_write_rows(tmp_path / f"{name}.csv", mine, "csv"))
    cfg = DataConfig(source="csv", split_files=files)
    ds, issues, held = prepare_split(cfg)
    assert ds.presplit and not issues.dropped
    got = [(r["user"], r["split"], r["target"], len(r["history"])) for r in held.eval_table().to_pylist()]
    assert got == [("u1", "valid", "a8", 4), ("u1", "test", "a9", 5)]
    assert held.counts == {"train": 10, "valid": 1, "test": 1}
    with pytest.raises(ValueError, match="data.split_files"):
        DataConfig(source="csv", split_files={"dev": "x.csv"})
    with pytest.raises(ValueError, match="data.split_files or data.path"):
        DataConfig(source="csv", path="events.csv", split_files=files)
    with pytest.raises(ValueError, match="data.split_values.dev"):
        DataConfig(source="csv", split_values={"dev": "validation"})
