"""`cprec prepare` with data.engine=ray: user buckets, per-bucket Ray tasks, merged manifest.

The Ray tests start one local 2-worker Ray cluster for the module (``ray.init(num_cpus=2)``); the
pipeline joins it instead of starting its own. They skip when Ray is not installed (the ``ray``
extra: ``pip install -e ".[dev,ray]"``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from raw_fixtures import (
    tiny_config,
    write_amazon,
    write_food_kitchen,
    write_generic,
    write_jsonl,
    write_ml1m_cache,
    write_recbole,
)

from cprec.config import DataConfig
from cprec.prepare import pipeline
from cprec.prepare.buckets import BucketWriter, bucket_of, read_bucket
from cprec.prepare.documents import corpus_pick, merge_corpus_picks
from cprec.prepare.schema import NO_TARGET

WORDS = "red blue green small large coffee tea mug pan knife bowl lamp chair desk".split()


def messy_log(tmp: Path, n_users: int = 60, seed: int = 3, bad_lines: bool = True) -> tuple[Path, Path]:
    """A log that exercises every whole-log rule: items whose events are split over two domains
    by different users (each item's domain is decided over all users), events of a third domain,
    duplicates, users below min_interactions, items without text, cold items, a bad line."""
    rng = random.Random(seed)
    items = {f"{d}{k}": d for d in "AB" for k in range(40)}
    rows = []
    for u in range(n_users):
        n = rng.choice([1, 2, 5, 8, 12, 20, 30])  # some users too short to keep
        for t in range(n):
            item = rng.choice(list(items))
            domain = items[item]
            if rng.random() < 0.05:  # a stray event of the item in the other domain
                domain = "B" if domain == "A" else "A"
            if rng.random() < 0.03:
                domain = "C"  # outside data.domains in the filtered case
            rows.append({"user_id": f"user{u}", "item_id": item, "domain": domain, "timestamp": 100 + 5 * t})
            if rng.random() < 0.05:
                rows.append(dict(rows[-1]))  # a duplicate event
    if bad_lines:
        rows.insert(7, {"user_id": "user0"})  # missing item: counted by the reader
    ev = write_jsonl(tmp / "events.jsonl", rows)
    if bad_lines:
        with open(ev, "a", encoding="utf-8") as f:
            f.write("{not json\n")  # unparsable: counted by the reader
    titles = []
    for k, domain in items.items():
        text = "" if k.endswith("7") else " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        titles.append({"item_id": k, "title": text, "domain": domain})
    titles += [{"item_id": f"cold{k}", "title": f"cold thing {k}", "domain": "AB"[k % 2]} for k in range(5)]
    it = write_jsonl(tmp / "items.jsonl", titles)
    return ev, it


def documents(folder: Path) -> Counter:
    """Every sample of a prepared folder as (meta without key, token ids): a multiset."""
    m = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / s["path"]) for s in m["shards"]]
    out = Counter()
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = s["json"]
        out[(json.dumps(meta, sort_keys=True), tuple(s["ids.npy"].tolist()))] += 1
    return out


def rows(path: Path) -> list:
    return sorted(json.dumps(r, sort_keys=True) for r in pq.read_table(path).to_pylist())


def assert_same_content(local: Path, dist: Path) -> None:
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (local, dist))
    for key in ("counts", "items", "streams", "documents", "tokenizer", "domains"):
        assert a[key] == b[key], key
    assert documents(local) == documents(dist)
    assert pq.read_table(local / "eval/items.parquet").equals(pq.read_table(dist / "eval/items.parquet"))
    for name in ("users.parquet", "train_sequences.parquet"):
        assert rows(local / "eval" / name) == rows(dist / "eval" / name), name
    assert all(s["path"].startswith("shards/shard-b") for s in b["shards"])
    assert len({s["path"] for s in b["shards"]}) == len(b["shards"])
    assert not (dist / "_buckets").exists()  # the work folder is not published


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from cprec.prepare.distributed import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfgs(tmp: Path, extra: dict, buckets: int = 4):
    ev, it = messy_log(tmp)
    base = {"source": "jsonl", "path": str(ev), "item_path": str(it), "num_workers": 0, **extra}
    local = tiny_config(tmp, base, "local")
    dist = tiny_config(tmp, {**base, "engine": "ray", "buckets": buckets}, "dist")
    return local, dist


@pytest.mark.dist
@pytest.mark.parametrize(
    "extra",
    [{}, {"domains": ["A", "B"], "missing_text": "drop", "min_interactions": 4}],
    ids=["placeholders", "domain-filter-drop-textless"],
)
def test_distributed_prepare_matches_single_process_on_fixture(tmp_path, ray_cluster, extra):
    local, dist = _cfgs(tmp_path, extra)
    a, b = pipeline.run(local), pipeline.run(dist)
    assert_same_content(a, b)
    m = json.loads((b / "manifest.json").read_text())
    dropped = m["counts"]["dropped"]
    # The whole-log rules really ran (decided in the driver, applied in the buckets).
    assert dropped["item_domain_conflict"] > 0 and dropped["duplicate_event"] > 0
    assert dropped["user_too_few_interactions"] > 0 and dropped["unparsable_line"] == 1
    assert m["items"]["without_events"] >= 5 and m["buckets"] == {"count": 4, "non_empty": 4}


def _source(tmp: Path, source: str) -> dict:
    """Each reader's tiny fixture (``raw_fixtures``) as data.* settings."""
    text = {"columns.text": ["title", "author"]}
    if source in ("csv", "parquet"):
        ev, it = write_generic(tmp, source)
        return {"source": source, "path": str(ev), "item_path": str(it), **text}
    if source == "recbole":
        return {"source": source, "path": str(write_recbole(tmp)), **text}
    if source.startswith("amazon"):
        files, metas = write_amazon(tmp, source, gz=True)
        return {"source": source, "files": files, "meta_files": metas, **text}
    if source == "food_kitchen":
        return {"source": source, "path": str(write_food_kitchen(tmp))}
    domains = {"Action": "action", "Comedy": "comedy", "Drama": "drama"}
    return {"source": "ml1m", "cache_dir": str(write_ml1m_cache(tmp)), "domain_map": domains}


@pytest.mark.dist
@pytest.mark.parametrize(
    "source", ["csv", "parquet", "recbole", "amazon2018", "amazon2023", "food_kitchen", "ml1m"]
)
def test_distributed_prepare_matches_single_process_for_every_reader(tmp_path, ray_cluster, source):
    """Every reader streams into the bucket writer unchanged and gives the local path's content."""
    extra = _source(tmp_path, source)
    a = pipeline.run(tiny_config(tmp_path, extra, "local"))
    b = pipeline.run(tiny_config(tmp_path, {**extra, "engine": "ray", "buckets": 3}, "dist"))
    assert_same_content(a, b)


@pytest.mark.dist
@pytest.mark.slow
def test_distributed_prepare_matches_single_process_on_real_food_kitchen(
    tmp_path, ray_cluster, food_kitchen_dir
):
    extra = {
        "source": "food_kitchen",
        "path": str(food_kitchen_dir),
        "num_workers": 1,
        "max_doc_tokens": 512,
        "shard_max_bytes": 64 << 20,
        "prompt.item_token_budget": 32,
        "tokenizer.vocab_size": 4000,
    }
    local = tiny_config(tmp_path, extra, "local")
    dist = tiny_config(tmp_path, {**extra, "engine": "ray", "buckets": 8}, "dist")
    a, b = pipeline.run(local), pipeline.run(dist)
    assert_same_content(a, b)
    c = json.loads((b / "manifest.json").read_text())["counts"]
    assert (c["valid"], c["test"]) == (960, 937)


def test_bucket_holds_each_user_once_by_construction(tmp_path):
    """Every event of a user lands in the user's one bucket (``bucket_of``), read order kept."""
    writer = BucketWriter(tmp_path / "events", 5, flush_rows=7)  # many flushes: users cross batches
    rng = random.Random(0)
    fcode = writer.file_code("log.jsonl")
    expected = []
    for line in range(300):
        user, item = f"u{rng.randrange(40)}", f"i{rng.randrange(25)}"
        writer.add(user, item, "d", float(line), fcode, line + 1)
        expected.append((user, item, line))
    spilled = writer.build()
    assert len(spilled) == 300 and int(spilled.bucket_rows.sum()) == 300
    seen: dict[str, int] = {}
    got = []
    for b in range(5):
        inter = read_bucket(tmp_path / "events", b, spilled)
        assert (np.diff(inter.order) > 0).all()  # read order within the bucket
        for u, i, o in zip(inter.user.tolist(), inter.item.tolist(), inter.order.tolist()):
            user = inter.users[u]
            assert seen.setdefault(user, b) == b  # never in two buckets
            assert bucket_of(user, 5) == b
            got.append((user, spilled.items[i], o))
    assert sorted(got, key=lambda r: r[2]) == expected
    assert (spilled.targets_seen == NO_TARGET).all() and len(set(seen.values())) > 1


@pytest.mark.parametrize("domains", [[], ["A", "B"]])
def test_bucket_writer_whole_log_decisions_match_the_in_memory_reader(tmp_path, domains):
    """Without Ray: the reader's whole-log rules (item domains, data.domains) and the catalogue
    decided from the bucket writer's (item, domain) summary count, name and keep exactly what the
    in-memory path does; in strict mode both fail on the same record."""
    from cprec.prepare import readers
    from cprec.prepare.clean import clean_catalogue
    from cprec.prepare.schema import IssueLog

    ev, it = messy_log(tmp_path)
    cfg = DataConfig(source="jsonl", path=str(ev), item_path=str(it), domains=domains)
    mem_issues, spill_issues = IssueLog(), IssueLog()
    mem = readers.read_source(cfg, mem_issues)
    spill = readers.read_source(cfg, spill_issues, builder=BucketWriter(tmp_path / "b", 3, flush_rows=50))
    assert spill_issues.dropped == mem_issues.dropped and spill_issues.examples == mem_issues.examples
    assert mem_issues.dropped["item_domain_conflict"] > 0
    assert spill.interactions_in == mem.interactions_in and spill.items == mem.items
    kept = sum(
        int(spill.interactions.keep_mask(read_bucket(tmp_path / "b", b, spill.interactions)).sum())
        for b in range(3)
    )
    assert kept == len(mem.interactions)
    assert (clean_catalogue(spill, cfg, IssueLog()) == clean_catalogue(mem, cfg, IssueLog())).all()
    # Strict, on a log whose first bad record is one the whole-log rules find.
    clean = tmp_path / "clean"
    clean.mkdir()
    ev, it = messy_log(clean, bad_lines=False)
    strict = DataConfig(source="jsonl", path=str(ev), item_path=str(it), domains=domains, strict=True)
    errors = []
    for builder in (None, BucketWriter(tmp_path / "s", 3, flush_rows=50)):
        with pytest.raises(ValueError) as e:
            readers.read_source(strict, IssueLog(True), builder)
        errors.append(str(e.value))
    reason = "unknown_domain" if domains else "item_domain_conflict"
    assert errors[0] == errors[1] and reason in errors[0] and "events.jsonl:" in errors[0]


def test_bucket_of_is_stable_across_processes():
    """The hash is not Python's salted ``hash``: another interpreter gives the same buckets."""
    users = [f"user-{k}" for k in range(50)] + ["Ünïcödé", ""]
    here = [bucket_of(u, 16) for u in users]
    code = (
        "import json,sys; from cprec.prepare.buckets import bucket_of; "
        f"print(json.dumps([bucket_of(u, 16) for u in {users!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here and len(set(here)) > 4


def test_bucket_corpus_picks_merge_to_the_pick_of_the_whole():
    """The tokenizer's sequence sample: bottom-k over buckets == bottom-k over all specs."""
    rng = np.random.default_rng(0)
    specs = [
        (f"u{u}", d, "domain", rng.integers(0, 50, 5).astype(np.int32)) for u in range(300) for d in "AB"
    ]
    whole = corpus_pick(specs, seed=7, k=100)
    parts = [corpus_pick([s for s in specs if bucket_of(s[0], 4) == b], seed=7, k=100) for b in range(4)]
    merged = merge_corpus_picks(parts, k=100)
    assert [p[0] for p in merged] == [p[0] for p in whole]
    assert all((x[1] == y[1]).all() for x, y in zip(merged, whole))


@pytest.mark.dist
def test_bucket_task_failing_is_retried_then_fails_naming_bucket_and_files(tmp_path, ray_cluster):
    """data.strict and one duplicate event: the bucket of that user fails in every attempt (Ray
    retries it), the job fails naming the bucket and the source file, nothing is published and a
    previous complete output is left as it was."""
    ev_rows = [
        {"user_id": f"u{u}", "item_id": f"i{(u + t) % 9}", "domain": "A", "timestamp": t}
        for u in range(12)
        for t in range(4)
    ]
    ev = write_jsonl(tmp_path / "events.jsonl", ev_rows)
    it = write_jsonl(
        tmp_path / "items.jsonl", [{"item_id": f"i{k}", "title": f"thing {k}"} for k in range(9)]
    )
    base = {"source": "jsonl", "path": str(ev), "item_path": str(it), "num_workers": 0, "strict": True}
    good = tiny_config(tmp_path, {**base, "engine": "ray", "buckets": 3, "bucket_retries": 2}, "out")
    out = pipeline.run(good)
    before = (out / "manifest.json").read_text()
    shards_before = sorted(p.name for p in (out / "shards").iterdir())

    write_jsonl(ev, ev_rows + [dict(ev_rows[5])])  # u1's event again: duplicate_event, strict
    bad_bucket = bucket_of("u1", 3)
    with pytest.raises(ValueError) as err:
        pipeline.run(good)
    msg = str(err.value)
    assert f"bucket {bad_bucket} of 3 failed in its split task, 3 attempt(s)" in msg
    assert "data.bucket_retries=2" in msg and str(ev) in msg and "duplicate_event" in msg
    assert (out / "manifest.json").read_text() == before  # the old output is untouched
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards_before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp")]  # no partial set


def test_distributed_config_fields_are_validated():
    with pytest.raises(ValueError, match="data.engine"):
        DataConfig(engine="spark")
    with pytest.raises(ValueError, match="data.buckets"):
        DataConfig(buckets=0)
    with pytest.raises(ValueError, match="data.bucket_retries"):
        DataConfig(bucket_retries=-1)
