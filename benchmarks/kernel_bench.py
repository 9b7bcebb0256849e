"""Kernel benchmark: packed attention backends vs the reference, chunked vs full-logits cross-entropy.

Attention: forward + backward time of each backend (``reference`` = the explicit masked softmax,
the baseline; ``sdpa``, ``loop``, ``auto``, and ``flash`` on a CUDA machine with flash-attn) on
packed rows, plus each backend's largest deviation from the reference output.

Cross-entropy: forward + backward time and peak extra host memory of ``reference`` (full
``[N, V]`` logits + F.cross_entropy) vs ``chunked`` for N tokens and V vocabulary entries. Each
variant runs in a fresh process and reports its peak resident memory (``ru_maxrss``) above the
level reached after allocating the inputs, so the numbers do not mask each other.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from cprec_kernels import choose_attention_backend, flash_available, packed_attention
from cprec_kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference
from cprec_kernels.segments import random_bounds, segment_lengths

log = logging.getLogger("benchmarks.kernel_bench")

# (name, rows, row length, min doc, max doc)
SCENARIOS = [
    ("2048-row, 100-300-token docs", 1, 2048, 100, 300),
    ("4x512-row, 20-60-token docs", 4, 512, 20, 60),
]


def time_attention(backend, q, k, v, cu, max_seqlen, bounds, grad_out, reps):
    times, out = [], None
    for i in range(reps + 1):  # first run is a warm-up
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        start = time.perf_counter()
        out = packed_attention(qq, kk, vv, cu, max_seqlen, backend=backend, bounds=bounds)
        out.backward(grad_out)
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach()


def bench_attention(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ["reference", "sdpa", "loop", "auto"] + (
        ["flash"] if device == "cuda" and flash_available() else []
    )
    rows = []
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        for name, b, n, lo, hi in SCENARIOS:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(b, args.heads, n, args.head_dim, generator=g).to(device, dtype)
            k = torch.randn(b, args.kv_heads, n, args.head_dim, generator=g).to(device, dtype)
            v = torch.randn(b, args.kv_heads, n, args.head_dim, generator=g).to(device, dtype)
            grad_out = torch.randn(b, n, args.heads, args.head_dim, generator=g).to(device, dtype)
            bounds = random_bounds(b, n, lo, hi)
            cu = torch.tensor(bounds, dtype=torch.int32, device=device)
            max_seqlen = max(segment_lengths(bounds))
            auto = choose_attention_backend("auto", device, segment_lengths(bounds), b, n)[0]
            ref_time, ref_out = None, None
            for backend in backends:
                if flash_needs_half(backend, dtype):
                    continue
                sec, out = time_attention(backend, q, k, v, cu, max_seqlen, bounds, grad_out, args.reps)
                if backend == "reference":
                    ref_time, ref_out = sec, out.float()
                row = {
                    "scenario": name,
                    "dtype": dtype_name,
                    "device": device,
                    "segments": len(bounds) - 1,
                    "backend": backend if backend != "auto" else f"auto->{auto}",
                    "fwd_bwd_ms": round(sec * 1e3, 2),
                    "speedup_vs_reference": round(ref_time / sec, 2),
                    "max_abs_diff_vs_reference": float((out.float() - ref_out).abs().max()),
                }
                rows.append(row)
                log.info("attention %s", row)
    return rows


def flash_needs_half(backend: str, dtype: torch.dtype) -> bool:
    return backend == "flash" and dtype == torch.float32


class RssPeak:
    """Samples this process's resident memory every millisecond; ``peak_extra_mib`` above the start.

    Host tensors bypass Python's allocators (so tracemalloc cannot see them) and the process-wide
    ``ru_maxrss`` includes the import of torch, so the current RSS is sampled instead (Linux).
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.page = resource.getpagesize()
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _ce_child(variant: str, n: int, vocab: int, hidden: int, chunk: int, threads: int) -> dict:
    """Runs in a fresh process: one forward + backward of one loss variant."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::17] = -100
    # Gradient buffers exist in any training step; allocate them up front so they are not counted.
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    with RssPeak() as mem:
        start = time.perf_counter()
        if variant == "reference":
            loss = cross_entropy_reference(h, w, labels)
        else:
            loss = chunked_cross_entropy(h, w, labels, chunk)
        loss.backward()
        sec = time.perf_counter() - start
    return {
        "variant": variant,
        "fwd_bwd_s": round(sec, 3),
        "peak_extra_mib": round(mem.peak_extra_mib, 1),
        "loss": float(loss),
        "grad_hidden_sum_abs": float(h.grad.abs().sum()),
        "grad_weight_sum_abs": float(w.grad.abs().sum()),
    }


def bench_cross_entropy(args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for variant in ("reference", "chunked"):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            fut = pool.submit(
                _ce_child, variant, args.ce_tokens, args.ce_vocab, args.ce_hidden, args.ce_chunk, args.threads
            )
            results[variant] = fut.result()
        log.info("cross-entropy %s", results[variant])
    ref, chk = results["reference"], results["chunked"]
    return {
        "tokens": args.ce_tokens,
        "vocab": args.ce_vocab,
        "hidden": args.ce_hidden,
        "chunk": args.ce_chunk,
        "dtype": "fp32",
        "full_logits_mib": round(args.ce_tokens * args.ce_vocab * 4 / 2**20, 1),
        "reference": ref,
        "chunked": chk,
        "memory_ratio_reference_over_chunked": round(
            ref["peak_extra_mib"] / max(chk["peak_extra_mib"], 1.0), 1
        ),
        "time_ratio_chunked_over_reference": round(chk["fwd_bwd_s"] / ref["fwd_bwd_s"], 2),
        "loss_abs_diff": abs(ref["loss"] - chk["loss"]),
        "grad_hidden_rel_diff": abs(ref["grad_hidden_sum_abs"] - chk["grad_hidden_sum_abs"])
        / ref["grad_hidden_sum_abs"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--ce-tokens", type=int, default=8192)
    p.add_argument("--ce-vocab", type=int, default=32000)
    p.add_argument("--ce-hidden", type=int, default=256)
    p.add_argument("--ce-chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-ce", action="store_true", help="attention only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.time()
    report = {
        "benchmark": "kernels",
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "flash_attn": flash_available(),
        },
        "attention_shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        "attention": bench_attention(args),
        "cross_entropy": None if args.skip_ce else bench_cross_entropy(args),
    }
    report["wall_s"] = round(time.time() - started, 1)
    report["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
