"""Packed attention through flash-attn's ``flash_attn_varlen_func`` (CUDA only, optional import).

flash-attn has no CPU build, so it is imported lazily and its absence is a normal state: the
dispatcher falls back to a CPU backend under ``auto`` and raises a clear error when ``flash`` is
forced. The kernel handles GQA natively and needs fp16/bf16 tensors on a CUDA device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_INSTALL_HINT = "pip install 'cprec[gpu]' (flash-attn>=2.6, CUDA build)"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Callable | None, str]:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as exc:  # ImportError, or a broken CUDA build raising OSError/RuntimeError
        return None, f"{type(exc).__name__}: {exc}"
    return flash_attn_varlen_func, ""


def flash_available() -> bool:
    """True when ``flash_attn.flash_attn_varlen_func`` can be imported."""
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


def packed_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, L, H, D]`` via flash-attn varlen (causal)."""
    problem = flash_problem(q.device.type, q.dtype)
    if problem:
        raise RuntimeError(f"attention backend 'flash': {problem}")
    fn = _load()[0]
    b, h, n, d = q.shape
    # [B, H, L, D] -> [B*L, H, D]: flash-attn's packed ("unpadded") layout.
    qf = q.transpose(1, 2).reshape(b * n, h, d)
    kf = k.transpose(1, 2).reshape(b * n, k.shape[1], d)
    vf = v.transpose(1, 2).reshape(b * n, v.shape[1], d)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = fn(
        qf,
        kf,
        vf,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_k=int(max_seqlen),
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
    )
    return out.view(b, n, h, d)
