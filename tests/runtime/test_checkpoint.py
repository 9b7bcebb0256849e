"""Checkpoint folder bookkeeping: finding, resolving, pruning, leftovers, start planning.

The DeepSpeed save/load round trip itself runs in tests/dist (it needs a process group).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cprec.config import load_config
from cprec.runtime import checkpoint as ck
from cprec.train.trainer import plan_start


def fake_checkpoint(run, step: int, permanent: bool = False, **extra):
    folder = ck.checkpoints_dir(run) / ck.step_name(step)
    folder.mkdir(parents=True)
    state = {"format_version": ck.FORMAT_VERSION, "step": step, "permanent": permanent, **extra}
    (folder / ck.STATE_FILE).write_text(json.dumps(state))
    return folder


def test_step_names_sort_and_parse(tmp_path):
    for s in (10, 2, 100):
        fake_checkpoint(tmp_path, s)
    (ck.checkpoints_dir(tmp_path) / "step_0000050").mkdir()  # no trainer_state: incomplete
    assert [p.name for p in ck.list_checkpoints(ck.checkpoints_dir(tmp_path))] == [
        "step_0000002",
        "step_0000010",
        "step_0000100",
    ]
    assert ck.latest_checkpoint(tmp_path).name == "step_0000100"
    assert ck.latest_checkpoint(tmp_path / "nothing") is None


def test_resolve_checkpoint_forms(tmp_path):
    a = fake_checkpoint(tmp_path, 4)
    b = fake_checkpoint(tmp_path, 8, permanent=True)
    cdir = ck.checkpoints_dir(tmp_path)
    assert ck.resolve_checkpoint(a) == a
    (cdir / "latest").write_text(b.name)
    assert ck.resolve_checkpoint(cdir / "latest") == b
    assert ck.resolve_checkpoint(tmp_path) == b  # run folder -> newest
    (cdir / "phase_end").write_text(a.name)
    assert ck.resolve_checkpoint(tmp_path) == a  # run folder -> its phase-end checkpoint first
    assert ck.resolve_checkpoint(cdir / "phase_end") == a
    with pytest.raises(FileNotFoundError, match="has the run"):
        ck.resolve_checkpoint(tmp_path / "other" / "checkpoints" / "latest")
    with pytest.raises(FileNotFoundError, match="not found"):
        ck.resolve_checkpoint(tmp_path / "missing")
    (cdir / "step_0000012").mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        ck.resolve_checkpoint(cdir / "step_0000012")
    (cdir / "latest").write_text("step_0000099")
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        ck.resolve_checkpoint(cdir / "latest")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="neither"):
        ck.resolve_checkpoint(tmp_path / "plain")


def test_an_older_runs_final_pointer_still_names_its_phase_end(tmp_path):
    """Runs written before the pointer was renamed: ``checkpoints/final`` (beside the run's ``final/``
    HF export) names the phase-end checkpoint; a ``phase_end`` pointer, when there, wins."""
    a = fake_checkpoint(tmp_path, 4, permanent=True)
    b = fake_checkpoint(tmp_path, 8)
    cdir = ck.checkpoints_dir(tmp_path)
    (cdir / "final").write_text(a.name)
    (tmp_path / "final").mkdir()  # the HF export: not a checkpoint (without hf_ok)
    assert ck.resolve_checkpoint(tmp_path) == a and ck.resolve_checkpoint(cdir) == a
    assert ck.resolve_checkpoint(cdir / "final") == a
    (cdir / "phase_end").write_text(b.name)
    assert ck.resolve_checkpoint(tmp_path) == b


def test_read_state_checks_format(tmp_path):
    folder = fake_checkpoint(tmp_path, 3)
    assert ck.read_state(folder)["step"] == 3
    (folder / ck.STATE_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        ck.read_state(folder)
    with pytest.raises(FileNotFoundError, match="not a complete"):
        ck.read_state(tmp_path)


def test_prune_keeps_last_k_and_permanent(tmp_path):
    for s in (2, 4, 6, 8, 10):
        fake_checkpoint(tmp_path, s, permanent=(s == 4))
    removed = ck.prune(ck.checkpoints_dir(tmp_path), keep_last=2)
    assert [p.name for p in removed] == ["step_0000002", "step_0000006"]
    left = [p.name for p in ck.list_checkpoints(ck.checkpoints_dir(tmp_path))]
    assert left == ["step_0000004", "step_0000008", "step_0000010"]


def test_clean_leftovers(tmp_path):
    fake_checkpoint(tmp_path, 2)
    tmp = ck.checkpoints_dir(tmp_path) / ".tmp-step_0000004" / "step_0000004"
    tmp.mkdir(parents=True)
    (tmp / "half_written.pt").write_bytes(b"x")
    removed = ck.clean_leftovers(tmp_path)
    assert [p.name for p in removed] == [".tmp-step_0000004"]
    assert not tmp.parent.exists() and ck.latest_checkpoint(tmp_path).name == "step_0000002"


def test_rng_state_round_trip():
    ck.seed_everything(5)
    state = ck.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_plan_start_resume_init_fresh(tmp_path, caplog):
    stable = tmp_path / "stable"
    fake_checkpoint(stable, 6, permanent=True)
    (ck.checkpoints_dir(stable) / "latest").write_text("step_0000006")

    fresh = load_config(None, [f"train.output_dir={tmp_path / 'new'}"])
    assert plan_start(fresh).kind == "fresh"

    anneal_dir = tmp_path / "anneal"
    anneal = load_config(
        None,
        [
            "train.phase=anneal",
            f"train.output_dir={anneal_dir}",
            f"train.init_from={stable}/checkpoints/latest",
        ],
    )
    plan = plan_start(anneal)
    assert (plan.kind, plan.checkpoint.name, plan.state["step"]) == ("init", "step_0000006", 6)

    fake_checkpoint(anneal_dir, 8)  # the anneal run has its own checkpoint now: resume it
    caplog.set_level("INFO")
    plan = plan_start(anneal)
    assert (plan.kind, plan.checkpoint.name) == ("resume", "step_0000008")
    assert "init_from" in caplog.text and "ignored" in caplog.text

    no_init = load_config(None, ["train.phase=anneal", f"train.output_dir={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match="train.init_from"):
        plan_start(no_init)
    bad = load_config(None, [f"train.output_dir={tmp_path / 'y'}", f"train.init_from={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="nope"):
        plan_start(bad)


def test_tokenizer_identity_from_state_export_or_files(tmp_path):
    """What a model folder was trained with: trainer_state.json (checkpoint), cprec_export.json
    (an export), else its tokenizer files; None for a folder without any."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from cprec.prepare.tokenize import tokenizer_hash

    assert ck.tokenizer_identity(tmp_path)[0] is None
    (tmp_path / ck.EXPORT_FILE).write_text(json.dumps({"step": 3, "tokenizer_hash": "exp123"}))
    assert ck.tokenizer_identity(tmp_path)[0] == "exp123"
    (tmp_path / ck.STATE_FILE).write_text(json.dumps({"step": 3, "tokenizer_hash": "state456"}))
    assert ck.tokenizer_identity(tmp_path)[0] == "state456"
    bare = tmp_path / "hf" / "tokenizer"
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "salt": 4, "pan": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(bare))
    assert ck.tokenizer_identity(bare.parent) == (tokenizer_hash(bare), str(bare))
