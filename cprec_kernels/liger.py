"""Fused linear cross-entropy from Liger Kernel (``liger-kernel`` on PyPI; Triton, CUDA only).

The output-head matmul and the loss run chunk by chunk inside one Triton kernel pair, with the
gradients computed in the forward pass, so neither ``[N, V]`` logits nor their gradient ever exist
(the same idea as :mod:`.cross_entropy`'s chunked loss, without its second matmul in backward).
Optional: imported lazily; absent or on CPU tensors, ``auto`` keeps the chunked/reference choice
and a forced ``liger`` raises naming the install.
"""

from __future__ import annotations

import functools

import torch

_INSTALL_HINT = "pip install 'cprec[gpu]' (liger-kernel, needs CUDA and Triton)"


@functools.lru_cache(maxsize=1)
def _load():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # ImportError, or Triton failing to initialise without a GPU
        return None, f"{type(exc).__name__}: {exc}"
    return LigerFusedLinearCrossEntropyLoss, ""


def liger_available() -> bool:
    """True when ``liger_kernel``'s fused linear cross-entropy can be imported."""
    return _load()[0] is not None


def liger_unavailable_reason() -> str:
    return _load()[1]


def liger_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean token loss (fp32) of ``hidden [N, H]`` under ``weight [V, H]``, labels -100 ignored."""
    loss_cls, reason = _load()
    if loss_cls is None:
        raise RuntimeError(f"cross-entropy backend 'liger' needs liger-kernel ({reason}); {_INSTALL_HINT}")
    if hidden.device.type != "cuda":
        raise RuntimeError(
            f"cross-entropy backend 'liger' needs CUDA tensors, got device {hidden.device}; "
            "use model.ce_backend=auto|chunked|reference on CPU"
        )
    loss = loss_cls(ignore_index=ignore_index, reduction="mean")(weight, hidden, labels, bias)
    if isinstance(loss, tuple):  # versions that can also return the z-loss
        loss = loss[0]
    return loss.float()
