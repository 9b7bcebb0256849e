"""Model construction from a ModelConfig or a local folder; parameter counts and FLOPs."""

from __future__ import annotations

import pytest
import torch

from cprec.config import ModelConfig, load_config
from cprec.model.build import build_model, hf_config, resolve_intermediate_size
from cprec.model.flops import count_params, flops_per_token


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_from_scratch_sizes_follow_the_config(arch):
    cfg = ModelConfig(arch=arch, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, rope_theta=5e5)
    model = build_model(cfg, 123, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    c = model.config
    assert c.model_type == arch
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 3, 4, 2)
    assert c.vocab_size == 123 and model.get_input_embeddings().weight.shape == (123, 64)
    assert model.get_output_embeddings().weight.shape == (123, 64)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 0)
    assert c.rope_parameters["rope_theta"] == 5e5
    assert c.use_cache is False
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_defaults_for_zero_fields():
    cfg = ModelConfig(hidden_size=96, num_heads=6)
    assert resolve_intermediate_size(cfg) == 256  # round(8/3 * 96) = 256, already a multiple of 64
    assert resolve_intermediate_size(ModelConfig(hidden_size=128, num_heads=4)) == 384  # 341 -> 384
    assert resolve_intermediate_size(ModelConfig(intermediate_size=100)) == 100
    conf = hf_config(cfg, 50)
    assert conf.num_key_value_heads == 6 and conf.intermediate_size == 256


def test_seed_makes_initialisation_reproducible():
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2)
    a, b = build_model(cfg, 40, seed=3), build_model(cfg, 40, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_tied_embeddings():
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, tie_word_embeddings=True), 40)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    untied = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), 40)
    assert count_params(model) == count_params(untied) - 40 * 32


def test_gradient_checkpointing_toggle():
    off = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), 40)
    on = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, gradient_checkpointing=True), 40)
    flag = (
        "is_activation_checkpointing"
        if hasattr(off, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert not getattr(off, flag) and getattr(on, flag)


def test_local_folder_is_loaded_and_embeddings_grow(tmp_path):
    src = build_model(ModelConfig(arch="qwen2", hidden_size=32, num_layers=1, num_heads=2), 50, seed=0)
    src.save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), hidden_size=96, num_heads=3)  # ignored for folders
    same = build_model(cfg, 50)
    assert same.config.model_type == "qwen2" and same.config.hidden_size == 32
    torch.testing.assert_close(same.lm_head.weight, src.lm_head.weight)
    grown = build_model(cfg, 70, pad_token_id=3)
    assert grown.get_input_embeddings().weight.shape == (70, 32)
    assert grown.get_output_embeddings().weight.shape == (70, 32)
    assert grown.config.pad_token_id == 3
    torch.testing.assert_close(grown.get_input_embeddings().weight[:50], src.get_input_embeddings().weight)
    assert all(p.dtype == torch.float32 for p in grown.parameters())


def test_bf16_folder_is_upcast_to_fp32(tmp_path):
    src = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), 50).to(torch.bfloat16)
    src.save_pretrained(tmp_path)
    model = build_model(ModelConfig(name_or_path=str(tmp_path)), 50)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local HF model folder"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "nope")), 50)


def test_presets_build_the_intended_shapes(repo_root):
    # Build the real tiny/small presets; only the config of the large ones (no allocation).
    tiny = load_config(repo_root / "configs" / "model" / "tiny.yaml").model
    n_tiny = count_params(build_model(tiny, 4000), exclude_input_embeddings=True)
    assert 0.2e6 < n_tiny < 2e6
    for preset, lo, hi in (("llama-1b.yaml", 1.0e9, 1.4e9), ("llama-7b.yaml", 6.5e9, 7.0e9)):
        cfg = load_config(repo_root / "configs" / "model" / preset).model
        conf = hf_config(cfg, 32000)
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            n = count_params(AutoModelForCausalLM.from_config(conf))
        assert lo < n < hi, (preset, n)


def test_flops_per_token():
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4)
    assert flops_per_token(cfg, 1000, 128) == 6 * 1000 + 12 * 2 * 64 * 128
    assert flops_per_token(cfg, 1000, 128, causal=True) == 6 * 1000 + 6 * 2 * 64 * 128
    model = build_model(cfg, 50)
    # A transformers config works too (folder models), with its own field names.
    assert flops_per_token(model.config, 1000, 128) == flops_per_token(cfg, 1000, 128)
    n_all, n_matmul = count_params(model), count_params(model, exclude_input_embeddings=True)
    assert n_all - n_matmul == 50 * 64
