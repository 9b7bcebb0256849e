"""Per-call choice between the reference kernels and the fast paths.

Attention (packed causal, no cross-document attention):

- ``reference``: explicit masked softmax in fp32 (ground truth, slow).
- ``sdpa``: one SDPA call with a ``[B, 1, L, L]`` block-diagonal causal mask.
- ``loop``: one causal SDPA call per document slice (no mask, work follows the documents).
- ``flash``: transformers' ``flash_attention_2`` varlen path (CUDA + flash-attn only).
- ``flex``: ``torch.nn.attention.flex_attention`` with a document-causal block mask (compiled on
  CUDA; eager elsewhere, for tests).
- ``auto``: ``flash`` when flash-attn imports and the tensors are on CUDA, ``flex`` on CUDA without
  flash-attn; on CPU ``loop`` or ``sdpa`` by the cost model in :func:`choose_attention_backend`.

Loss (``lm_cross_entropy``): ``reference`` (full logits), ``chunked`` (never ``[N, V]``), ``liger``
(Liger Kernel's fused linear cross-entropy, CUDA only), ``auto`` (``liger`` on CUDA when
liger-kernel imports, else chunked once ``N * V`` exceeds :data:`CE_AUTO_CHUNK_ELEMENTS`).

Each distinct choice is logged once (INFO), so a run's log says which kernels it used.
"""

from __future__ import annotations

import logging

import torch

from .cross_entropy import chunked_cross_entropy, cross_entropy_reference
from .flash import flash_available, flash_problem, packed_attention_flash
from .flex import flex_available, packed_attention_flex
from .liger import liger_available, liger_cross_entropy, liger_unavailable_reason
from .loop import packed_attention_loop
from .reference import packed_attention_reference
from .sdpa import packed_attention_sdpa
from .segments import bounds_list, segment_lengths

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "loop", "flash", "flex")
CE_BACKENDS = ("auto", "reference", "chunked", "compiled", "liger")

# Cost model for auto on CPU, in units of one entry of the masked SDPA's L x L block per row: the
# per-document loop costs LOOP_ENTRY_COST per entry of its documents' blocks plus a fixed
# LOOP_SEGMENT_OVERHEAD_TOKENS**2 per segment (Python and its small kernels), whatever the heads.
# Fitted to CPU time per fwd+bwd (benchmarks/results/train_ab.json, "attention"): bf16, one thread,
# q/k/v laid out as the model produces them, 8 x 32 heads (7M model) and 9/3 x 64 (SmolLM2-135M),
# on real food-kitchen and ML-1M batches and synthetic ones. The 2026-12-02 refit, after the loop
# took its documents as one split of the token axis (its backward no longer zero-fills a full-size
# gradient per document), gives an overhead of ~67 tokens squared per segment at both shapes and an
# entry cost of 1.57 at 8 x 32 heads and 0.84 at 9/3 (the written-out grouped-query kernel); 1.3 is
# kept between them. So: 4 x 512 rows of 100-150-token documents (food-kitchen, ML-1M) -> loop,
# 1.8-2.8x faster than sdpa; 2048-token rows of 100-300-token documents -> loop (5-8x); 512-token
# rows of 8-24-token documents -> loop now (1.8-2.0x; sdpa before the split); one document filling
# the row -> sdpa (1.5x faster at 8 x 32 heads; at 9/3 the loop is 1.14x faster: conservative).
# (The first fit, 256**2 per segment and no entry cost, chose sdpa for the first case; the second,
# 112**2, the third.) On CUDA without flash-attn auto takes flex attention (a block-sparse fused kernel), and
# the masked SDPA where flex is absent: kernel launches would dominate the loop there.
LOOP_SEGMENT_OVERHEAD_TOKENS = 67
LOOP_ENTRY_COST = 1.3
# Above this many logits (N * V) `auto` switches the loss to the chunked kernel (64M fp32 = 256 MiB).
CE_AUTO_CHUNK_ELEMENTS = 1 << 26

_logged: set[tuple[str, str]] = set()


def _log_once(kind: str, name: str, why: str) -> None:
    if (kind, name) not in _logged:
        _logged.add((kind, name))
        log.info("%s backend: %s (%s)", kind, name, why)


def choose_attention_backend(
    requested: str,
    device_type: str,
    seg_lengths: list[int],
    batch: int,
    seq_len: int,
    flash_ok: bool | None = None,
) -> tuple[str, str]:
    """Return ``(backend, reason)`` for one call; pure, except probing flash-attn when ``flash_ok`` is None.

    Raises ValueError for an unknown name and RuntimeError when ``flash`` is forced but unusable.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {list(ATTENTION_BACKENDS)}")
    if flash_ok is None:
        flash_ok = flash_available()
    if requested == "flash":
        problem = flash_problem(device_type, importable=flash_ok)
        if problem:
            raise RuntimeError(f"model.attn_backend=flash: {problem}")
        return "flash", "forced by config"
    if requested != "auto":
        return requested, "forced by config"
    if device_type == "cuda" and flash_ok:
        return "flash", "auto: flash-attn importable and tensors on CUDA"
    if device_type == "cuda" and flex_available():
        return "flex", "auto: tensors on CUDA but flash-attn absent"
    if device_type == "cuda":
        return "sdpa", "auto: tensors on CUDA but flash-attn and flex_attention absent"
    loop_work = LOOP_ENTRY_COST * sum(n * n for n in seg_lengths)
    loop_work = int(loop_work + len(seg_lengths) * LOOP_SEGMENT_OVERHEAD_TOKENS**2)
    mask_work = batch * seq_len * seq_len
    where = f"no flash on {device_type}"
    if loop_work < mask_work:
        return "loop", f"auto ({where}): per-document work {loop_work} < masked {mask_work}"
    return "sdpa", f"auto ({where}): masked work {mask_work} <= per-document {loop_work}"


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
    bounds: list[int] | None = None,
) -> torch.Tensor:
    """Causal attention within the segments of packed rows.

    ``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` (``H % Hkv == 0``), ``cu_seqlens`` int32 boundaries over
    the flattened ``B * L`` tokens (no segment crossing a row) -> ``[B, L, H, D]``. ``bounds`` is
    ``cu_seqlens`` as a Python list, when the caller already has it (saves a host copy per layer).
    """
    b, h, n, _ = q.shape
    if k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    if bounds is None:
        bounds = bounds_list(cu_seqlens)
    name, why = choose_attention_backend(backend, q.device.type, segment_lengths(bounds), b, n)
    _log_once("attention", name, why)
    if name == "flash":
        return packed_attention_flash(q, k, v, cu_seqlens, max_seqlen, scale, dropout)
    if name == "loop":
        return packed_attention_loop(q, k, v, bounds, scale, dropout)
    if name == "sdpa":
        return packed_attention_sdpa(q, k, v, cu_seqlens, scale, dropout)
    if name == "flex":
        return packed_attention_flex(q, k, v, bounds, scale, dropout)
    return packed_attention_reference(q, k, v, cu_seqlens, scale, dropout)


def choose_ce_backend(
    requested: str,
    n_tokens: int,
    vocab_size: int,
    device_type: str = "cpu",
    liger_ok: bool | None = None,
) -> tuple[str, str]:
    """Return ``(backend, reason)`` for the loss; ``auto`` takes Liger on CUDA when it imports, and
    otherwise chunks once ``N * V`` is large. A forced ``liger`` that cannot run raises RuntimeError."""
    if requested not in CE_BACKENDS:
        raise ValueError(f"unknown cross-entropy backend {requested!r}; choose from {list(CE_BACKENDS)}")
    if requested == "liger" or (requested == "auto" and device_type == "cuda"):
        if liger_ok is None:
            liger_ok = liger_available()
        if requested == "liger" and not (liger_ok and device_type == "cuda"):
            why = liger_unavailable_reason() if not liger_ok else f"tensors on '{device_type}'"
            raise RuntimeError(
                f"model.ce_backend=liger needs liger-kernel on CUDA tensors ({why}); "
                "use auto|chunked|reference"
            )
        if liger_ok:
            return "liger", "forced by config" if requested == "liger" else "auto: CUDA and liger-kernel"
    if requested != "auto":
        return requested, "forced by config"
    if n_tokens * vocab_size > CE_AUTO_CHUNK_ELEMENTS:
        return "chunked", f"auto: N*V = {n_tokens * vocab_size} > {CE_AUTO_CHUNK_ELEMENTS}"
    return "reference", f"auto: N*V = {n_tokens * vocab_size} <= {CE_AUTO_CHUNK_ELEMENTS}"


def lm_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean next-token loss (fp32) of ``hidden [N, H]`` under the head ``weight [V, H]`` (+ ``bias``).

    ``labels [N]`` hold target ids or -100 (ignored). No valid label gives 0 rather than NaN.
    """
    name, why = choose_ce_backend(backend, hidden.shape[0], weight.shape[0], hidden.device.type)
    _log_once("cross-entropy", name, why)
    if name in ("chunked", "compiled"):
        return chunked_cross_entropy(
            hidden, weight, labels, chunk_size, bias=bias, compiled=name == "compiled"
        )
    if not bool((labels != -100).any()):
        # F.cross_entropy gives NaN here; keep the graph so every parameter still gets a (zero) grad.
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
    if name == "liger":
        return liger_cross_entropy(hidden, weight, labels, bias=bias)
    return cross_entropy_reference(hidden, weight, labels, bias=bias)
