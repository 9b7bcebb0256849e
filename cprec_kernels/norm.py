"""RMSNorm of a decoder layer: the eager reference and a ``torch.compile``-d fast path.

transformers' Llama/Qwen2/Mistral RMSNorm is seven eager kernels forward (upcast, square, mean,
rsqrt, scale, downcast, weight) and about as many backward, each a pass over the activations: at
SmolLM2-135M's 4 x 512 x 576 bf16 activations one norm takes 7.5 ms fwd+bwd on one CPU core, and
a step has 61 of them (3% of it). Inductor fuses each direction into one loop (C++ on CPU, Triton
on CUDA): 2.5 ms, the same values (`benchmarks/results/train_ab.json`, ``norm``). It is compiled
once per process (about 20 s on one core the first time; inductor's cache makes later processes
quicker) and shared by every norm of the model. Liger Kernel has a fused RMSNorm too, CUDA only;
on CPU there is no library kernel (``F.rms_norm`` is no faster than the eager formula), hence this.
"""

from __future__ import annotations

import torch

from .compiled import COMPILE_BACKENDS, eager_or_compiled

NORM_BACKENDS = COMPILE_BACKENDS


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``: normalise in fp32, back to the input dtype, then scale."""
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "eager") -> torch.Tensor:
    """RMSNorm of ``hidden [..., H]`` with ``weight [H]``, by ``backend`` (eager | compiled)."""
    return eager_or_compiled(rms_norm_reference, backend, "norm")(hidden, weight, eps)
