"""Packed attention through one SDPA call per batch with a block-diagonal causal mask.

The mask is ``[B, 1, L, L]`` booleans (True = may attend), built from ``cu_seqlens``: cost and
memory grow with ``L**2`` per row whatever the document lengths, but it is a single fused kernel,
so it wins when documents are long relative to the row or very many and short.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segments import segment_ids, to_heads_last


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask: query i may see key j iff same segment and ``j <= i``."""
    seg = segment_ids(cu_seqlens, batch * seq_len).view(batch, seq_len)
    pos = torch.arange(seq_len, device=seg.device)
    causal = pos[None, :] <= pos[:, None]
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def packed_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    dropout: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, L, H, D]``; ``mask`` may be precomputed."""
    b, h, n, _ = q.shape
    if mask is None:
        mask = block_diagonal_causal_mask(cu_seqlens.to(q.device), b, n)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=k.shape[1] != h,
    )
    return to_heads_last(out)
