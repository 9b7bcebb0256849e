"""The DeepSpeed JSON built from an explicit engine spec; spec validation; AdamW groups."""

from __future__ import annotations

import pytest
from torch import nn

from cprec.config import load_config
from cprec.runtime.engine import EngineSpec, deepspeed_config, param_groups
from cprec.train.geometry import batch_geometry, engine_spec


def test_deepspeed_config_fields():
    cfg = load_config(
        None,
        [
            "train.micro_batch_size=2",
            "train.grad_accum=4",
            "train.grad_clip=0.5",
            "train.offload_optimizer=true",
        ],
    )
    ds = deepspeed_config(engine_spec(cfg, batch_geometry(cfg.train, 2)), gpu=False)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert "scheduler" not in ds  # the LR comes from the WSA function

    fp32 = load_config(None, ["model.dtype=fp32", "train.zero_stage=0"])
    ds = deepspeed_config(engine_spec(fp32, batch_geometry(fp32.train, 1)), gpu=True)
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is False
    bad = load_config(None, ["train.zero_stage=0", "train.offload_optimizer=true"])
    with pytest.raises(ValueError, match="train.offload_optimizer"):
        engine_spec(bad, batch_geometry(bad.train, 1))


def test_param_groups_skip_decay_on_vectors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]  # weight | bias, norm weight, norm bias
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_engine_spec_names_the_bad_field():
    with pytest.raises(ValueError, match="'zero_stage'"):
        EngineSpec(micro_batch_size=2, zero_stage=4)
    with pytest.raises(ValueError, match="'dtype'"):
        EngineSpec(micro_batch_size=2, dtype="fp16")
    with pytest.raises(ValueError, match="'micro_batch_size'"):
        EngineSpec(micro_batch_size=0)
    ds = deepspeed_config(EngineSpec(micro_batch_size=8, world_size=2, betas=(0.9, 0.999)), gpu=False)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"] == {"stage": 0}
    assert ds["optimizer"]["params"]["weight_decay"] == 0.0 and ds["bf16"]["enabled"] is False
