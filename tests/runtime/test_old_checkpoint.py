"""A checkpoint written before `cprec/runtime/` existed (tests/fixtures/ckpt_v1, made at 1284f79)
still resolves, exports to an HF folder and loads into a DeepSpeed engine with today's code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cprec.config import config_from_dict
from cprec.runtime import checkpoint as ck
from cprec.runtime.export import export_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ckpt_v1"


@pytest.fixture
def old_run(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def _saved_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k.removeprefix("hf_model."): v for k, v in states["module"].items()}


def test_old_checkpoint_resolves_and_exports(old_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = old_run / "checkpoints" / "step_0000002"
    cdir = old_run / "checkpoints"
    for form in (old_run, cdir, cdir / "latest", cdir / "final", step):
        assert ck.resolve_checkpoint(form) == step
        assert ck.resolve_checkpoint(form, hf_ok=True) == step
    state = ck.read_state(step)
    assert (state["step"], state["world_size"], state["permanent"]) == (2, 1, True)
    assert ck.tokenizer_identity(step) == (state["tokenizer_hash"], str(step / ck.STATE_FILE))
    assert ck.read_rank_state(step, 0)["step"] == 2

    out = export_checkpoint(step, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).vocab_size <= state["vocab_size"]
    got = model.state_dict()
    for name, want in _saved_weights(step).items():
        assert torch.equal(got[name], want.float()), name
    assert ck.resolve_checkpoint(old_run, hf_ok=True) == step  # no final/ export in the fixture

    # Its phase-end pointer had the name of the HF export ("final"): still what a run folder means,
    # even with a newer periodic checkpoint beside it.
    newer = cdir / "step_0000003"
    shutil.copytree(step, newer)
    (newer / ck.STATE_FILE).write_text(json.dumps({**state, "step": 3, "permanent": False}))
    assert ck.latest_checkpoint(old_run) == newer
    assert ck.resolve_checkpoint(old_run) == step and ck.resolve_checkpoint(cdir) == step


def test_old_checkpoint_loads_into_an_engine(old_run, one_process_group):
    from cprec.runtime import engine as eng
    from cprec.train.geometry import batch_geometry, engine_spec
    from cprec.train.trainer import build_module

    step = ck.resolve_checkpoint(old_run)
    state = ck.read_state(step)
    cfg = config_from_dict(state["config"])
    eng.start_distributed()
    module, _ = build_module(cfg, {"vocab_size": state["vocab_size"], **state["tokenizer_ids"]})
    engine = eng.init_engine(module, engine_spec(cfg, batch_geometry(cfg.train, 1)))
    ck.load(engine, step, universal=False)
    loaded = {k.removeprefix("hf_model."): v for k, v in engine.module.state_dict().items()}
    for name, want in _saved_weights(step).items():
        assert torch.equal(loaded[name], want), name
    assert engine.optimizer.state_dict()["state"], "the Adam moments came back"
    # Resumed and finished with today's code: the phase-end pointer gets today's name, the old
    # one goes (one name per concept: "final" is the HF export).
    rank_state = ck.read_rank_state(step, 0)
    ck.save(engine, old_run, 3, {**state, "step": 3}, rank_state, permanent=True, keep_last=1)
    cdir = ck.checkpoints_dir(old_run)
    assert (cdir / "phase_end").read_text() == "step_0000003" and not (cdir / "final").exists()
    assert ck.resolve_checkpoint(old_run) == cdir / "step_0000003"
    engine.destroy()
