"""Parquet event files read a record batch at a time, column by column, into a builder.

The row path (``records.iter_rows`` + ``records.EventReader``) makes a Python dict and several
Python calls per event, about 5 us each: a 10M-event log kept the distributed path's driver busy
for about a minute before its first bucket task could start (``prepare_scale.json``), a serial
stage that bounded how the job scales with workers. Here each batch's columns are normalised with
Arrow compute, bad rows are found with masks, and ids are interned per distinct value
(``schema.intern``), so the Python work is per distinct user and item, not per event.

The result is the row path's, exactly: the same events in the same order with the same codes, and
the same drop reasons, counts, first examples and line numbers (``tests/prepare/test_columnar.py``
reads one file of bad rows both ways). A file with a column of a type the normalisation does not
cover (floats or booleans as ids, timestamp types, lists) is read by the row path instead
(``columnar_reads``); so is every non-Parquet source.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cprec.prepare.readers.records import as_id, parse_time, progress
from cprec.prepare.schema import IssueLog

BATCH_ROWS = 1 << 19  # Python work is per distinct id in a batch: larger batches, fewer repeats
# What ``as_id``'s ``str.strip`` removes from ASCII text; Arrow trims exactly these. A non-ASCII
# value whose first or last character is not printable ASCII may carry other (Unicode) whitespace:
# those few values are stripped in Python.
_ASCII_SPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_EDGE = r"^[^!-~]|[^!-~]$"


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def _is_time_type(t: pa.DataType) -> bool:
    return _is_id_type(t) or pa.types.is_floating(t)


def columnar_reads(path: Path, columns: dict[str, str | None]) -> bool:
    """Whether the columnar path reads this Parquet file exactly as the row path would (its id
    columns strings or integers, its time column those or floats)."""
    schema = pq.read_schema(path)
    for name, column in columns.items():
        if column and column in schema.names:
            t = schema.field(column).type
            if not (_is_time_type(t) if name == "time" else _is_id_type(t)):
                return False
    return True


def ids(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """``as_id`` over a column: (strings, missing mask); a missing value (null, or '' after
    stripping) is '' in the strings."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type):
        strings = pc.cast(col, pa.string())
    else:
        strings = pc.utf8_trim(col.cast(pa.string()), characters=_ASCII_SPACE)
        other = pc.invert(pc.fill_null(pc.string_is_ascii(strings), True)).to_numpy(zero_copy_only=False)
        if other.any():
            rows = np.flatnonzero(other)
            edge = pc.match_substring_regex(strings.take(rows), _EDGE).to_numpy(zero_copy_only=False)
            if edge.any():
                values = strings.to_pylist()
                for i in rows[edge].tolist():
                    values[i] = as_id(values[i])
                strings = pa.array(values, pa.string())
    strings = pc.fill_null(strings, "")
    missing = pc.equal(strings, "").to_numpy(zero_copy_only=False)
    return strings, missing


class _Times:
    """``parse_time`` over a column: seconds, plus masks of missing and unparsable values."""

    def __init__(self, col: pa.Array):
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        self.col = col
        n = len(col)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            self.seconds = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
            self.missing = np.isnan(self.seconds)  # nulls come out as NaN; as_id(NaN) == ''
            self.bad = np.zeros(n, dtype=bool)
            return
        self.seconds = np.full(n, np.nan)
        self.missing = np.zeros(n, dtype=bool)
        self.bad = np.zeros(n, dtype=bool)
        for i, v in enumerate(col.to_pylist()):
            if v is None or as_id(v) == "":
                self.missing[i] = True
                continue
            t = parse_time(v)
            if t is None:
                self.bad[i] = True
            else:
                self.seconds[i] = t


class BatchRules:
    """The row path's checks, in its order, for one file: the first failing check of a row is its
    drop reason (``codes``, indexing ``reasons``: the reason and a function writing the detail the
    row path would have written for that row)."""

    def __init__(self, split_column: str | None, split_values: dict[str, str], targets: dict[str, int]):
        self.split_column = split_column
        self.split_values = split_values
        self.targets = targets
        self.reasons: list[tuple[str, Callable[[dict, int], str]]] = [
            ("", lambda b, i: ""),
            ("missing_field", lambda b, i: f"empty split ({split_column!r})"),
            ("unknown_split", self._unknown_split),
            ("missing_field", lambda b, i: "empty user or item"),
            ("missing_field", lambda b, i: "empty domain"),
            ("missing_field", lambda b, i: "empty timestamp"),
            ("bad_timestamp", lambda b, i: f"cannot parse {b['time'].col[i].as_py()!r}"),
        ]

    def _unknown_split(self, b: dict, i: int) -> str:
        return f"{b['split'][i].as_py()!r} (data.split_values: {sorted(self.split_values)})"

    def codes(self, b: dict, n: int, target: int) -> tuple[np.ndarray, np.ndarray]:
        """(reason code per row, 0 = kept; target per row)."""
        code = np.zeros(n, dtype=np.int8)
        targets = np.full(n, target, dtype=np.int8)

        def mark(k: int, mask: np.ndarray) -> None:
            code[(code == 0) & mask] = k

        if self.split_column:
            split, missing = b["split"], b["split_missing"]
            mark(1, missing)
            enc = split.dictionary_encode()
            names = [self.split_values.get(v) for v in enc.dictionary.to_pylist()]
            known = np.array([s is not None for s in names] + [False], dtype=bool)
            value = np.array([self.targets.get(s, 0) for s in names] + [0], dtype=np.int8)
            idx = enc.indices.to_numpy(zero_copy_only=False)
            mark(2, ~known[idx])
            targets = value[idx]
        mark(3, b["user_missing"] | b["item_missing"])
        mark(4, b["domain_missing"])
        if b["time"] is not None:
            mark(5, b["time"].missing)
            mark(6, b["time"].bad)
        return code, targets

    def drop(self, issues: IssueLog, path: Path, b: dict, code: np.ndarray, line: np.ndarray) -> None:
        """Count the batch's dropped rows: per reason, the first row with its own detail (the
        example, and strict mode's error, are the row path's) and the rest as a count."""
        rows = np.flatnonzero(code)
        by_reason: dict[str, list[int]] = {}
        for i in rows.tolist():
            by_reason.setdefault(self.reasons[code[i]][0], []).append(i)
        for reason, idx in by_reason.items():
            first = idx[0]
            issues.drop(reason, path, int(line[first]), self.reasons[code[first]][1](b, first))
            if len(idx) > 1:  # the rest: counted, located at the second
                i = idx[1]
                issues.drop(reason, path, int(line[i]), self.reasons[code[i]][1](b, i), n=len(idx) - 1)


def read_parquet_events(
    path: Path,
    fcode: int,
    builder,
    issues: IssueLog,
    columns: dict[str, str | None],
    default_domain: str,
    target: int,
    rules: BatchRules,
) -> None:
    """Read one Parquet event file into ``builder.add_batch``. ``columns`` maps user, item, domain,
    time and split to column names (None: the file has none; a missing domain is
    ``default_domain``, a missing time NaN as in the row path)."""
    pf = pq.ParquetFile(path)
    wanted = list(dict.fromkeys(c for c in columns.values() if c))
    bar = progress(None, f"read {path.name}", total=pf.metadata.num_rows)
    first_line = 1
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
        n = batch.num_rows
        line = np.arange(first_line, first_line + n, dtype=np.int64)
        first_line += n
        b: dict = {"time": None}
        for name in ("user", "item", "split"):
            if columns[name]:
                b[name], b[f"{name}_missing"] = ids(batch.column(columns[name]))
        if columns["domain"]:
            b["domain"], b["domain_missing"] = ids(batch.column(columns["domain"]))
        else:
            b["domain"] = pa.repeat(pa.scalar(default_domain, pa.string()), n)
            b["domain_missing"] = np.full(n, not default_domain, dtype=bool)
        if columns["time"]:
            b["time"] = _Times(batch.column(columns["time"]))
        code, targets = rules.codes(b, n, target)
        rules.drop(issues, path, b, code, line)
        keep = code == 0
        k = pa.array(keep)
        seconds = b["time"].seconds[keep] if b["time"] is not None else np.full(int(keep.sum()), np.nan)
        builder.add_batch(
            b["user"].filter(k),
            b["item"].filter(k),
            b["domain"].filter(k),
            seconds,
            fcode,
            line[keep],
            targets[keep],
        )
        bar.update(n)
    bar.close()
