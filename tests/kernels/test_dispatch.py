"""Backend choice: forced names, auto rules, flash-attn absent, logging once."""

from __future__ import annotations

import logging

import pytest
import torch

import cprec_kernels.dispatch as dispatch
from cprec_kernels import (
    choose_attention_backend,
    choose_ce_backend,
    flash_available,
    lm_cross_entropy,
    packed_attention,
)


def test_forced_backends_are_used_as_named():
    for name in ("reference", "sdpa", "loop"):
        assert choose_attention_backend(name, "cpu", [8, 8], 1, 16)[0] == name


def test_auto_prefers_flash_on_cuda_when_importable():
    assert choose_attention_backend("auto", "cuda", [100] * 20, 1, 2000, flash_ok=True)[0] == "flash"


def test_auto_falls_back_when_flash_attn_is_absent():
    # A CUDA tensor without flash-attn takes flex attention (block-sparse, no [L, L] mask).
    name, why = choose_attention_backend("auto", "cuda", [100] * 20, 1, 2000, flash_ok=False)
    assert name == "flex" and "flash-attn absent" in why
    # On CPU flash is never chosen, even if importable.
    assert choose_attention_backend("auto", "cpu", [100] * 20, 1, 2000, flash_ok=True)[0] in ("loop", "sdpa")


def test_auto_cpu_cost_model():
    # Long rows of mid-size documents: the per-document loop does far less work.
    assert choose_attention_backend("auto", "cpu", [200] * 10, 1, 2000, flash_ok=False)[0] == "loop"
    # Very many tiny documents: loop overhead per segment dominates, one masked call wins.
    assert choose_attention_backend("auto", "cpu", [4] * 512, 4, 512, flash_ok=False)[0] == "sdpa"
    # 16-token documents still favour the loop, 1.8-2.0x faster than sdpa on 8-24-token documents
    # since it splits the token axis once (train_ab.json, "attention").
    assert choose_attention_backend("auto", "cpu", [16] * 128, 4, 512, flash_ok=False)[0] == "loop"
    # A single document filling the row: same work, the loop has no advantage.
    assert choose_attention_backend("auto", "cpu", [512], 1, 512, flash_ok=False)[0] == "sdpa"
    # ML-1M rows as the loader packs them (4 x 512, 14 documents of ~146 tokens): the loop is
    # 1.5x faster there (benchmarks/results/train_ab.json, "attention").
    ml1m = [220, 180, 112] + [200, 210, 102] + [150, 90, 160, 112] + [230, 120, 100, 62]
    assert sum(ml1m) == 4 * 512
    assert choose_attention_backend("auto", "cpu", ml1m, 4, 512, flash_ok=False)[0] == "loop"


def test_forcing_flash_without_flash_attn_is_a_clear_error():
    with pytest.raises(RuntimeError, match="flash-attn is not importable"):
        choose_attention_backend("flash", "cuda", [8], 1, 8, flash_ok=False)


def test_forcing_flash_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        choose_attention_backend("flash", "cpu", [8], 1, 8, flash_ok=True)


def test_real_dispatch_on_this_machine_without_flash_attn():
    # This CPU machine has no flash-attn build: auto must run, flash must fail loudly.
    q = torch.randn(1, 2, 8, 4)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = packed_attention(q, q, q, cu, 5, backend="auto")
    assert out.shape == (1, 8, 2, 4)
    if not flash_available():
        with pytest.raises(RuntimeError, match="flash"):
            packed_attention(q, q, q, cu, 5, backend="flash")


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="unknown attention backend"):
        choose_attention_backend("triton", "cpu", [8], 1, 8)
    with pytest.raises(ValueError, match="unknown cross-entropy backend"):
        choose_ce_backend("fused", 8, 8)


def test_ce_auto_threshold():
    assert choose_ce_backend("auto", 16, 1000)[0] == "reference"
    assert choose_ce_backend("auto", 16384, 32000)[0] == "chunked"
    assert choose_ce_backend("reference", 16384, 32000)[0] == "reference"


def test_ce_auto_takes_liger_on_cuda_only():
    assert choose_ce_backend("auto", 16384, 32000, "cuda", liger_ok=True)[0] == "liger"
    # CPU paths are unchanged, whether or not liger-kernel imports.
    assert choose_ce_backend("auto", 16384, 32000, "cpu", liger_ok=True)[0] == "chunked"
    assert choose_ce_backend("auto", 16, 1000, "cuda", liger_ok=False)[0] == "reference"
    assert choose_ce_backend("chunked", 16384, 32000, "cuda", liger_ok=True)[0] == "chunked"


def test_forcing_liger_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(RuntimeError, match="liger-kernel on CUDA"):
        choose_ce_backend("liger", 8, 8, "cpu", liger_ok=True)
    with pytest.raises(RuntimeError, match="liger-kernel on CUDA"):
        choose_ce_backend("liger", 8, 8, "cuda", liger_ok=False)
    # Through the real dispatcher on this machine's CPU tensors.
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="liger"):
        lm_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, -100]), backend="liger")


def test_choice_is_logged_once_per_backend(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    q = torch.randn(1, 2, 8, 4)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with caplog.at_level(logging.INFO, logger="cprec_kernels.dispatch"):
        for _ in range(3):
            packed_attention(q, q, q, cu, 8, backend="sdpa")
            packed_attention(q, q, q, cu, 8, backend="loop")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("attention backend: sdpa" in m for m in lines) == 1
    assert sum("attention backend: loop" in m for m in lines) == 1
