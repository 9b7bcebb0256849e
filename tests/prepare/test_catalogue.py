"""The item catalogue: items of the item file with text and a known domain are candidates even
without any interaction (cold items); the ones that cannot be are counted."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
from raw_fixtures import tiny_config, write_amazon, write_jsonl

from cprec.config import DataConfig
from cprec.eval.inputs import load_inputs
from cprec.eval.ranking import build_tasks, cold_counts
from cprec.prepare import pipeline
from cprec.prepare.readers import read_source
from cprec.prepare.schema import IssueLog

WORDS = "red blue green small large coffee tea mug pan knife bowl lamp".split()


def _title(rng: random.Random, item: str) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(3)) + f" {item}"


def write_logs(tmp, with_domain: bool = True):
    """Events on A0-A9/B0-B9, and an item file that also lists items nobody interacted with."""
    rng = random.Random(0)
    events = []
    for u in range(12):
        for t in range(8):
            item = f"{rng.choice('AB') if with_domain else 'A'}{rng.randrange(10)}"
            row = {"user_id": f"u{u}", "item_id": item, "timestamp": 100 + t}
            events.append(row | ({"domain": item[0]} if with_domain else {}))
    items = [
        {"item_id": f"{d}{k}", "title": _title(rng, f"{d}{k}"), "domain": d} for d in "AB" for k in range(10)
    ]
    items += [
        {"item_id": "A90", "title": "green tea cold item", "domain": "A"},  # cold: a candidate
        {"item_id": "B91", "title": "blue pan cold item"},  # no domain known: counted, left out
        {"item_id": "A92", "title": "", "domain": "A"},  # no text and no events: counted, left out
    ]
    if not with_domain:
        for row in items:
            row.pop("domain", None)
    return write_jsonl(tmp / "events.jsonl", events), write_jsonl(tmp / "items.jsonl", items)


def test_items_with_text_but_no_events_are_candidates_in_eval(tmp_path):
    ev, it = write_logs(tmp_path)
    out = pipeline.run(tiny_config(tmp_path, {"source": "jsonl", "path": str(ev), "item_path": str(it)}))
    items = pq.read_table(out / "eval" / "items.parquet").to_pydict()
    domain_of = dict(zip(items["item"], items["domain"]))
    assert domain_of["A90"] == "A"
    assert "B91" not in domain_of and "A92" not in domain_of
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"]["without_events"] == 1
    assert manifest["items"]["item_without_events_or_domain"] == 1
    assert manifest["items"]["item_without_events_or_text"] == 1

    inputs = load_inputs(out, "test")
    tasks = build_tasks(inputs)
    cat = inputs.catalogue
    assert cat.index["A90"] in tasks["A"].rows.tolist()  # ranked against every user of domain A
    counts = cold_counts(inputs, tasks)
    assert counts["A"]["candidates"] == len(cat.domain_rows("A")) == 11
    assert counts["A"]["cold_candidates"] >= 1  # A90, and any item seen only as a held-out target
    assert set(counts) == set(tasks)


def test_single_domain_logs_put_cold_items_in_the_default_domain(tmp_path):
    ev, it = write_logs(tmp_path, with_domain=False)
    cfg = DataConfig(source="jsonl", path=str(ev), item_path=str(it), default_domain="shop")
    issues = IssueLog()
    ds = read_source(cfg, issues)
    assert ds.items["A90"].domain == "shop" and ds.items["B91"].domain == "shop"
    assert "A92" not in ds.items and issues.item_issues["item_without_events_or_text"] == 1


def test_amazon_meta_items_without_reviews_keep_their_files_domain(tmp_path):
    files, metas = write_amazon(tmp_path, "amazon2018", gz=False)
    rows = [json.loads(line) for line in open(metas["movies"])]
    write_jsonl(
        tmp_path / "movies_meta.jsonl", rows + [{"asin": "m99", "title": "Solaris", "author": "Tarkovsky"}]
    )
    metas["movies"] = str(tmp_path / "movies_meta.jsonl")
    ds = read_source(DataConfig(source="amazon2018", files=files, meta_files=metas), IssueLog())
    assert ds.items["m99"].domain == "movies" and ds.items["m99"].title == "Solaris"
