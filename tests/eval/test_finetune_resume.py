"""Fine-tuning checkpoints: layout, exact resume after an interruption, stale checkpoints, and the
eval job killed in the middle of fine-tuning and run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cprec.config import EvalConfig, PromptConfig, load_config
from cprec.eval.data_order import batch_rows
from cprec.eval.encode import PromptBuilder, load_model
from cprec.eval.finetune import (
    CheckpointPolicy,
    FineTuner,
    build_pairs,
    pairs_identity,
    settings_key,
)
from cprec.eval.finetune_state import load_state
from cprec.eval.inputs import load_inputs
from cprec.runtime import checkpoint as ck
from cprec.runtime.tracking import TRACKING_FILE, default_uri

SETTINGS = dict(
    finetune_epochs=1.0, finetune_batch_size=8, finetune_negatives=2, finetune_lr=1e-3, max_history_items=5
)
FAULT_CLI = Path(__file__).resolve().parents[1] / "fault_cli.py"
MODEL_STATES = "mp_rank_00_model_states.pt"  # a ZeRO-0 engine's weights + AdamW state


@pytest.fixture(scope="module")
def setup(tiny_prepared, tiny_tokenizer):
    inputs = load_inputs(tiny_prepared, "test")
    pairs, _ = build_pairs(inputs.train_sequences, inputs.catalogue)
    return inputs.catalogue, pairs, PromptBuilder(tiny_tokenizer, PromptConfig(), 5)


def _tune(model_dir, setup, ecfg, policy, stop_after=None):
    """The fine-tuning loop on a fresh copy of the model; under ZeRO-0 the engine trains ``model``
    in place, so it holds the trained weights afterwards."""
    cat, pairs, builder = setup
    model = load_model(model_dir, torch.device("cpu"))
    cfg = load_config(None, ["model.dtype=fp32"])
    tuner = FineTuner(model, builder, cat, pairs, type(cfg)(**{**vars(cfg), "eval": ecfg}), pad_id=0)
    try:
        stats = tuner.train(policy, stop_after)
    finally:
        tuner.close()
    return model, stats


def test_data_order_is_a_function_of_the_step():
    a = [batch_rows(s, 20, 6, seed=3, rank=0).tolist() for s in range(7)]
    assert a == [batch_rows(s, 20, 6, seed=3, rank=0).tolist() for s in range(7)]
    assert sorted(sum(a[:3], [])) == sorted(set(sum(a[:3], [])))  # an epoch never repeats a pair
    assert a[3] != a[0]  # epoch 1 (3 batches per epoch; the 2-pair tail is dropped) is reshuffled
    assert batch_rows(0, 20, 6, seed=3, rank=1).tolist() != a[0]


def test_settings_key_follows_the_training_pairs(setup):
    cat, pairs, _ = setup
    cfg = EvalConfig()
    key = settings_key(cfg, "base", "all", pairs_identity(pairs, cat))
    assert key == settings_key(cfg, "base", "all", pairs_identity(list(pairs), cat))
    assert key != settings_key(cfg, "base", "all", pairs_identity(pairs[1:], cat))
    assert "data" not in settings_key(cfg, "base", "all")  # callers without pairs: as before


@pytest.mark.parametrize("lora", [0, 2])
def test_resumed_finetune_equals_uninterrupted(tiny_model_dir, setup, tmp_path, lora, one_process_group):
    cfg = EvalConfig(**SETTINGS, lora_rank=lora)
    key = {"base": "x", "lora": lora}
    full, ref = _tune(tiny_model_dir, setup, cfg, CheckpointPolicy(tmp_path / "a", key, every=2, keep_last=2))
    assert ref["steps"] == 8 and ref["completed"] and ref["resumed_from_step"] == 0

    # Layout: periodic step folders pruned to keep_last, the final one kept, pointers written.
    cdir = ck.checkpoints_dir(tmp_path / "a")
    assert [p.name for p in ck.list_checkpoints(cdir)] == ["step_0000004", "step_0000006", "step_0000008"]
    assert (cdir / "latest").read_text() == "step_0000008"
    last = cdir / "step_0000008"
    assert {p.name for p in last.iterdir()} == {MODEL_STATES, "rank_00000.pt", ck.STATE_FILE}
    state = ck.read_state(last)
    assert (state["kind"], state["step"], state["steps"], state["key"]) == ("finetune", 8, 8, key)
    assert state["data"] == {"epoch": 1, "batch_in_epoch": 1, "batches_per_epoch": 7}
    assert state["losses"] == ref["losses"]
    saved = torch.load(last / MODEL_STATES, map_location="cpu", weights_only=False)
    trainable = [n for n, p in full.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable) == bool(lora)  # LoRA: only the adapters train
    assert not any(n.endswith("lm_head.weight") for n in trainable)  # untied head: frozen
    assert len(saved["optimizer"]["state"]) == len(trainable)  # AdamW state for those alone

    # Interrupted after step 5 (last checkpoint: step 4), then run again on a fresh model.
    policy = CheckpointPolicy(tmp_path / "b", key, every=2, keep_last=2)
    _, first = _tune(tiny_model_dir, setup, cfg, policy, stop_after=5)
    assert not first["completed"] and len(first["losses"]) == 5
    assert ck.latest_checkpoint(tmp_path / "b").name == "step_0000004"
    resumed, again = _tune(tiny_model_dir, setup, cfg, policy)
    assert again["resumed_from_step"] == 4 and again["completed"]
    assert again["losses"] == ref["losses"]  # exactly: same batches, negatives, weights, Adam state
    got, want = resumed.state_dict(), full.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoints_of_other_settings_are_not_resumed(
    tiny_model_dir, setup, tmp_path, caplog, one_process_group
):
    cfg = EvalConfig(**SETTINGS)
    _tune(tiny_model_dir, setup, cfg, CheckpointPolicy(tmp_path, {"base": "old"}, every=2), stop_after=3)
    assert ck.latest_checkpoint(tmp_path).name == "step_0000002"
    _, stats = _tune(tiny_model_dir, setup, cfg, CheckpointPolicy(tmp_path, {"base": "new"}, every=4))
    assert stats["resumed_from_step"] == 0 and stats["completed"]
    assert "starting over" in caplog.text and "key" in caplog.text
    names = [p.name for p in ck.list_checkpoints(ck.checkpoints_dir(tmp_path))]
    assert names == ["step_0000004", "step_0000008"]  # the old step 2 is gone
    assert ck.read_state(ck.checkpoints_dir(tmp_path) / "step_0000004")["key"] == {"base": "new"}


def _overrides(prepared, model_dir, out):
    return [
        f"data.output_dir={prepared}",
        f"eval.checkpoint={model_dir}",
        f"eval.output_dir={out}",
        "eval.ks=[1,5]",
        "eval.batch_size=16",
        "eval.max_users=4",
        "eval.baselines=[]",
        "eval.finetune_epochs=1",
        "eval.finetune_batch_size=8",
        "eval.finetune_negatives=2",
        "eval.finetune_lr=1e-3",
        # Bit-exact losses across processes: fp32 (CPU bf16 kernels are not reproducible bit for bit
        # between processes).
        "eval.dtype=fp32",
        "eval.max_history_items=5",
        "eval.finetune_checkpoint_every=2",
        "tracking.experiment=test-eval",
    ]


def test_eval_job_killed_during_finetuning_resumes_on_rerun(tiny_prepared, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from cprec.eval.run import run

    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run(load_config(None, _overrides(tiny_prepared, tiny_model_dir, ref_out)))

    # The same job in a child process, SIGKILLed right after fine-tuning step 5 (`cprec.runtime.faults`).
    base_yaml = tmp_path / "eval.yaml"
    base_yaml.write_text("eval: {}\n")  # `cprec eval` takes a config file; the overrides say the rest
    cmd = [sys.executable, str(FAULT_CLI), "--kill-after", "finetune:5", "--", "eval"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # same kernels as here
    proc = subprocess.run(
        [*cmd, str(base_yaml), *_overrides(tiny_prepared, tiny_model_dir, out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    scope = out / "finetuned" / "all"
    assert load_state(scope) is None and not (out / "report.json").exists()
    assert ck.latest_checkpoint(scope).name == "step_0000004"
    killed_run = json.loads((out / TRACKING_FILE).read_text())["run_id"]

    report = run(load_config(None, _overrides(tiny_prepared, tiny_model_dir, out)))
    details = report["models"]["llm-finetuned"]["runs"]["all"]
    assert details["resumed_from_step"] == 4 and details["steps"] == 8
    want = load_state(ref_out / "finetuned" / "all")
    assert load_state(scope)["losses"] == want["losses"]
    got_w = load_file(scope / "model.safetensors")
    want_w = load_file(ref_out / "finetuned" / "all" / "model.safetensors")
    assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    for domain, vals in ref["results"]["llm-finetuned"].items():
        assert report["results"]["llm-finetuned"][domain] == pytest.approx(vals)

    # The rerun continued the killed job's MLflow run; the loss of every step is there.
    assert report["mlflow_run_id"] == killed_run
    client = MlflowClient(default_uri(out))
    history = client.get_metric_history(killed_run, "finetune/loss")
    assert {m.step for m in history} == set(range(1, 9))
    assert max(history, key=lambda m: (m.step, m.timestamp)).value == pytest.approx(want["losses"][-1])
    run_info = client.get_run(killed_run)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["cprec.eval.checkpoint"] == str(tiny_model_dir)
    assert json.loads((out / TRACKING_FILE).read_text())["completed"] is True
