"""Fine-tuning through a real sharded DeepSpeed engine (one process, gloo, DS_ACCELERATOR=cpu, torch
AdamW): same step-0 loss as the default ZeRO-0 engine, weights that move, DeepSpeed checkpoints that
resume exactly, and the eval job end to end with ``eval.finetune_deepspeed``."""

from __future__ import annotations

import pytest
import torch

from cprec.config import PromptConfig, load_config
from cprec.eval.encode import PromptBuilder, load_model
from cprec.eval.finetune import base_model, build_pairs, finetune_to_folder
from cprec.eval.finetune_state import export_finetuned, load_state
from cprec.eval.inputs import load_inputs
from cprec.model.sharded import is_partitioned
from cprec.runtime import checkpoint as ck

pytest.importorskip("deepspeed")


def _cfg(tmp_path, stage: int, *extra):
    return load_config(
        None,
        [
            f"train.zero_stage={stage}",
            "model.dtype=fp32",
            "eval.dtype=fp32",  # both engines in fp32: the comparison is of engines, not precision
            f"eval.output_dir={tmp_path}",
            "eval.finetune_epochs=0.4",  # ceil(0.4 * 60 pairs / 8) = 3 steps
            "eval.finetune_batch_size=8",
            "eval.finetune_negatives=2",
            "eval.finetune_lr=1e-3",
            "eval.max_history_items=5",
            "eval.finetune_deepspeed=true",
            "eval.finetune_checkpoint_every=1",
            *extra,
        ],
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_finetune_matches_plain_and_resumes(
    tiny_prepared, tiny_tokenizer, tiny_model_dir, tmp_path, one_process_group, stage
):
    inputs = load_inputs(tiny_prepared, "test")
    cat = inputs.catalogue
    pairs, skipped = build_pairs(inputs.train_sequences, cat)
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), 5)
    cfg = _cfg(tmp_path, stage)

    def tune(folder, stop_after=None, cfg=cfg, model=None):
        model = model if model is not None else load_model(tiny_model_dir, torch.device("cpu"))
        return finetune_to_folder(
            model, builder, cat, pairs, cfg, 0, base_dir=tiny_model_dir, folder=folder,
            key={"stage": stage}, skipped=skipped, stop_after=stop_after,
        )  # fmt: skip

    ref = tune(tmp_path / "ref")
    assert ref["steps"] == 3 and ref["engine"]["deepspeed"] and ref["engine"]["zero_stage"] == stage
    # Same weights, same batch: the sharded engine's step-0 loss is the default ZeRO-0 path's.
    plain = tune(tmp_path / "plain", cfg=_cfg(tmp_path, stage, "eval.finetune_deepspeed=false"))
    assert plain["engine"]["zero_stage"] == 0 and plain["engine"]["dtype"] == "fp32"
    assert ref["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-5)
    last = ck.latest_checkpoint(tmp_path / "ref")
    assert last.name == "step_0000003" and list(last.glob("*zero_pp_rank_0_*optim_states.pt"))

    if stage == 3:  # the eval job's model: built partitioned from the folder, the same run
        sharded_model = base_model(cfg, tiny_model_dir)
        assert is_partitioned(sharded_model)
        part = tune(tmp_path / "part", model=sharded_model)
        assert part["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        # Its HF folder was streamed from the live engine: the weights of its last checkpoint.
        last_part = ck.latest_checkpoint(tmp_path / "part")
        whole = export_finetuned(last_part, tiny_model_dir, 0, tmp_path / "whole")
        streamed = load_model(tmp_path / "part", torch.device("cpu")).state_dict()
        assert streamed.keys() == whole.state_dict().keys()
        assert all(torch.equal(streamed[k], v) for k, v in whole.state_dict().items())

    # Interrupted after step 2, resumed from DeepSpeed's checkpoint: the same run as uninterrupted.
    assert tune(tmp_path / "cut", stop_after=2) is None
    assert ck.latest_checkpoint(tmp_path / "cut").name == "step_0000002"
    again = tune(tmp_path / "cut")
    assert again["resumed_from_step"] == 2 and again["losses"] == pytest.approx(ref["losses"], rel=1e-6)

    # The HF folder holds the trained weights (changed from the base, output head untouched).
    base = load_model(tiny_model_dir, torch.device("cpu")).state_dict()
    tuned = load_model(tmp_path / "ref", torch.device("cpu")).state_dict()
    assert torch.equal(tuned["lm_head.weight"], base["lm_head.weight"])
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) >= len(base) - 2
    assert load_state(tmp_path / "ref")["completed"]


def test_eval_job_with_deepspeed_finetuning(tiny_prepared, tiny_model_dir, tmp_path, one_process_group):
    from cprec.eval.run import run

    cfg = _cfg(
        tmp_path,
        3,
        f"data.output_dir={tiny_prepared}",
        f"eval.checkpoint={tiny_model_dir}",
        "eval.ks=[1,5]",
        "eval.max_users=4",
        "eval.baselines=[]",
        "eval.lora_rank=2",
        "tracking.backend=none",
    )
    report = run(cfg)
    details = report["models"]["llm-finetuned"]["runs"]["all"]
    assert details["completed"] and details["engine"]["deepspeed"] and details["steps"] == 3
    assert set(report["results"]["llm-finetuned"]) == {"A", "B", "overall"}
    assert not torch.distributed.is_initialized()  # the job took down the group it started
    # LoRA adapters were merged: an ordinary HF folder
    names = {k for k, _ in load_model(tmp_path / "finetuned" / "all").named_parameters()}
    assert names and not any("lora_" in k for k in names)
