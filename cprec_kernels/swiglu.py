"""The gated MLP's activation, ``silu(gate) * up``: the eager reference and a ``torch.compile``-d path.

Why ours: transformers' Llama/Qwen2/Mistral MLP computes ``act_fn(gate_proj(x)) * up_proj(x)`` as
two eager kernels forward (SiLU, multiply) and three backward (two multiplies, SiLU's backward),
each a full pass over ``[B, L, intermediate]`` activations, and keeps three of them for backward
(the gate, its SiLU and the up projection). In a SmolLM2-135M step on one CPU core those passes
took 0.6 s of 11.7 s (the step's profile: ``aten::mul`` on ``[4, 512, 1536]`` alone 0.34 s).
Inductor fuses each direction into one loop and keeps only the gate and the up projection
(`benchmarks/results/train_ab.json`, ``swiglu``). Liger Kernel's fused SwiGLU is Triton (CUDA
only); on CPU no library offers one, hence this. Compiled once per process and shared by every
MLP of the model; the matmuls around it stay transformers' (and ZeRO-3's) own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compiled import COMPILE_BACKENDS, eager_or_compiled

MLP_BACKENDS = COMPILE_BACKENDS


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' gated MLP activation with SiLU: ``silu(gate) * up`` in the inputs' dtype."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "eager") -> torch.Tensor:
    """``silu(gate) * up`` by ``backend`` (eager | compiled)."""
    return eager_or_compiled(swiglu_reference, backend, "MLP")(gate, up)
