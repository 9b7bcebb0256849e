"""Ground-truth packed causal attention in plain PyTorch: explicit masked softmax, one row at a time.

Slow and memory hungry (a full ``[H, L, L]`` fp32 score matrix per row) but obviously correct: a
query attends to a key only when both lie in the same segment and the key is not in the future.
Every fast backend is tested against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segments import segment_ids, to_heads_last


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]``, each kv head repeated for its query group (GQA)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def packed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention within segments: ``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, L, H, D]``.

    Scores and softmax are computed in fp32 whatever the input dtype; the output has ``q``'s dtype.
    """
    b, h, n, d = q.shape
    n_rep = h // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = d**-0.5 if scale is None else scale
    seg = segment_ids(cu_seqlens.to(q.device), b * n).view(b, n)
    pos = torch.arange(n, device=q.device)
    causal = pos[None, :] <= pos[:, None]  # [L_q, L_k]
    rows = []
    for i in range(b):
        allowed = (seg[i][:, None] == seg[i][None, :]) & causal
        scores = torch.matmul(q[i].float(), k[i].float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout, training=True)
        rows.append(torch.matmul(probs, v[i].float()).to(q.dtype))
    return to_heads_last(torch.stack(rows))
