"""Readers: round trip of every input format on tiny fixtures, and the bad-input policies."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle

import pytest
from raw_fixtures import (
    EVENTS,
    TITLES,
    write_amazon,
    write_food_kitchen,
    write_generic,
    write_jsonl,
    write_ml1m_cache,
    write_recbole,
)

from cprec.config import ColumnsConfig, DataConfig
from cprec.prepare.readers import read_source
from cprec.prepare.readers.food_kitchen import load_plain_dict
from cprec.prepare.readers.records import open_text, parse_time
from cprec.prepare.schema import TEST_TARGET, VALID_TARGET, IssueLog


def events_of(ds) -> list[tuple]:
    """(user, item, domain, time) per kept event, in read order."""
    x = ds.interactions
    return [
        (x.users[u], x.items[i], x.domains[d], None if math.isnan(t) else t)
        for u, i, d, t in zip(x.user, x.item, x.domain, x.time)
    ]


def expected(scale: float = 1.0) -> list[tuple]:
    return [(u, i, d, float(t) * scale) for u, i, d, t in EVENTS]


def cfg_for(source: str, **kw) -> DataConfig:
    kw.setdefault("columns", ColumnsConfig(text=["title", "author"]))
    return DataConfig(source=source, **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_generic_round_trip(tmp_path, fmt):
    ev, it = write_generic(tmp_path, fmt)
    ds = read_source(cfg_for(fmt, path=str(ev), item_path=str(it)), IssueLog())
    got = events_of(ds)
    assert [(u, i, d) for u, i, d, _ in got] == [(u, i, d) for u, i, d, _ in expected()]
    assert [t for *_, t in got] == [float(t) for *_, t in EVENTS]
    assert ds.interactions_in == len(EVENTS)
    assert {k: (v.title, v.fields["author"]) for k, v in ds.items.items()} == TITLES
    assert ds.items["m1"].domain == "movies" and ds.items["i1"].domain == "books"
    assert [str(p) for p in ds.sources] == [str(ev), str(it)]


def test_generic_without_domain_or_time_uses_defaults(tmp_path):
    rows = [{"u": "a", "i": str(k)} for k in range(3)]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    cfg = DataConfig(
        source="jsonl", path=str(path), columns=ColumnsConfig(user="u", item="i"), default_domain="d0"
    )
    ds = read_source(cfg, IssueLog())
    assert events_of(ds) == [("a", "0", "d0", None), ("a", "1", "d0", None), ("a", "2", "d0", None)]
    assert all(it.title == it.item for it in ds.items.values())  # no item file: ids as text


def test_gzip_detected_by_content(tmp_path):
    path = tmp_path / "events.jsonl"  # gzip bytes under a plain name
    with gzip.open(path, "wt") as f:
        f.write('{"user_id": "a", "item_id": "b"}\n')
    assert open_text(path).read().strip() == '{"user_id": "a", "item_id": "b"}'


@pytest.mark.parametrize("version", ["amazon2018", "amazon2023"])
@pytest.mark.parametrize("gz", [False, True])
def test_amazon_round_trip(tmp_path, version, gz):
    files, metas = write_amazon(tmp_path, version, gz)
    ds = read_source(cfg_for(version, files=files, meta_files=metas), IssueLog())
    got = sorted(events_of(ds))
    assert got == sorted(expected())  # 2023 timestamps are milliseconds: divided back to seconds
    assert {k: (v.title, v.fields["author"]) for k, v in ds.items.items()} == TITLES
    assert len(ds.sources) == 4


def test_recbole_round_trip(tmp_path):
    folder = write_recbole(tmp_path)
    ds = read_source(cfg_for("recbole", path=str(folder)), IssueLog())
    assert events_of(ds) == expected()
    assert {k: (v.title, v.fields["author"]) for k, v in ds.items.items()} == TITLES
    assert [p.name for p in ds.sources] == ["toy.inter", "toy.item"]


def test_food_kitchen_round_trip(tmp_path):
    root = write_food_kitchen(tmp_path)
    ds = read_source(DataConfig(source="food_kitchen", path=str(root)), IssueLog())
    x = ds.interactions
    assert ds.presplit and ds.closed_catalogue
    assert len(ds.items) == 12 and ds.items["0"].title == "Food item 0 deluxe" and ds.items["6"].domain == "B"
    users = {x.users[u] for u in x.user}
    assert {"trainA-1", "trainB-2", "overlap-1", "valid-2", "test-1"} <= users
    # valid-1 = [0, 7, 2, 11]: file order kept, last item is the validation target, domain by id
    rows = [r for r in range(len(x)) if x.users[x.user[r]] == "valid-1"]
    assert [x.items[x.item[r]] for r in rows] == ["0", "7", "2", "11"]
    assert [x.domains[x.domain[r]] for r in rows] == ["A", "B", "A", "B"]
    assert [int(x.target[r]) for r in rows] == [0, 0, 0, VALID_TARGET]
    assert int(x.target[[r for r in range(len(x)) if x.users[x.user[r]] == "test-2"][-1]]) == TEST_TARGET
    assert ds.interactions_in == len(x) == 4 + 4 + 3 + 3 + 4 + 5 + 4 + 4 + 4 + 4


def test_ml1m_from_cache_with_genre_domains(tmp_path):
    cache = write_ml1m_cache(tmp_path)
    domain_map = {"Action": "action", "Comedy": "comedy", "Drama": "drama"}
    issues = IssueLog()
    ds = read_source(DataConfig(source="ml1m", cache_dir=str(cache), domain_map=domain_map), issues)
    assert ds.items["Heat (1995)"].domain == "action"
    assert ds.items["Toy Story (1995)"].domain == "comedy"  # Animation unmapped, Comedy is
    assert ds.items["Toy Story (1995)"].fields == {"year": "1995", "genres": "Animation, Children's, Comedy"}
    assert "Nanook of the North (1922)" not in ds.items  # Documentary unmapped: dropped, counted
    assert issues.dropped == {"no_domain_for_genre": 4}
    assert ds.interactions_in == 20 and len(ds.interactions) == 16


# ----------------------------------------------------------------------------- bad input
def test_corrupt_jsonl_lines_are_counted(tmp_path):
    lines = [
        '{"user_id": "a", "item_id": "x", "timestamp": 1}',
        "{not json",
        '{"user_id": "a", "timestamp": 2}',
        '{"user_id": "a", "item_id": "y", "timestamp": "yesterday"}',
        '["a", "list"]',
        '{"user_id": "b", "item_id": "x", "timestamp": "2020-01-02T03:04:05Z"}',
        "",
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(lines) + "\n")
    issues = IssueLog()
    ds = read_source(DataConfig(source="jsonl", path=str(path)), issues)
    assert issues.dropped == {"unparsable_line": 2, "missing_field": 1, "bad_timestamp": 1}
    assert ds.interactions_in == 6  # blank lines are not records
    assert events_of(ds)[1][3] == 1577934245.0


@pytest.mark.parametrize(
    "content, reason, line",
    [
        ('{"user_id": "a", "item_id": "x"}\n{broken\n', "unparsable_line", 2),
        ('{"user_id": "a", "item_id": "x"}\n{"user_id": "", "item_id": "y"}\n', "missing_field", 2),
    ],
)
def test_strict_mode_names_file_and_line(tmp_path, content, reason, line):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"{path}:{line}: {reason}"):
        read_source(DataConfig(source="jsonl", path=str(path), strict=True), IssueLog(strict=True))


def test_csv_wrong_field_count_and_missing_column(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\na,x,1\na,y\nb,x,2,extra\nb,z,3\n")
    issues = IssueLog()
    ds = read_source(DataConfig(source="csv", path=str(path)), issues)
    assert issues.dropped == {"unparsable_line": 2} and len(ds.interactions) == 2
    with pytest.raises(ValueError, match=r"e\.csv:3: unparsable_line"):
        read_source(DataConfig(source="csv", path=str(path)), IssueLog(strict=True))
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item_id\na,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv: missing column 'user_id' \(data\.columns\.user\)"):
        read_source(DataConfig(source="csv", path=str(bad)), IssueLog())


def test_missing_text_column_in_item_file(tmp_path):
    ev, it = write_generic(tmp_path, "csv")
    cfg = cfg_for("csv", path=str(ev), item_path=str(it), columns=ColumnsConfig(text=["title", "year"]))
    with pytest.raises(ValueError, match=r"items\.csv: missing text column\(s\) \['year'\]"):
        read_source(cfg, IssueLog())


def test_recbole_bad_lines(tmp_path):
    folder = write_recbole(tmp_path)
    inter = folder / "toy.inter"
    inter.write_text(inter.read_text() + "u9\ti1\tbooks\n" + "u9\ti1\tbooks\tnot-a-time\n")
    issues = IssueLog()
    ds = read_source(cfg_for("recbole", path=str(folder)), issues)
    assert issues.dropped == {"unparsable_line": 1, "bad_timestamp": 1}
    assert ds.interactions_in == len(EVENTS) + 2
    with pytest.raises(ValueError, match=r"toy\.inter:18: unparsable_line"):
        read_source(cfg_for("recbole", path=str(folder)), IssueLog(strict=True))


def test_item_in_two_domains_is_a_conflict(tmp_path):
    rows = [
        {"user_id": "a", "item_id": "x", "domain": "d1"},
        {"user_id": "b", "item_id": "x", "domain": "d2"},
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    issues = IssueLog()
    ds = read_source(DataConfig(source="jsonl", path=str(path)), issues)
    assert issues.dropped == {"item_domain_conflict": 1} and ds.interactions_in == 2
    with pytest.raises(ValueError, match=r"e\.jsonl:2: item_domain_conflict"):
        read_source(DataConfig(source="jsonl", path=str(path)), IssueLog(strict=True))


def test_food_kitchen_bad_lines_and_unknown_items(tmp_path):
    root = write_food_kitchen(tmp_path)
    with open(root / "train_A.txt", "a") as f:
        f.write("no tab here\n3\t1,2,99,x,3\n")
    issues = IssueLog()
    ds = read_source(DataConfig(source="food_kitchen", path=str(root)), issues)
    assert issues.dropped == {"unparsable_line": 1, "unknown_item": 2}
    x = ds.interactions
    assert [x.items[x.item[r]] for r in range(len(x)) if x.users[x.user[r]] == "trainA-3"] == ["1", "2", "3"]
    with pytest.raises(ValueError, match=r"train_A\.txt:3: unparsable_line"):
        read_source(DataConfig(source="food_kitchen", path=str(root)), IssueLog(strict=True))


def test_missing_input_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found"):
        read_source(DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")), IssueLog())
    root = write_food_kitchen(tmp_path)
    os.remove(root / "valid.txt")
    with pytest.raises(FileNotFoundError, match="lacks valid.txt"):
        read_source(DataConfig(source="food_kitchen", path=str(root)), IssueLog())


# ------------------------------------------------------------------------- safe unpickling
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(ValueError, match="not a plain-data pickle"):
        load_plain_dict(path, str)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"expected dict\[str, str\]"):
        load_plain_dict(path, str)
    path.write_bytes(pickle.dumps({"a": "b"}))
    assert load_plain_dict(path, str) == {"a": "b"}


def test_parse_time():
    assert parse_time(5) == 5.0 and parse_time("7.5") == 7.5
    assert parse_time("1970-01-01T00:01:00") == 60.0
    assert parse_time("soon") is None and parse_time(True) is None


def test_real_food_kitchen_reader(food_kitchen_dir):
    issues = IssueLog()
    ds = read_source(DataConfig(source="food_kitchen", path=str(food_kitchen_dir)), issues)
    x = ds.interactions
    assert len(ds.items) == 8661 + 27637
    users = {x.users[u].split("-")[0] for u in x.user}
    assert users == {"trainA", "trainB", "overlap", "valid", "test"}
    assert int((x.target == VALID_TARGET).sum()) == 960 and int((x.target == TEST_TARGET).sum()) == 937
    test_domains = [x.domains[d] for d in x.domain[x.target == TEST_TARGET]]
    assert test_domains.count("A") == 300 and test_domains.count("B") == 637  # as the README says
    assert ds.interactions_in == len(x) and not issues.dropped
    assert json.dumps(ds.items["0"].__dict__)  # plain data


def test_item_rows_without_id_or_repeated_are_counted(tmp_path):
    """Item files (tabular and RecBole): a row without an id and a repeated item are counted, the
    first row of a repeated item wins, and strict mode names file and line."""
    ev, it = write_generic(tmp_path, "csv")
    it.write_text(it.read_text() + ",No id,Nobody\n" + "m1,Second title,Someone\n")
    issues = IssueLog()
    ds = read_source(cfg_for("csv", path=str(ev), item_path=str(it)), issues)
    assert issues.item_issues == {"item_row_without_id": 1, "duplicate_item_row": 1}
    assert ds.items["m1"].title == TITLES["m1"][0]
    with pytest.raises(ValueError, match=rf"{it.name}:\d+: item_row_without_id"):
        read_source(cfg_for("csv", path=str(ev), item_path=str(it)), IssueLog(strict=True))

    (tmp_path / "rb").mkdir()
    folder = write_recbole(tmp_path / "rb")
    item_file = folder / "toy.item"
    item_file.write_text(item_file.read_text() + "\tNo id\tNobody\n" + "m1\tSecond title\tSomeone\n")
    issues = IssueLog()
    ds = read_source(cfg_for("recbole", path=str(folder)), issues)
    assert issues.item_issues == {"item_row_without_id": 1, "duplicate_item_row": 1}
    assert ds.items["m1"].title == TITLES["m1"][0]


def test_every_source_the_config_accepts_has_one_reader():
    """The registry and data.source's allowed values list the same sources."""
    import re

    from cprec.config import DataConfig
    from cprec.prepare.readers import SOURCES

    for name in SOURCES:
        DataConfig(source=name)
    with pytest.raises(ValueError, match="data.source") as err:
        DataConfig(source="no_such_source")
    allowed = re.search(r"one of \[(.*)\]", str(err.value)).group(1)
    assert set(re.findall(r"'(\w+)'", allowed)) == set(SOURCES)
