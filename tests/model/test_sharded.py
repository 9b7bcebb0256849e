"""Sharded loading's pieces: slice reads, weight-file checks, and a one-process ZeRO-3 load."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cprec.config import ModelConfig
from cprec.model import sharded
from cprec.model.build import build_model


def test_read_span_reads_exact_flat_ranges(tmp_path):
    tensors = {
        "m": torch.arange(7 * 5, dtype=torch.float32).view(7, 5),
        "v": torch.arange(11.0),
        "c": torch.ones(2, 3, 4),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for key, full in tensors.items():
            flat = full.reshape(-1)
            for start, end in [(0, flat.numel()), (3, 9), (5, 10), (7, 8), (flat.numel() - 2, flat.numel())]:
                assert torch.equal(sharded._read_span(f, key, start, end), flat[start:end]), (key, start, end)


def _folder(tmp_path, shard_size="20KB"):
    cfg = ModelConfig(arch="qwen2", hidden_size=32, num_layers=2, num_heads=2, tie_word_embeddings=True)
    model = build_model(cfg, 90, seed=1)
    model.save_pretrained(tmp_path / "hf", max_shard_size=shard_size)
    return tmp_path / "hf", model


def test_missing_shard_is_named(tmp_path):
    folder, _ = _folder(tmp_path)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"names 1 shard file\(s\) that are missing .*{shards[1].name} \(\d+ tensors\)",
    ):
        sharded.weight_files(folder)
    with pytest.raises(FileNotFoundError, match=shards[1].name):  # the unsharded build checks first too
        build_model(ModelConfig(name_or_path=str(folder)), 90)


def test_bin_only_folder_is_refused_for_sharded_loading(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert sharded.weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    with pytest.raises(ValueError, match="safe_serialization=True"):
        sharded.weight_files(tmp_path, need_safetensors=True)
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        sharded.weight_files(tmp_path / "nothing")


def test_one_process_zero3_load_equals_the_folder(tmp_path, one_process_group):
    import deepspeed

    from cprec.runtime import engine as eng

    folder, src = _folder(tmp_path)
    eng.start_distributed()
    spec = eng.EngineSpec(micro_batch_size=1, zero_stage=3, dtype="fp32")
    model = build_model(ModelConfig(name_or_path=str(folder)), 90, zero3=eng.zero3_build_config(spec))
    assert sharded.is_partitioned(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.dtype == torch.float32
    for (name, p), want in zip(model.named_parameters(), src.parameters()):
        assert p.numel() == 0  # a partition placeholder outside a gather
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p.data, want.data), name
