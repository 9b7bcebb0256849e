"""Packed attention as one causal SDPA call per document slice.

Work follows the documents (``sum(n_i**2)`` instead of ``L**2`` per row) and no mask is built, at
the price of a Python-level loop: two small kernels (forward, backward) per segment per layer.
This is the CPU choice when documents are short relative to the row but not tiny.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segments import bounds_list


def packed_attention_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | list[int],
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, L, H, D]``.

    ``cu_seqlens`` may be given as a Python list to avoid a device-to-host copy per call.
    """
    b, h, n, d = q.shape
    gqa = k.shape[1] != h
    bounds = bounds_list(cu_seqlens)
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        row, lo = divmod(start, n)
        hi = lo + (end - start)
        # 3-D slices: SDPA serves them with its math path (two bmm + softmax). On CPU that is
        # faster for per-document calls than the fused flash kernel a 4-D slice would get (1.1-1.4x
        # in bf16 on real batches, benchmarks/results/train_ab.json "attention").
        out = F.scaled_dot_product_attention(
            q[row, :, lo:hi],
            k[row, :, lo:hi],
            v[row, :, lo:hi],
            dropout_p=dropout,
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        )
        pieces.append(out.transpose(0, 1))  # [n_i, H, D]
    # Segments come in flattened-token order, so concatenating them rebuilds the [B*L] token axis.
    return torch.cat(pieces, dim=0).view(b, n, h, d)
