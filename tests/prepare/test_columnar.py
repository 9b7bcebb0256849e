"""The columnar Parquet reader gives the row path's result exactly: events, codes, drops, examples."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cprec.config import ColumnsConfig, DataConfig
from cprec.prepare.buckets import BucketWriter, read_bucket
from cprec.prepare.readers import columnar
from cprec.prepare.readers.generic import read_generic
from cprec.prepare.schema import IssueLog

USERS = [" u1 ", "u2", None, "", "\u3000u3", "u1", "u4\t", "u2", "é5", "\u3000 u6 ", "u1", "\x1fu7é"]
ITEMS = [10, 11, 12, 13, None, 10, 14, 15, 16, 17, 11, 18]
DOMAINS = ["A", "B", "A", "A", "B", "", None, "A", "B", "A", " B", "A"]
TIMES = {
    "int": pa.array([5, 4, 3, 2, 1, 9, 8, 7, 6, 5, 4, 3], pa.int64()),
    "float": pa.array([5.5, None, 3, 2, 1, math.nan, 8, 7, 6, 5, 4, math.inf], pa.float64()),
    "string": pa.array(
        ["5", "2020-01-01T00:00:00Z", " 3 ", "x", "1", "", None, "junk", "6", "5e2", "4", "2021-03-04"],
        pa.string(),
    ),
}
SPLITS = ["train", "valid", "test", "train", "bogus", None, "train", "", "valid", "test", "train", "oops"]


def write_log(folder, time_kind: str, with_split: bool, copies: int = 3):
    """Three files of the same rows (so vocabularies grow across files and batches)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(copies):
        cols = {
            "user": pa.array(USERS, pa.string()).dictionary_encode()
            if k == 1
            else pa.array(USERS, pa.string()),
            "item": pa.array([None if i is None else i + k for i in ITEMS], pa.int64()),
            "domain": pa.array(DOMAINS, pa.string()),
            "ts": TIMES[time_kind],
        }
        if with_split:
            cols["split"] = pa.array(SPLITS, pa.string())
        pq.write_table(pa.table(cols), folder / f"part-{k}.parquet", row_group_size=5)
    return folder


def cfg_for(folder, with_split: bool, **kw) -> DataConfig:
    cols = ColumnsConfig(
        user="user", item="item", domain="domain", timestamp="ts", split="split" if with_split else ""
    )
    return DataConfig(source="parquet", path=str(folder), columns=cols, **kw)


def both_ways(cfg, builder_of=None):
    out = []
    for flag in (True, False):
        issues = IssueLog(cfg.strict)
        builder = builder_of(flag) if builder_of else None
        ds = read_generic(cfg, issues, builder, columnar=flag)
        out.append((ds, issues))
    return out


def assert_same_interactions(a, b) -> None:
    for name in ("user", "item", "domain", "time", "order", "file", "line", "target"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.users, a.items, a.domains, a.files) == (b.users, b.items, b.domains, b.files)


@pytest.mark.parametrize("time_kind", sorted(TIMES))
@pytest.mark.parametrize("with_split", [False, True])
def test_columnar_equals_row_path(tmp_path, monkeypatch, time_kind, with_split):
    monkeypatch.setattr(columnar, "BATCH_ROWS", 4)  # batches that cut across users and row groups
    cfg = cfg_for(write_log(tmp_path / "log", time_kind, with_split), with_split)
    (fast, fi), (rows, ri) = both_ways(cfg)
    assert_same_interactions(fast.interactions, rows.interactions)
    assert fi.dropped == ri.dropped and fi.examples == ri.examples
    assert fi.total_dropped > 0 and len(fast.interactions) > 0
    assert fast.interactions_in == rows.interactions_in


def test_columnar_without_domain_column_uses_the_default(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    pq.write_table(pa.table({"user": ["a", "b", "a"], "item": ["x", "y", ""]}), folder / "e.parquet")
    cfg = DataConfig(source="parquet", path=str(folder), columns=ColumnsConfig(user="user", item="item"))
    (fast, fi), (rows, ri) = both_ways(cfg)
    assert_same_interactions(fast.interactions, rows.interactions)
    assert fast.interactions.domains == [cfg.default_domain] and fi.dropped == ri.dropped


def test_strict_mode_names_the_same_file_and_line(tmp_path):
    cfg = cfg_for(write_log(tmp_path / "log", "string", True), True, strict=True)
    messages = []
    for flag in (True, False):
        with pytest.raises(ValueError) as e:
            read_generic(cfg, IssueLog(True), columnar=flag)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "part-0.parquet:3" in messages[0]


def test_unsupported_column_types_take_the_row_path(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    path = folder / "e.parquet"
    pq.write_table(pa.table({"user": [1.0, 2.5, math.nan], "item": ["x", "y", "z"]}), path)
    assert not columnar.columnar_reads(path, {"user": "user", "item": "item"})
    cfg = DataConfig(source="parquet", path=str(folder), columns=ColumnsConfig(user="user", item="item"))
    (fast, fi), (rows, _) = both_ways(cfg)
    assert fast.interactions.users == ["1", "2.5"] == rows.interactions.users
    assert fi.dropped["missing_field"] == 1


@pytest.mark.parametrize("flush_rows", [7, 10_000])  # pair summaries: sorted, and dense (one flush)
def test_bucket_writer_batches_equal_its_rows(tmp_path, monkeypatch, flush_rows):
    """The spilled buckets of the columnar path hold the row path's events, codes and order."""
    monkeypatch.setattr(columnar, "BATCH_ROWS", 4)
    cfg = cfg_for(write_log(tmp_path / "log", "int", True), True)
    writers = {True: flush_rows, False: 7}
    (fast, _), (rows, _) = both_ways(cfg, lambda flag: BucketWriter(tmp_path / f"b{flag}", 3, writers[flag]))
    a, b = fast.interactions, rows.interactions
    assert (a.items, a.domains, a.files, a.n_rows) == (b.items, b.domains, b.files, b.n_rows)
    np.testing.assert_array_equal(a.bucket_rows, b.bucket_rows)
    assert a.bucket_files == b.bucket_files
    for f in ("item", "domain", "count", "first", "last", "first_file", "first_line"):
        np.testing.assert_array_equal(getattr(a.pairs, f), getattr(b.pairs, f), err_msg=f)
    for bucket in range(3):
        assert_same_interactions(read_bucket(a.folder, bucket, a), read_bucket(b.folder, bucket, b))
