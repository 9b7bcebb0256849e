"""ZeRO-3 partitioned inference (``eval.zero3_inference``, `cprec.eval.zero3`) on 2 CPU ranks:
embeddings and generative scores equal the unsharded single-process model's, and no rank holds the
full weights, before, during or after the passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun_job import torchrun

from cprec.eval.encode import Encoder, encode_users, load_model
from cprec.eval.generative import GenerativeScorer

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zero3_worker import USERS, passes_inputs  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, eval_fixtures) -> Path:
    """A Llama whose matrices (embeddings included: 1024 rows) are above DeepSpeed's persistence
    threshold (1e5 elements), so that every one of them must stay partitioned; 3.7M parameters."""
    return eval_fixtures.make_model_folder(tmp_path_factory.mktemp("z3model"), 1024, seed=3, hidden=384)


@pytest.fixture(scope="module")
def two_ranks(tiny_prepared, model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("z3run") / "out.pt"
    proc = torchrun([str(HERE / "zero3_worker.py"), str(tiny_prepared), str(model_dir), str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference(tiny_prepared, tiny_tokenizer, model_dir) -> dict:
    """The same passes in this one process with the whole model (`load_model`, as before)."""
    ids, cat, builder, seqs, task, histories = passes_inputs(str(tiny_prepared), tiny_tokenizer)
    model = load_model(model_dir, torch.device("cpu"), torch.float32).eval()
    enc = Encoder(model, ids["pad_id"], "last", batch_size=4)
    scorer = GenerativeScorer(model, builder, cat, ids["eos_id"], ids["pad_id"], batch_size=1)
    users = list(range(USERS))
    beams = scorer.search(task, users, 3)
    bf16 = load_model(model_dir, torch.device("cpu"), torch.bfloat16).eval()
    return {
        "items": enc.encode(seqs),
        "users": encode_users(enc, builder, cat, histories),
        "hits": [beams[u].hits for u in users],
        "likelihoods": scorer.likelihoods(task, users, [list(range(task.n_items))] * USERS),
        "items_bf16": Encoder(bf16, ids["pad_id"], "last", batch_size=4).encode(seqs),
    }


@pytest.mark.dist
def test_partitioned_embeddings_equal_the_whole_model(two_ranks, reference):
    close = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(two_ranks["items"], reference["items"], **close)  # 2 batches vs 1
    torch.testing.assert_close(two_ranks["one_item"], reference["items"][:1], **close)  # 1 vs none
    torch.testing.assert_close(two_ranks["users"], reference["users"], **close)
    shards = [r["shard"] for r in two_ranks["ranks"]]
    assert [s["start"] for s in shards] == [0, 5]
    for s in shards:
        part = reference["items"][s["start"] : s["start"] + len(s["emb"])]
        torch.testing.assert_close(s["emb"], part, **close)
        torch.testing.assert_close(s["again"], part, **close)
    assert [s["hits"] for s in shards] == [0, 1]  # rank 1 hit its cached slice and padded along
    # bf16 partitions and passes, as the unsharded bf16 model (rounding of bf16 matmuls aside).
    assert all(r["bf16_dtypes"] == ["torch.bfloat16"] for r in two_ranks["ranks"])
    torch.testing.assert_close(two_ranks["items_bf16"], reference["items_bf16"], atol=5e-3, rtol=0)


@pytest.mark.dist
def test_partitioned_generative_scores_equal_the_whole_model(two_ranks, reference):
    got, want = two_ranks["hits"], reference["hits"]  # 3 beam calls on rank 0, 2 on rank 1
    assert [sorted(h) for h in got] == [sorted(h) for h in want]
    for g, w in zip(got, want):
        assert [g[c] for c in sorted(g)] == pytest.approx([w[c] for c in sorted(w)], abs=1e-4)
    for g, w in zip(two_ranks["likelihoods"], reference["likelihoods"]):  # 9 passes vs 6
        assert g == pytest.approx(w, abs=1e-4)


@pytest.mark.dist
def test_no_rank_holds_the_full_weights(two_ranks):
    for rank in two_ranks["ranks"]:
        total = sum(p["ds_numel"] for p in rank["before"])
        assert total > 3.5e6
        for p in rank["before"]:  # built partitioned: every rank has read only its slice
            assert p["held"] == 0 and not p["available"], p
            assert p["partition"] == -(-p["ds_numel"] // 2), p
        for stage in ("encoded", "after"):  # after the passes every matrix is released again
            for p in rank[stage]:
                if p["ds_numel"] > 1e5:
                    assert p["held"] == 0 and not p["available"], (stage, p)
                else:  # a norm, kept gathered by DeepSpeed's persistence threshold
                    assert p["held"] in (0, p["ds_numel"]), (stage, p)
        # While the passes ran: at most one rank's share gathered, plus one module's own weights.
        largest = max(p["ds_numel"] for p in rank["before"])
        for phase, held in rank["peak"].items():
            assert 0 < held <= total / 2 + largest, (phase, held, total)


@pytest.mark.dist
def test_two_rank_zero3_eval_job_ranks_like_whole_models(tiny_prepared, tiny_model_dir, tmp_path):
    """`cprec eval` on 2 ranks with and without ``eval.zero3_inference``: the embedding rows (the
    pre-trained model, and the fine-tuned one, which is encoded from its exported folder) and the
    generative and re-ranked rows rank every user alike."""
    import json

    import yaml

    common = {
        "data": {"output_dir": str(tiny_prepared)},
        "eval": {
            "checkpoint": str(tiny_model_dir),
            "batch_size": 3,
            "baselines": ["popularity"],
            "ks": [1, 5, 10],
            "finetune_epochs": 0.5,
            "finetune_batch_size": 8,
            "finetune_negatives": 3,
            "generative": True,
            "beam_width": 4,
            "rerank_top_n": 3,
        },
        "tracking": {"backend": "none"},
    }
    path = tmp_path / "z3.yaml"
    path.write_text(yaml.safe_dump(common))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    reports = {}
    for z3 in (False, True):
        out = tmp_path / f"z3-{z3}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m"]
        cmd += ["cprec.cli", "eval", str(path), f"eval.output_dir={out}", f"eval.zero3_inference={z3}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert ("ZeRO-3 inference over 2 rank(s)" in proc.stdout + proc.stderr) == z3
        reports[z3] = json.loads((out / "report.json").read_text())
    rows = {"llm-pretrained", "llm-finetuned", "llm-generative", "llm-reranked", "popularity"}
    assert set(reports[True]["ranks"]) == rows
    assert reports[True]["ranks"] == reports[False]["ranks"]
    assert reports[True]["results"] == reports[False]["results"]


def test_one_process_zero3_embed_writes_the_embeddings_of_the_whole_model(
    tiny_prepared, tiny_model_dir, tmp_path, one_process_group, caplog
):
    """`cprec embed` with ``eval.zero3_inference``: one rank (a process group of its own, closed at
    the end) and the same embeddings as without."""
    import numpy as np

    from cprec.config import load_config
    from cprec.eval.embed import load_embeddings
    from cprec.eval.embed import run as embed

    base = [f"data.output_dir={tiny_prepared}", f"eval.checkpoint={tiny_model_dir}", "eval.dtype=fp32"]
    base += ["eval.batch_size=5", "tracking.backend=none"]
    runs = {}
    caplog.set_level("INFO", logger="cprec.eval.zero3")
    for z3 in (False, True):
        cfg = load_config(
            None, [*base, f"eval.output_dir={tmp_path / f'eval-{z3}'}", f"eval.zero3_inference={z3}"]
        )
        runs[z3] = (tmp_path / f"emb-{z3}", embed(cfg, out=str(tmp_path / f"emb-{z3}")))
    assert not torch.distributed.is_initialized()
    said = [r.message for r in caplog.records if r.name == "cprec.eval.zero3"]
    assert len(said) == 1 and "ZeRO-3 inference over 1 rank(s) in float32, 100.0% of" in said[0]
    (plain, want), (sharded, got) = runs[False], runs[True]
    pairs = [(want["users"], got["users"])] + [(want["items"][d], got["items"][d]) for d in want["items"]]
    for w, g in pairs:
        (wi, we), (gi, ge) = load_embeddings(plain, w), load_embeddings(sharded, g)
        assert wi == gi
        np.testing.assert_allclose(ge, we, atol=1e-5, rtol=1e-4)


def test_inference_config_and_module_refuse_what_they_cannot_run():
    from cprec.eval.zero3 import InferenceModule, inference_config

    cfg = inference_config(torch.bfloat16, max_live=123)
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "stage3_max_reuse_distance": 0,
        "stage3_max_live_parameters": 123,
    }
    assert cfg["bf16"] == {"enabled": True} and "optimizer" not in cfg
    assert "stage3_max_live_parameters" not in inference_config(torch.float32)["zero_optimization"]
    with pytest.raises(ValueError, match=r"'eval\.dtype'.*bf16 or fp32"):
        inference_config(torch.float16)
    with pytest.raises(ValueError, match="unknown inference task 'train'"):
        InferenceModule(torch.nn.Linear(2, 2))(task="train")
