"""DeepSpeed's ZeRO-3 optimizer step on CPU, without its two per-step gradient copies.

Why this exists: DeepSpeed's ZeRO-3 step (``DeepSpeedZeroOptimizer_Stage3``, 0.16-0.19) spends most
of a CPU step copying gradients rather than updating weights. Profiled alone on one core at
SmolLM2-135M, its optimizer step took about 1.0 s, of which 0.87 s was ``aten::copy_`` and 0.12 s
the fused AdamW update itself; with both patches below it takes 0.32 s against 1.20 s in the same
run (``benchmarks/results/train_ab.json``, ``zero3_step``):

- **The gradient norm** (``get_grad_norm_direct``) copies every gradient whole to fp64 before
  taking its norm: 134M parameters -> 1.1 GB written, and each gradient above glibc's 32 MiB mmap
  threshold as fp64 (the 28M-element embedding; at 0.5B every MLP matrix) is a fresh mapping the
  kernel faults in page by page. `norm_by_chunks` takes each gradient's norm over chunks of
  ``NORM_CHUNK`` elements, still in fp64: a chunk's fp64 copy is 2 MB, reused from the heap and
  warm in cache. On the embedding gradient that is 18 ms against 150-176 ms (one core); the value
  agrees with DeepSpeed's to 1e-15. It hands DeepSpeed each gradient's norm as a one-element
  tensor (the norm of that is the norm itself), so the rest of DeepSpeed's method -- the
  all-reduce over ranks and model-parallel groups, the bookkeeping -- runs unchanged.
- **The fp32 gradients** (``_prepare_fp32_grad_for_sub_group``) are built every step by
  concatenating the bf16 gradients into a fresh buffer and converting that into another fresh fp32
  buffer (0.5 GB at 135M): two allocations the kernel faults in page by page, then two copies.
  `fp32_grads_in_place` copies each gradient straight into one fp32 buffer per sub-group that
  lives for the run (4 bytes a parameter, which DeepSpeed's step allocated anyway).

Both are patched on the one optimizer instance (not the class), only for CPU runs without
optimizer offload (`cprec.runtime.engine.init_engine`, ``train.zero3_step``); the update, clipping
and checkpoint format are DeepSpeed's. The same setting turns DeepSpeed's ``reduce_scatter`` off
on one rank (`cprec.runtime.engine.deepspeed_config`): its all-reduce path reduces each gradient
bucket in place where the reduce-scatter path concatenates it into a new buffer first (the
backward of a 64-token batch 0.70 s against 1.19 s, the same ``train_ab.json`` entry). A DeepSpeed
whose optimizer lacks either method is left as it is, with a log line.
``tests/runtime/test_zero3_step.py`` checks the result against DeepSpeed's own step: the same norm
and the same weights after the update.
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)

PATCHED = ("get_grad_norm_direct", "_prepare_fp32_grad_for_sub_group")
NORM_CHUNK = 1 << 18
"""Elements per fp64 chunk of a gradient's norm (2 MB)."""


def chunked_norm(grad: torch.Tensor, p: float) -> torch.Tensor:
    """``grad``'s p-norm in fp64, over ``NORM_CHUNK``-element pieces: no fp64 copy of the whole."""
    flat = grad.reshape(-1)
    if flat.numel() <= NORM_CHUNK:
        return torch.linalg.vector_norm(flat, p, dtype=torch.float64)
    parts = [torch.linalg.vector_norm(c, p, dtype=torch.float64) for c in flat.split(NORM_CHUNK)]
    return torch.linalg.vector_norm(torch.stack(parts), p)


def norm_by_chunks(original):
    """``get_grad_norm_direct`` with each gradient's norm taken chunk by chunk (`chunked_norm`)."""

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        p = float(norm_type)
        norms = [chunked_norm(g, p).reshape(1) for g in gradients]
        return original(norms, params, norm_type)

    return get_grad_norm_direct


def fp32_grads_in_place(self, sub_group_id):
    """``_prepare_fp32_grad_for_sub_group``: the sub-group's gradients copied into its fp32 buffer."""
    master = self.fp32_partitioned_groups_flat[sub_group_id]
    buffers = self._cprec_fp32_grads
    buf = buffers.get(sub_group_id)
    if buf is None or buf.shape != master.shape:
        buf = buffers[sub_group_id] = torch.empty_like(master)
    offset = 0
    for grad in self.averaged_gradients[sub_group_id]:
        n = grad.numel()
        buf.narrow(0, offset, n).copy_(grad.reshape(-1))
        offset += n
    if offset != buf.numel():
        raise RuntimeError(
            f"ZeRO-3 sub-group {sub_group_id}: its gradients hold {offset} elements, its fp32 partition "
            f"{buf.numel()} (set train.zero3_step=deepspeed and report this)"
        )
    master.grad = buf
    self.averaged_gradients[sub_group_id] = None


def install(optimizer) -> bool:
    """Patch ``optimizer`` (DeepSpeed's ZeRO-3 optimizer, CPU, no offload); True when patched."""
    missing = [name for name in PATCHED if not callable(getattr(optimizer, name, None))]
    needed = ("fp32_partitioned_groups_flat", "averaged_gradients")
    missing += [name for name in needed if not hasattr(optimizer, name)]
    if missing:
        log.info("train.zero3_step=lean: this DeepSpeed's optimizer has no %s; its own step stays", missing)
        return False
    optimizer._cprec_fp32_grads = {}
    optimizer.get_grad_norm_direct = types.MethodType(
        norm_by_chunks(optimizer.get_grad_norm_direct), optimizer
    )
    optimizer._prepare_fp32_grad_for_sub_group = types.MethodType(fp32_grads_in_place, optimizer)
    return True
