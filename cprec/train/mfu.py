"""Model FLOPs utilisation: the hardware peak that achieved FLOP/s are compared with.

MFU = (tokens/s x FLOPs per token) / (peak FLOP/s per device x devices); FLOPs per token come
from `cprec.model.flops.flops_per_token`. The peak comes from ``CPREC_PEAK_FLOPS`` when set, from a
table of bf16 dense peaks for known GPUs, and otherwise is measured: a large bf16 matmul timed on
this machine (CPU runs).
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per device.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def measure_matmul_flops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of repeated ``n x n`` matmuls in ``dtype`` on the default device (CPU here)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2.0 * n**3 * iters / elapsed


def peak_flops(measure_seconds: float = 0.5) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    env = os.environ.get("CPREC_PEAK_FLOPS")
    if env:
        return float(env), "env CPREC_PEAK_FLOPS"
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu":
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value, f"table ({name})"
        log.warning("no bf16 peak known for %s; set CPREC_PEAK_FLOPS for a correct MFU", name)
        return 100e12, f"guess ({name})"
    return measure_matmul_flops(seconds=measure_seconds), "measured bf16 matmul"


def mfu(tokens_per_s: float, flops_per_tok: float, peak_per_device: float, devices: int) -> float:
    """Achieved over available FLOP/s."""
    return tokens_per_s * flops_per_tok / (peak_per_device * max(devices, 1))
