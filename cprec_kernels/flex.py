"""Packed attention through PyTorch's ``flex_attention`` with a document-causal block mask.

The CUDA fallback where flash-attn is not installed: the block mask marks which 128 x 128 tiles of
the ``L x L`` score matrix hold any allowed (same document, not in the future) entry, and the fused
kernel skips the others, so the work follows the documents like flash varlen does, without an
``[B, L, L]`` mask in memory. On CUDA the kernel is compiled once (``torch.compile``); elsewhere it
runs eagerly (correct, slow: only for tests, the CPU backends are the loop and masked SDPA).

The block mask depends only on the segment boundaries, which are the same for every layer of one
forward, so the last one built is reused while the boundaries do not change.
"""

from __future__ import annotations

import functools

import torch

from .segments import segment_ids, to_heads_last

_last_mask: tuple[tuple, object] | None = None


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_available() -> bool:
    """True when this torch has ``torch.nn.attention.flex_attention``."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_block_mask(bounds: list[int], batch: int, seq_len: int, device):
    """The flex block mask of causal attention within the segments ``bounds`` (cached for reuse)."""
    global _last_mask
    from torch.nn.attention.flex_attention import create_block_mask

    key = (tuple(bounds), batch, seq_len, str(device))
    if _last_mask is not None and _last_mask[0] == key:
        return _last_mask[1]
    cu = torch.tensor(bounds, dtype=torch.int64, device=device)
    seg = segment_ids(cu, batch * seq_len).view(batch, seq_len)

    def document_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

    mask = create_block_mask(document_causal, batch, None, seq_len, seq_len, device=device)
    _last_mask = (key, mask)
    return mask


def packed_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: list[int],
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, L, H, D]``."""
    from torch.nn.attention.flex_attention import flex_attention

    if dropout > 0.0:
        raise RuntimeError("attention backend 'flex' has no attention dropout; use sdpa or flash")
    b, h, n, _ = q.shape
    mask = document_block_mask(bounds, b, n, q.device)
    fn = _compiled() if q.device.type == "cuda" else flex_attention
    out = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != h)
    return to_heads_last(out)
