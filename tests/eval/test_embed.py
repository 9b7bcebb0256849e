"""`cprec embed` (embeddings + FAISS index for serving) and ranking through FAISS in the eval job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cprec.cli import main as cli
from cprec.config import load_config
from cprec.eval.embed import load_embeddings, read_user_file
from cprec.eval.embed import run as embed
from cprec.eval.faiss_index import build_index, read_index, search
from cprec.eval.inputs import load_inputs
from cprec.eval.run import run as evaluate_job
from cprec.eval.topk import ItemShard, rank_users

REPO = Path(__file__).resolve().parents[2]


def _overrides(prepared, model_dir, out, *extra):
    return [
        f"data.output_dir={prepared}",
        f"eval.checkpoint={model_dir}",
        f"eval.output_dir={out}",
        "eval.batch_size=8",
        "tracking.backend=none",
        *extra,
    ]


def _yaml(tmp_path, prepared, model_dir) -> Path:
    cfg = {
        "data": {"output_dir": str(prepared)},
        "eval": {"checkpoint": str(model_dir), "output_dir": str(tmp_path / "eval"), "batch_size": 8},
        "tracking": {"backend": "none"},
    }
    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _column(table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_embed_cli_output_loads_and_flat_faiss_search_is_the_exact_topk(
    tiny_prepared, tiny_model_dir, tmp_path
):
    out = tmp_path / "emb"
    assert (
        cli(["embed", str(_yaml(tmp_path, tiny_prepared, tiny_model_dir)), "--out", str(out), "--faiss"]) == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    cat = load_inputs(tiny_prepared, "test").catalogue
    assert manifest["pooling"] == "last" and manifest["normalised"] is True and manifest["dim"] == 32
    assert {d: v["count"] for d, v in manifest["items"].items()} == {"A": 12, "B": 16}
    users_entry = manifest["users"]
    assert users_entry["count"] == 16 and users_entry["source"].startswith("eval users")
    user_ids, users = load_embeddings(out, users_entry)
    table = pq.read_table(out / users_entry["parquet"])
    assert table.column("id").to_pylist() == user_ids and set(table.column("domain").to_pylist()) == {
        "A",
        "B",
    }
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), users)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, rtol=1e-5)
    for d, entry in manifest["items"].items():
        ids, items = load_embeddings(out, entry)
        assert ids == [cat.items[r] for r in cat.domain_rows(d)]  # row i = the domain's i-th item
        table = pq.read_table(out / entry["parquet"])
        assert table.column("id").to_pylist() == ids
        np.testing.assert_array_equal(
            np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), items
        )
        assert manifest["faiss"][d]["exact"] is True and manifest["faiss"][d]["index"] == "Flat"
        index = read_index(out / manifest["faiss"][d]["path"])
        assert index.ntotal == len(ids)
        k = 5
        scores, got = search(index, users, k)
        no_history = [np.zeros(0, dtype=np.int64)] * len(users)
        _, _, want = rank_users(
            torch.from_numpy(users), ItemShard.of(torch.from_numpy(items)), np.zeros(len(users), np.int64),
            no_history, 8, 5, k,
        )  # fmt: skip
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(scores, np.take_along_axis(users @ items.T, got, 1), rtol=1e-5, atol=1e-6)


def test_embed_user_file_counts_unknown_history_items_and_matches_eval_users(
    tiny_prepared, tiny_model_dir, tmp_path
):
    cfg = load_config(None, _overrides(tiny_prepared, tiny_model_dir, tmp_path / "e"))
    base = embed(cfg, out=str(tmp_path / "a"))
    users = load_inputs(tiny_prepared, "test").users
    path = tmp_path / "users.jsonl"
    rows = [{"user": "same", "history": users[0].history}, {"user": "odd", "history": ["a1", "nope", "b2"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = embed(cfg, users_file=str(path), out=str(tmp_path / "b"))
    entry = manifest["users"]
    assert entry["count"] == 2 and entry["unknown_history_items"] == 1 and entry["without_known_history"] == 0
    assert "domain" not in pq.read_table(tmp_path / "b" / entry["parquet"]).column_names
    ids, emb = load_embeddings(tmp_path / "b", entry)
    base_ids, base_emb = load_embeddings(tmp_path / "a", base["users"])
    assert ids == ["same", "odd"]
    # The same prompt in another batch (other padding): equal up to float noise.
    np.testing.assert_allclose(emb[0], base_emb[base_ids.index(users[0].user)], atol=1e-3)
    # A rerun replaces its own earlier output; a folder that is not one is never replaced.
    embed(cfg, users_file=str(path), out=str(tmp_path / "b"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a `cprec embed` output"):
        embed(cfg, out=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_embed_user_files_with_bad_rows_are_refused_naming_the_file(tmp_path):
    pq.write_table(pa.table({"user": ["u1"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols.parquet: missing column\(s\) \['history'\]"):
        read_user_file(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"user": ["u1", "u1"], "history": [["a"], ["b"]]}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="dup.parquet row 1: user 'u1' appears twice"):
        read_user_file(tmp_path / "dup.parquet")
    (tmp_path / "bad.jsonl").write_text('{"user": "u", "history": ["a"]}\n{"user": "v", "history": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl row 1: history must be a list"):
        read_user_file(tmp_path / "bad.jsonl")
    (tmp_path / "u.csv").write_text("user,history\n")
    with pytest.raises(ValueError, match=r"a .parquet or .jsonl file"):
        read_user_file(tmp_path / "u.csv")
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"user": ["u1", "u2"], "history": [["a", "b"], []]}), ok)
    assert read_user_file(ok) == (["u1", "u2"], [["a", "b"], []])


def test_embed_faiss_flat_retrieval_in_the_eval_job_equals_exact_and_hnsw_is_labelled(
    tiny_prepared, tiny_model_dir, tmp_path
):
    common = ["eval.finetune=false", "eval.baselines=[]", "eval.ks=[1,5,10]"]
    reports = {}
    for name, extra in (
        ("exact", []),
        ("flat", ["eval.retrieval=faiss"]),
        ("hnsw", ["eval.retrieval=faiss", "eval.faiss_index=HNSW8"]),
    ):
        cfg = load_config(None, _overrides(tiny_prepared, tiny_model_dir, tmp_path / name, *common, *extra))
        reports[name] = evaluate_job(cfg)
    exact, flat, hnsw = reports["exact"], reports["flat"], reports["hnsw"]
    for d, vals in exact["results"]["llm-pretrained"].items():
        assert flat["results"]["llm-pretrained"][d] == pytest.approx(vals)
    assert exact["retrieval"]["mode"] == "exact" and flat["retrieval"]["approximate"] is False
    assert exact["protocol"]["label"] == flat["protocol"]["label"] == "full ranking"
    assert hnsw["retrieval"]["approximate"] is True
    assert hnsw["protocol"]["label"] == "full ranking, approximate retrieval (FAISS HNSW8)"
    md = (tmp_path / "hnsw" / "report.md").read_text()
    assert "embedding retrieval: FAISS HNSW8 index (approximate)" in md
    # Ranks within the cut-offs agree; a target the index did not return ranks max(ks) + 1.
    for d, ranks in flat["ranks"]["llm-pretrained"].items():
        want = np.asarray(exact["ranks"]["llm-pretrained"][d])
        got = np.asarray(ranks)
        np.testing.assert_array_equal(np.where(want <= 10, want, 11), np.where(got <= 10, got, 11))


def test_embed_faiss_index_errors_name_the_setting():
    with pytest.raises(ValueError, match="eval.faiss_index"):
        build_index(np.eye(4, dtype=np.float32), "NoSuchIndex42")
    with pytest.raises(ValueError, match="eval.retrieval"):
        load_config(None, ["eval.retrieval=faiss", "eval.protocol=sampled"])


@pytest.mark.dist
def test_embed_two_rank_eval_job_shards_items_and_matches_one_process(
    tiny_prepared, tiny_model_dir, tmp_path
):
    """Under torchrun each rank encodes and ranks half of every catalogue (cache files per slice);
    the metrics and per-user ranks equal the single-process job's."""
    common = ["eval.finetune=false", "eval.baselines=[popularity]", "eval.ks=[1,5,10]", "eval.item_chunk=5"]
    one = evaluate_job(
        load_config(None, _overrides(tiny_prepared, tiny_model_dir, tmp_path / "one", *common))
    )
    two_out = tmp_path / "two"
    cfg = _yaml(tmp_path, tiny_prepared, tiny_model_dir)
    args = [f"eval.output_dir={two_out}", *common]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "cprec.cli",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*cmd, "eval", str(cfg), *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((two_out / "report.json").read_text())
    assert two["results"] == json.loads(json.dumps(one["results"]))
    assert two["ranks"] == one["ranks"]
    cached = sorted(p.name.split("-", 2)[-1] for p in (two_out / "cache").glob("items-*.pt"))
    assert cached == ["0of2.pt", "0of2.pt", "1of2.pt", "1of2.pt"]  # 2 domains x 2 slices
