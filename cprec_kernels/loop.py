"""Packed attention as one causal attention call per document slice.

Work follows the documents (``sum(n_i**2)`` instead of ``L**2`` per row) and no ``[L, L]`` mask is
built, at the price of a Python-level loop: a few small kernels (forward, backward) per segment per
layer. This is the CPU choice when documents are short relative to the row but not tiny.

With grouped-query attention, each document's attention on CPU is written out here
(:func:`document_attention`) rather than handed to ``F.scaled_dot_product_attention``: SDPA's CPU
paths (its math path for 3-D slices, its flash kernel for 4-D ones) repeat the shared key/value
heads for every query head and, in the math path, wrap the softmax in extra all-masked-row checks.
Grouping the query heads of one key/value head into a single matmul instead (``[r * n, D] @
[D, n]``, r query heads per KV head) makes bigger GEMMs and no copies of K and V: 1.30-1.35x faster
fwd+bwd than SDPA's math path at SmolLM2-135M's 9/3 heads on ML-1M and food-kitchen rows, 1.13x on
2048-token rows of long documents (`benchmarks/results/train_ab.json`, ``attention``). Without
grouped heads (the 7M model's 8/8) there is nothing to group and it is no faster, and on documents
under :data:`WRITTEN_OUT_MIN_TOKENS` tokens its few extra small kernels cost more than they save:
SDPA serves those slices, as it does fp32 inputs (where the written-out kernel measured 1.3x
slower: SDPA's math path has nothing to upcast), attention dropout and other devices.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .segments import bounds_list

# Shorter documents go to SDPA's math path (see the module docstring).
WRITTEN_OUT_MIN_TOKENS = 32


@functools.lru_cache(maxsize=64)
def _future(n: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` True above the diagonal: the keys a causal query may not see (kept per length)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one document: ``q [H, n, D]``, ``k, v [Hkv, n, D]`` -> ``[H, n, D]``.

    Query head ``i`` uses key/value head ``i // (H // Hkv)`` (transformers' ``repeat_kv`` order);
    scores in the inputs' dtype, softmax in fp32 (as SDPA's math path computes it on CPU).
    """
    h, n, d = q.shape
    kv = k.shape[0]
    grouped = q.reshape(kv, (h // kv) * n, d)  # the query heads sharing one KV head, stacked
    scores = torch.matmul(grouped, k.transpose(1, 2)).mul_(scale)
    scores = scores.view(kv, h // kv, n, n).masked_fill_(_future(n, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.view(kv, (h // kv) * n, n), v).view(h, n, d)


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
    # fp32 keeps SDPA (see the module docstring).
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    written_out = gqa and low_precision and q.device.type == "cpu" and dropout == 0.0
    scale = d**-0.5 if scale is None else scale
    bounds = bounds_list(cu_seqlens)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # One split of the flattened token axis, not an index per document: autograd then joins the
    # documents' gradients in one pass, where per-document slices each zero-fill a full-size
    # gradient and add into it (0.35 s of a 135M step). The transposes are views: after the
    # rotary embedding q and k (and v always) are laid out [B, L, H, D] in memory.
    docs = zip(*(t.transpose(1, 2).reshape(b * n, t.shape[1], d).split(lengths) for t in (q, k, v)))
    pieces = []
    for qs, ks, vs in docs:  # each [n_i, H or Hkv, D]
        qs, ks, vs = qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)
        if written_out and qs.shape[1] >= WRITTEN_OUT_MIN_TOKENS:
            out = document_attention(qs, ks, vs, scale)
        else:
            out = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
            )
        pieces.append(out.transpose(0, 1))  # [n_i, H, D]
    # Segments come in flattened-token order, so concatenating them rebuilds the [B*L] token axis.
    return torch.cat(pieces, dim=0).view(b, n, h, d)
