"""A/B measurements behind the training-speed choices (`benchmarks/results/train_ab.json`).

Each part times the candidates interleaved on one pinned core with one thread and reports the
median **CPU time** of this thread per call (``time.thread_time``): on a machine shared with other
jobs, wall time also counts their turns on the core, CPU time does not (it still feels their cache
and memory traffic, hence several repeats and medians).

- ``attention``: packed attention fwd+bwd, masked SDPA against the per-document loop (its written-
  out grouped-query kernel and, for comparison, each slice handed to SDPA: 3-D slices get its
  math path, the loop's kernel before, 4-D ones its fused kernel), at the head shapes of the 7M
  model (8 x 32) and SmolLM2-135M (9 query / 3 KV heads x 64), bf16, q/k/v laid out as the model
  makes them (projection, view, transpose), on batches the loader packs from food-kitchen and
  ML-1M and on synthetic ones; fits the cost model of `cprec_kernels.dispatch`.
- ``ce``: the LM loss fwd+bwd at SmolLM2-135M's head (N = 2048 tokens, 576 wide, 49,152 vocabulary):
  chunked with several chunk sizes and with its compiled chunk kernel (``model.ce_backend=compiled``;
  the untimed first round compiles it), the compiled one with its ``[V, H]`` weight-gradient buffers
  allocated afresh per call as before they were kept, and full logits.
- ``adamw``: one AdamW update of 134.5M fp32 parameters (as one flat tensor, ZeRO's layout, and as
  270 tensors): torch's per-op loop, foreach and fused implementations.
- ``norm``: one RMSNorm fwd+bwd at the activations of SmolLM2-135M ([4, 512] x 576) and the 7M
  model (x 256), bf16: transformers' eager norm against `cprec_kernels.rms_norm`'s compiled path,
  plus the compile time (`model.norm_backend`).
- ``swiglu``: the gated MLP's activation ``silu(gate) * up`` fwd+bwd at SmolLM2-135M's MLP
  ([4, 512] x 1536) and the 7M model's (x 704), bf16: eager against `cprec_kernels.swiglu`'s
  compiled path, plus the compile time (`model.mlp_backend`).
- ``compile``: an RMSNorm + MLP block of SmolLM2-135M's shape, eager against ``torch.compile``
  (inductor CPU backend), fwd+bwd, plus the compile time.
- ``zero3_step``: DeepSpeed's ZeRO-3 optimizer step and backward on one rank at SmolLM2-135M's
  shape (bf16, 134.5M parameters, from scratch: the step's cost depends on the shapes, not the
  values), ``train.zero3_step=lean`` (`cprec.runtime.zero3_step`) against DeepSpeed's step as
  shipped, two engines side by side taking the same 1 x 64-token batches (so the per-parameter
  work, not the matmuls, is what the backward time shows).

The end-to-end A/Bs of the training engine (ZeRO stage, fused AdamW, attention backend) run through
``benchmarks/train.py --variant`` and are merged here with ``--engine-json``.

    taskset -c 0 python benchmarks/train_ab.py --parts attention,ce,adamw,norm,swiglu,compile
    python benchmarks/train_ab.py --parts none --engine-json out/ab7m.json   # merge an engine A/B
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
log = logging.getLogger("benchmarks.train_ab")

HEAD_SHAPES = {"7m": (8, 8, 32), "smollm2-135m": (9, 3, 64)}  # query heads, KV heads, head dim
PREPARED = {"food-kitchen": ("configs/food_kitchen_stable.yaml", "out/prepared/food_kitchen"),
            "ml1m": ("configs/demo_ml1m.yaml", "out/prepared/ml1m_smollm2")}  # fmt: skip


def median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 2)


# ----------------------------------------------------------------------------------- attention
def loader_bounds(name: str, batches: int, seq_len: int = 512, rows: int = 4) -> list[list[int]]:
    """``cu_seqlens`` of the first packed batches the training loader makes from a prepared folder."""
    from cprec.config import load_config
    from cprec.stream.loader import build_loader
    from cprec.stream.settings import loader_settings

    config, folder = PREPARED[name]
    overrides = [f"data.output_dir={REPO / folder}", f"train.seq_len={seq_len}"]
    overrides += [f"train.micro_batch_size={rows}", "model.name_or_path=", "data.tokenizer.path="]
    cfg = load_config(REPO / config, overrides)
    loader = build_loader(loader_settings(cfg, seed=cfg.train.seed), 0, 1)
    it = iter(loader)
    out = [next(it)["cu_seqlens"].tolist() for _ in range(batches)]
    loader.close()
    return out


def loop_sdpa(q, k, v, bounds, four_d: bool = False):
    """The per-document loop with each slice handed to SDPA, for comparison only: 3-D slices get
    its math path (the loop's kernel before `cprec_kernels.loop.document_attention`), 4-D slices
    its fused flash kernel."""
    b, h, n, d = q.shape
    pieces = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        row, lo = divmod(s, n)
        sl = (slice(row, row + 1) if four_d else row, slice(None), slice(lo, lo + e - s))
        out = F.scaled_dot_product_attention(q[sl], k[sl], v[sl], is_causal=True, enable_gqa=k.shape[1] != h)
        pieces.append((out[0] if four_d else out).transpose(0, 1))
    return torch.cat(pieces, 0).view(b, n, h, d)


def bench_attention(args) -> list[dict]:
    from cprec_kernels import choose_attention_backend, packed_attention
    from cprec_kernels.segments import random_bounds, segment_lengths

    sets = {
        "food-kitchen 4x512": loader_bounds("food-kitchen", 3),
        "ml1m 4x512": loader_bounds("ml1m", 3),
        "synthetic 4x512, 20-60-token docs": [random_bounds(4, 512, 20, 60, s) for s in range(3)],
        "synthetic 4x512, 8-24-token docs": [random_bounds(4, 512, 8, 24, s) for s in range(3)],
        "synthetic 1x2048, 100-300-token docs": [random_bounds(1, 2048, 100, 300, s) for s in range(3)],
        "one document per 512-token row": [[0, 512, 1024, 1536, 2048]] * 3,
    }
    variants = ("sdpa", "loop", "loop_sdpa_math", "loop_sdpa_4d")
    rows = []
    for shape, (h, kv, d) in HEAD_SHAPES.items():
        for set_name, batches in sets.items():
            n = 2048 if "2048" in set_name else 512
            b = batches[0][-1] // n
            g = torch.Generator().manual_seed(0)
            xq, xk, xv = (torch.randn(b, n, x * d, generator=g).bfloat16() for x in (h, kv, kv))
            grad = torch.randn(b, n, h, d, generator=g).bfloat16()
            times = {x: [] for x in variants}
            for rep in range(args.repeats + 1):
                for bounds in batches:
                    for var in variants:
                        a, bk, c = (t.clone().requires_grad_() for t in (xq, xk, xv))
                        start = time.thread_time()
                        q = a.view(b, n, h, d).transpose(1, 2)
                        k = bk.view(b, n, kv, d).transpose(1, 2)
                        v = c.view(b, n, kv, d).transpose(1, 2)
                        if var.startswith("loop_sdpa"):
                            out = loop_sdpa(q, k, v, bounds, four_d=var.endswith("4d"))
                        else:
                            cu = torch.tensor(bounds, dtype=torch.int32)
                            out = packed_attention(q, k, v, cu, n, backend=var, bounds=bounds)
                        out.backward(grad)
                        if rep:  # the first round warms up
                            times[var].append(time.thread_time() - start)
            lengths = [segment_lengths(x) for x in batches]
            row = {
                "head_shape": shape,
                "batches": set_name,
                "rows": b,
                "seq_len": n,
                "segments": statistics.mean(map(len, lengths)),
                "sum_doc_len_squared": statistics.mean(sum(x * x for x in ls) for ls in lengths),
                "masked_entries": b * n * n,
                "auto": choose_attention_backend("auto", "cpu", lengths[0], b, n, flash_ok=False)[0],
                **{f"{v}_ms": median_ms(times[v]) for v in variants},
            }
            row["loop_speedup_vs_sdpa"] = round(row["sdpa_ms"] / row["loop_ms"], 3)
            row["loop_speedup_vs_loop_sdpa_math"] = round(row["loop_sdpa_math_ms"] / row["loop_ms"], 3)
            rows.append(row)
            log.info("attention %s", row)
    return rows


# ---------------------------------------------------------------------------------------- loss
FRESH = "compiled 1024, fresh weight-grad buffers"


@contextlib.contextmanager
def _fresh_weight_grad_buffers():
    """The loss as it was before its CPU weight-gradient buffers were kept from call to call: every
    ``[V, H]`` buffer allocated afresh (so the A/B shows what keeping them is worth)."""
    from cprec_kernels import cross_entropy

    kept = cross_entropy._kept_buffer
    cross_entropy._kept_buffer = lambda shape, dtype, device, role: torch.empty(
        shape, dtype=dtype, device=device
    )
    try:
        yield
    finally:
        cross_entropy._kept_buffer = kept


def bench_ce(args) -> list[dict]:
    from cprec_kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference

    n, width, vocab = 2048, 576, 49152
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, width, generator=g) * 0.5).bfloat16()
    weight = (torch.randn(vocab, width, generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=g)
    kinds = ["chunked 256", "chunked 1024", "chunked 4096", "compiled 1024", FRESH, "full logits"]
    times = {k: [] for k in kinds}
    for rep in range(args.repeats + 1):
        for kind in kinds:
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            start = time.thread_time()
            if kind == "full logits":
                loss = cross_entropy_reference(h, w, labels)
            elif kind == FRESH:
                with _fresh_weight_grad_buffers():
                    loss = chunked_cross_entropy(h, w, labels, chunk_size=1024, compiled=True)
            else:
                name, size = kind.split()
                loss = chunked_cross_entropy(h, w, labels, chunk_size=int(size), compiled=name == "compiled")
            loss.backward()
            if rep:
                times[kind].append(time.thread_time() - start)
    rows = [
        {"kernel": k, "tokens": n, "hidden": width, "vocab": vocab, "fwd_bwd_ms": median_ms(v)}
        for k, v in times.items()
    ]
    log.info("ce %s", rows)
    return rows


# --------------------------------------------------------------------------------------- AdamW
def bench_adamw(args) -> list[dict]:
    numel = 134_515_008  # SmolLM2-135M
    rows = []
    for layout in ("one flat tensor (ZeRO)", "270 tensors"):
        times = {}
        for impl in ("per-op loop", "foreach", "fused"):
            sizes = [numel] if layout.startswith("one") else [numel // 270] * 270
            params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
            for p in params:
                p.grad = torch.randn_like(p)
            kw = {"per-op loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[
                impl
            ]
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **kw)
            opt.step()  # allocates the state
            ts = []
            for _ in range(args.repeats):
                start = time.thread_time()
                opt.step()
                ts.append(time.thread_time() - start)
            times[impl] = median_ms(ts)
            del opt, params
        rows.append({"layout": layout, "params": numel, **{f"{k}_ms": v for k, v in times.items()}})
        log.info("adamw %s", rows[-1])
    return rows


# ------------------------------------------------------------------------------------- compile
def bench_compile(args) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mlp = LlamaRMSNorm(576), LlamaMLP(cfg)

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    eager = Block().bfloat16()
    other = Block().bfloat16()
    other.load_state_dict(eager.state_dict())
    x = torch.randn(4, 512, 576).bfloat16()

    def run(m) -> float:
        xx = x.clone().requires_grad_()
        start = time.thread_time()
        m(xx).sum().backward()
        return time.thread_time() - start

    start = time.perf_counter()
    compiled = torch.compile(other)
    run(compiled)
    compile_s = time.perf_counter() - start
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats * 3):
        times["eager"].append(run(eager))
        times["compiled"].append(run(compiled))
    out = {
        "block": "RMSNorm + MLP, 576 -> 1536, [4, 512] tokens, bf16",
        "compile_wall_s": round(compile_s, 1),
    }
    out.update({f"{k}_fwd_bwd_ms": median_ms(v) for k, v in times.items()})
    log.info("compile %s", out)
    return out


# ---------------------------------------------------------------------------------------- norm
def _norm_call_s(norm, x0: torch.Tensor, upstream: torch.Tensor, backend: str) -> float:
    """CPU seconds of one fwd+bwd of ``norm`` (transformers' eager one, or the compiled kernel)."""
    from cprec_kernels import rms_norm

    x = x0.clone().requires_grad_()
    norm.weight.grad = None
    start = time.thread_time()
    if backend == "eager":
        out = norm(x)
    else:
        out = rms_norm(x, norm.weight, norm.variance_epsilon, "compiled")
    out.backward(upstream)
    return time.thread_time() - start


def _eager_against_compiled(call, repeats: int) -> dict:
    """``call(backend)`` -> CPU seconds: the first compiled call's wall time (it compiles), then
    ``repeats * 10`` interleaved calls of each backend: median ms of each and the speed-up."""
    start = time.perf_counter()
    call("compiled")  # compiles: a static kernel, then one dynamic one
    row = {"compile_wall_s": round(time.perf_counter() - start, 1)}
    times = {"eager": [], "compiled": []}
    for _ in range(repeats * 10):
        for backend in times:
            times[backend].append(call(backend))
    row.update({f"{k}_fwd_bwd_ms": median_ms(v) for k, v in times.items()})
    row["speedup"] = round(row["eager_fwd_bwd_ms"] / row["compiled_fwd_bwd_ms"], 2)
    return row


def bench_norm(args) -> list[dict]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rows = []
    for shape, width in (("smollm2-135m", 576), ("7m", 256)):
        norm = LlamaRMSNorm(width, eps=1e-5).bfloat16()
        g = torch.Generator().manual_seed(0)
        x0, up = (torch.randn(4, 512, width, generator=g).bfloat16() for _ in range(2))
        row = {"head_shape": shape, "activations": f"[4, 512, {width}] bf16"}
        row.update(_eager_against_compiled(functools.partial(_norm_call_s, norm, x0, up), args.repeats))
        rows.append(row)
        log.info("norm %s", row)
    return rows


# -------------------------------------------------------------------------------------- swiglu
def _swiglu_call_s(gate0: torch.Tensor, up0: torch.Tensor, upstream: torch.Tensor, backend: str) -> float:
    """CPU seconds of one fwd+bwd of ``silu(gate) * up`` by ``backend``."""
    from cprec_kernels import swiglu

    gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    start = time.thread_time()
    swiglu(gate, up, backend).backward(upstream)
    return time.thread_time() - start


def bench_swiglu(args) -> list[dict]:
    rows = []
    for shape, width in (("smollm2-135m", 1536), ("7m", 704)):
        g = torch.Generator().manual_seed(0)
        gate, up, upstream = (torch.randn(4, 512, width, generator=g).bfloat16() for _ in range(3))
        row = {"mlp_shape": shape, "activations": f"[4, 512, {width}] bf16"}
        row.update(
            _eager_against_compiled(functools.partial(_swiglu_call_s, gate, up, upstream), args.repeats)
        )
        rows.append(row)
        log.info("swiglu %s", row)
    return rows


# ---------------------------------------------------------------------------------- zero3_step
def bench_zero3_step(args) -> dict:
    import socket

    from cprec.config.sections import ModelConfig
    from cprec.model.build import build_model
    from cprec.runtime import engine as eng

    os.environ["DS_ACCELERATOR"] = "cpu"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
    eng.start_distributed()
    shape = ModelConfig(
        hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
        tie_word_embeddings=True,
    )  # fmt: skip
    engines = {}
    for kind in ("lean", "deepspeed"):
        spec = eng.EngineSpec(micro_batch_size=1, zero_stage=3, dtype="bf16", zero3_step=kind)
        engines[kind] = eng.init_engine(
            build_model(shape, 49152, seed=1, zero3=eng.zero3_build_config(spec)), spec
        )
    times = {k: {"backward": [], "optimizer": []} for k in engines}
    gen = torch.Generator().manual_seed(0)
    for i in range(args.repeats + 1):  # the first round allocates: not timed
        ids = torch.randint(0, 49152, (1, 64), generator=gen)
        for kind, engine in engines.items():
            loss = engine(input_ids=ids, labels=ids).loss
            start = time.thread_time()
            engine.backward(loss)
            mid = time.thread_time()
            engine.step()
            if i:
                times[kind]["backward"].append(mid - start)
                times[kind]["optimizer"].append(time.thread_time() - mid)
    out = {k: {f"{part}_ms": median_ms(v) for part, v in t.items()} for k, t in times.items()}
    out["params"] = eng.num_params(engines["deepspeed"])
    out["batch"] = "1 x 64 tokens"
    log.info("zero3_step %s", out)
    return out


PARTS = {
    "attention": bench_attention,
    "ce": bench_ce,
    "adamw": bench_adamw,
    "norm": bench_norm,
    "swiglu": bench_swiglu,
    "compile": bench_compile,
    "zero3_step": bench_zero3_step,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--parts", default="attention,ce,adamw,norm", help=f"comma-separated, of {list(PARTS)} (or none)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine-json", default="", help="a benchmarks/train.py --variant result to merge")
    p.add_argument("--out", default="benchmarks/results/train_ab.json")
    p.add_argument("--note", action="append", default=[], help="PART=TEXT: what a part's numbers say")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    out_path = REPO / args.out
    result = json.loads(out_path.read_text()) if out_path.is_file() else {"benchmark": "train_ab"}
    result["machine"] = {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "threads": 1}
    for part in [x for x in args.parts.split(",") if x and x != "none"]:
        result[part] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metric": "median CPU time of this thread per call (time.thread_time), ms",
            "results": PARTS[part](args),
        }
    if args.engine_json:
        engine = json.loads(Path(args.engine_json).read_text())
        for e in engine["models"]:
            result.setdefault("engine", {})[e["model"]] = {
                "timestamp": engine["timestamp"],
                "metric": "cprec train: tokens per wall second and per CPU-second, medians",
                "settings": engine["settings"],
                "repeats": engine["repeats"],
                "variants": e.get("variants", {}),
                "tokens_per_s": {s: v["tokens_per_s"] for s, v in e["sides"].items()},
                "tokens_per_cpu_s": {s: v["tokens_per_cpu_s"] for s, v in e["sides"].items()},
                "step_breakdown_s": {s: v.get("step_breakdown_s") for s, v in e["sides"].items()},
                "ratio_to_default": e.get("variant_ratio", {}),
                "failed": e.get("failed", {}),
            }
    for note in args.note:
        part, _, text = note.partition("=")
        result.setdefault("notes", {})[part] = text
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
