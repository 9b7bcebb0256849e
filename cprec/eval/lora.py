"""A minimal LoRA for fine-tuning: low-rank adapters on the attention q/v projections.

``W x + (alpha / r) * B A x`` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros), so the
adapted model starts exactly equal to the base model. Only A and B train. ``merge_lora`` folds the
adapters back into plain ``nn.Linear`` weights, so the fine-tuned model is saved as an ordinary HF
folder that any later step loads without knowing about LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with ``scale * B @ A`` added to its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


def apply_lora(model: nn.Module, rank: int, targets: tuple[str, ...] = TARGETS) -> int:
    """Freeze every parameter, wrap ``targets`` linears in LoRA; returns how many were wrapped."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"LoRA found no linear layers named {list(targets)} in {type(model).__name__}")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every ``LoRALinear`` by its merged ``nn.Linear``; returns how many were merged."""
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged
