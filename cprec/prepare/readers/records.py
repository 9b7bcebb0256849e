"""Reading records from source files: opening, row iteration, value parsing, event rows.

What every reader shares (one module per source sits beside this one, see ``__init__``). Policy
for bad input, shared by every reader: a whole-file problem (missing file, missing required column)
raises ``ValueError`` naming the file; a bad record (unparsable line, missing value, bad timestamp)
is counted in the ``IssueLog`` under a reason, or raises naming file and line when ``data.strict``
is set. Every record read is either kept or counted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cprec.prepare.schema import NO_TARGET, InteractionsBuilder, IssueLog

TABULAR_EXT = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "csv": (".csv", ".tsv", ".csv.gz", ".tsv.gz"),
}


# ------------------------------------------------------------------------------ small helpers
def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping (detected by magic bytes, not by name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar over records (shown on a terminal only)."""
    return tqdm(iterable, desc=desc, total=total, unit=" rec", mininterval=1.0, disable=None, leave=False)


def as_id(value: Any) -> str:
    """An id value as a string ('' when missing); integral floats lose their '.0'."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def as_text(value: Any) -> str:
    """A text field as one string: lists joined by ', ', mappings as 'key: value' pairs."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (as_text(v) for v in value) if t)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {t}" for k, v in value.items() if (t := as_text(v)))
    return " ".join(str(value).split()) if "\n" in str(value) else str(value).strip()


def parse_time(value: Any) -> float | None:
    """Seconds from a number or an ISO-8601 string; None when unparsable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def files_of(path: str | Path, fmt: str) -> list[Path]:
    """A file, or the files of this format inside a folder (sorted, for a stable order)."""
    p = Path(path).expanduser()
    if not str(path):
        raise ValueError(f"data.path is empty: source '{fmt}' needs an input file or folder")
    if p.is_dir():
        exts = TABULAR_EXT.get(fmt, (".parquet",))
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(exts))
        if not files:
            raise FileNotFoundError(f"no {fmt} files ({', '.join(exts)}) in folder {p}")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    return [p]


# -------------------------------------------------------------------- tabular rows
def iter_rows(path: Path, fmt: str, bad: Callable) -> tuple[list[str] | None, Iterator[tuple[int, dict]]]:
    """(header or None for JSONL, iterator of (line number, row dict)) for jsonl / csv / parquet.

    ``bad(reason, path, line, detail)`` is told about each unparsable record (``IssueLog.drop`` for
    event files, ``IssueLog.item_issue`` for item files).
    """
    if fmt == "jsonl":
        return None, iter_jsonl(path, bad)
    if fmt == "csv":
        f = open_text(path)
        delim = "\t" if ".tsv" in path.name else ","
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV file (no header line)")
        header = [h.strip() for h in header]
        return header, _iter_csv(path, reader, header, bad, f)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        header = pf.schema_arrow.names
        return header, _iter_parquet(pf)
    raise ValueError(f"unknown tabular format {fmt!r}")


def iter_jsonl(path: Path, bad: Callable) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad("unparsable_line", path, lineno, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                bad("unparsable_line", path, lineno, "a JSON line must be an object")
                continue
            yield lineno, row


def _iter_csv(path, reader, header, bad, f) -> Iterator[tuple[int, dict]]:
    with f:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                bad("unparsable_line", path, reader.line_num, f"{len(row)} fields, header has {len(header)}")
                continue
            yield reader.line_num, dict(zip(header, row))


def _iter_parquet(pf) -> Iterator[tuple[int, dict]]:
    n = 0
    for batch in pf.iter_batches(batch_size=65536):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def require_columns(header: list[str] | None, names: dict[str, str], path: Path) -> None:
    """Fail naming the file when a required column (config field -> column) is absent."""
    if header is None:
        return
    for field_name, col in names.items():
        if col not in header:
            raise ValueError(f"{path}: missing column '{col}' ({field_name}); columns present: {header}")


class EventReader:
    """Turns (user, item, domain, time) values of one record into a builder row or a counted drop."""

    def __init__(self, builder: InteractionsBuilder, issues: IssueLog):
        self.builder = builder
        self.issues = issues

    def add(
        self, path, fcode, line, user, item, domain, time_value, timed: bool, target: int = NO_TARGET
    ) -> None:
        user, item = as_id(user), as_id(item)
        if not user or not item:
            self.issues.drop("missing_field", path, line, "empty user or item")
            return
        if not domain:
            self.issues.drop("missing_field", path, line, "empty domain")
            return
        t = math.nan
        if timed:
            if time_value is None or as_id(time_value) == "":
                self.issues.drop("missing_field", path, line, "empty timestamp")
                return
            parsed = parse_time(time_value)
            if parsed is None:
                self.issues.drop("bad_timestamp", path, line, f"cannot parse {time_value!r}")
                return
            t = parsed
        self.builder.add(user, item, domain, t, fcode, line, target)


# ---------------------------------------------------------------------- RecBole atomic files
def iter_atomic(path: Path, bad: Callable) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """RecBole atomic file: header 'name:type' (tab separated) -> (names, iterator of (line, fields))."""
    f = open_text(path)
    first = f.readline()
    if not first.strip():
        raise ValueError(f"{path}: empty RecBole file (no header line)")
    names = [h.split(":", 1)[0].strip() for h in first.rstrip("\r\n").split("\t")]

    def rows():
        with f:
            n = len(names)
            for lineno, line in enumerate(f, 2):
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != n:
                    if line.strip():
                        bad("unparsable_line", path, lineno, f"{len(parts)} fields, header has {n}")
                    continue
                yield lineno, parts

    return names, rows()
