"""Shared helpers for packed (varlen) attention: segment boundaries and their checks.

Layout used by every attention backend in this package: queries/keys/values in the "heads first"
layout transformers and SDPA use, ``[B, H, L, D]`` (keys/values may have fewer heads, GQA), and a
``cu_seqlens`` vector of cumulative segment boundaries over the *flattened* ``B * L`` tokens (as in
flash-attn's varlen API). No segment may cross a row, so every row start ``b * L`` is a boundary.
Outputs are ``[B, L, H, D]``, the layout a transformers attention function returns.
"""

from __future__ import annotations

import random

import torch


def bounds_list(cu_seqlens: torch.Tensor | list[int] | tuple[int, ...]) -> list[int]:
    """``cu_seqlens`` as a Python list (one host sync when it lives on a GPU)."""
    if isinstance(cu_seqlens, torch.Tensor):
        return [int(x) for x in cu_seqlens.tolist()]
    return [int(x) for x in cu_seqlens]


def check_bounds(bounds: list[int], batch: int, seq_len: int) -> None:
    """Raise ValueError unless ``bounds`` cuts ``batch`` rows of ``seq_len`` tokens into row-local spans."""
    total = batch * seq_len
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at B*L={total}, got {bounds[:3]}...{bounds[-3:]}"
        )
    if any(a >= b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty segments)")
    have = set(bounds)
    missing = [b * seq_len for b in range(batch) if b * seq_len not in have]
    if missing:
        raise ValueError(
            f"a segment crosses a row boundary: row starts {missing[:4]} are not in cu_seqlens "
            f"(each row of {seq_len} tokens must start a new segment)"
        )


def random_bounds(rows: int, seq_len: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Row-local segments of random lengths in [lo, hi] (the last one per row cut to fit): packed
    rows of synthetic documents, for the kernels' tests and benchmarks."""
    rng = random.Random(seed)
    bounds = [0]
    for r in range(rows):
        pos, end = r * seq_len, (r + 1) * seq_len
        while pos < end:
            pos = min(pos + rng.randint(lo, hi), end)
            bounds.append(pos)
    return bounds


def segment_lengths(bounds: list[int]) -> list[int]:
    """Lengths of the segments described by ``bounds``."""
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of each of the ``total`` flattened tokens, as an int64 tensor on cu_seqlens' device."""
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:], pos, right=True)


def to_heads_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D] -> [B, L, H, D]`` contiguous (the layout attention functions return)."""
    return x.transpose(1, 2).contiguous()
