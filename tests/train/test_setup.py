"""Training's batch geometry errors; checkpoint compatibility and tokenizer checks before compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from cprec.config import load_config
from cprec.train.geometry import batch_geometry
from cprec.train.trainer import StartPlan, check_compatible, check_tokenizer


def test_geometry_from_accum_and_global_batch():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3", "train.seq_len=128"])
    geo = batch_geometry(cfg.train, 2)
    assert (geo.global_batch_size, geo.tokens_per_step) == (24, 24 * 128)

    fixed = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    assert batch_geometry(fixed.train, 2).grad_accum == 2
    assert batch_geometry(fixed.train, 1).grad_accum == 4  # same optimizer step on fewer ranks
    with pytest.raises(ValueError, match=r"train.global_batch_size.*world size \(3\)"):
        batch_geometry(fixed.train, 3)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        load_config(None, ["train.micro_batch_size=3", "train.global_batch_size=8"])


def _state(**over):
    cfg = load_config(None, [])
    state = {"config": {"model": vars(cfg.model).copy(), "train": {"zero_stage": 3}}, "vocab_size": 100}
    state["tokenizer_hash"] = "abc"
    state.update(over)
    return state


def test_incompatible_checkpoint_names_fields():
    cfg = load_config(None, ["model.hidden_size=64"])
    plan = StartPlan("resume", Path("/ck/step_0000004"), _state())
    with pytest.raises(ValueError, match=r"incompatible checkpoint /ck/step_0000004: model.hidden_size: 128"):
        check_compatible(cfg, plan, 100)
    with pytest.raises(ValueError, match="vocab size: 100 there, 120 here"):
        check_compatible(load_config(None, []), plan, 120)
    check_compatible(load_config(None, ["model.attn_backend=sdpa"]), plan, 100)  # kernels may change


def test_tokenizer_mismatch_with_checkpoint():
    cfg = load_config(None, [])
    manifest = {"tokenizer": {"hash": "xyz", "vocab_size": 100}}
    plan = StartPlan("init", Path("/ck/step_0000006"), _state())
    with pytest.raises(ValueError, match="tokenizer mismatch: checkpoint /ck/step_0000006.*abc.*xyz"):
        check_tokenizer(cfg, manifest, plan, Path("/data/manifest.json"))
    check_tokenizer(cfg, {"tokenizer": {"hash": "abc"}}, plan, Path("/data/manifest.json"))


def test_vocabulary_larger_than_the_base_model_is_refused_before_compute(tmp_path):
    """Shards made with a 4,000-token tokenizer cannot train a base with 300 embedding rows."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "base"
    )
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'base'}"])
    manifest = {"tokenizer": {"hash": "xyz", "vocab_size": 4000}}
    with pytest.raises(ValueError, match=r"vocabulary mismatch: .*4000 tokens.*base has 300 embedding rows"):
        check_tokenizer(cfg, manifest, StartPlan("fresh"), tmp_path / "manifest.json")
