"""Packed attention through transformers' own ``flash_attention_2`` path (CUDA only, optional).

There is no varlen wrapper of ours here any more: transformers' flash attention function already
takes exactly what a packed batch carries (``cu_seq_lens_q/k`` over the flattened ``B * L`` tokens,
``max_length_q/k``) and calls flash-attn's ``flash_attn_varlen_func`` with them, GQA included. This
module only adapts the call to the dispatcher's layout and says clearly when flash-attn is absent
(it has no CPU build: under ``auto`` the dispatcher then falls back, a forced ``flash`` raises).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_INSTALL_HINT = "pip install 'cprec[gpu]' (flash-attn>=2.6, CUDA build)"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Callable | None, str]:
    try:
        import flash_attn  # noqa: F401  (a broken CUDA build raises OSError/RuntimeError here)
        from transformers.integrations.flash_attention import flash_attention_forward
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return flash_attention_forward, ""


def flash_available() -> bool:
    """True when flash-attn and transformers' flash attention integration can be imported."""
    return _load()[0] is not None


def flash_unavailable_reason() -> str:
    """Why flash-attn cannot be used ('' when it can)."""
    return _load()[1]


def flash_problem(device_type: str, dtype: torch.dtype | None = None, importable: bool | None = None) -> str:
    """Why flash-attn cannot run on tensors of ``device_type`` (and ``dtype``); '' when it can.

    The one statement of its needs, for the dispatcher (a forced ``flash``) and the kernel alike;
    ``importable`` stands in for the import probe (the dispatcher's pure tests)."""
    if not (flash_available() if importable is None else importable):
        reason = flash_unavailable_reason() or "not installed"
        return f"flash-attn is not importable ({reason}); {_INSTALL_HINT}"
    if device_type != "cuda":
        return (
            f"needs CUDA tensors, got device '{device_type}'; flash-attn has no CPU build: "
            "use model.attn_backend=auto|sdpa|loop|reference"
        )
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16 tensors, got {dtype}"
    return ""


class _FlashCaller:
    """The attention-module attributes transformers' flash function reads (its implementation name,
    causality, layer index): the dispatcher calls it without the model's module."""

    class config:  # noqa: N801  (mirrors ``module.config``)
        _attn_implementation = "flash_attention_2"

    is_causal = True
    layer_idx = None


def packed_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, L, H, D]`` via transformers' flash varlen path."""
    problem = flash_problem(q.device.type, q.dtype)
    if problem:
        raise RuntimeError(f"attention backend 'flash': {problem}")
    fn = _load()[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out, _ = fn(
        _FlashCaller(),
        q,
        k,
        v,
        None,  # no padding mask: the boundaries say everything
        dropout=dropout,
        scaling=scale,
        is_causal=True,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=int(max_seqlen),
        max_length_k=int(max_seqlen),
    )
    return out.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
