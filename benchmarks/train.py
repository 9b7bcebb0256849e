"""Pre-training throughput, measured fairly: CPRec against a padded HF `Trainer` and a plain packed loop.

Three sides train the same model on the same prepared shards, each in its own process:

- **cprec**: ``cprec train`` (DeepSpeed, the config's ZeRO stage unless ``--zero-stage``, bf16,
  packed rows with per-document attention), on ``--nproc`` CPU ranks. Throughput comes from the
  run's ``metrics.jsonl`` (non-pad tokens and wall time per optimizer step), and so does the step
  breakdown (forward, backward, optimizer, loader, communication: `cprec.train.steptime`).
- **hf_trainer**: ``transformers.Trainer`` (bf16 autocast, AdamW, same LR/clipping) on the same
  documents, one document per row, each batch padded to its longest document (the usual dynamic
  padding); batch size chosen so a step holds about as many real tokens as a CPRec step.
- **plain**: a plain packed PyTorch loop without DeepSpeed (`benchmarks/plain_loop.py`), as one
  writes it by hand (issue 16): greedy packing into ``--seq-len`` rows, one SDPA call per layer with
  a block-diagonal causal mask, the loss from full logits, ``torch.optim.AdamW``.
- **plain_kernels**: the same loop with CPRec's kernels (`cprec_kernels` dispatcher: per-document
  attention, chunked loss). The gap between it and cprec is the engine's own overhead; the gap
  between it and plain is what the kernels are worth.

Fairness: every side runs pinned to the same cores (``taskset -c --cores``) with the same thread
count, set three ways (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` in the
child itself); each child reports the affinity and thread count it actually ran with, and they are
recorded in the JSON. Sides are interleaved (``--repeats`` rounds, the order rotated every round)
so a load change on the machine hits all sides alike; each side reports the median tokens/s and
its spread (min, max, (max - min) / median). The first ``--warmup`` steps of each run are not
timed. Tokens/s counts non-pad tokens only. MFU = tokens/s x training FLOPs per token / peak, the
peak measured in this process (pinned like the children) as the FLOP/s of a large bf16 matmul.

Models (``--models``, comma-separated):

- ``7m``: the 7.3M-parameter Llama of ``configs/model/small.yaml`` on food-kitchen (8k sentencepiece);
- ``smollm2-135m``: the SmolLM2-135M base (`cprec.model.bases`) on ML-1M prepared with its tokenizer;
- ``qwen2-0.5b-shape``: a from-scratch decoder of Qwen2-0.5B's shape (896 wide, 24 layers, 14 heads,
  2 KV heads, 4864 MLP, tied embeddings) on the same ML-1M shards (49k vocabulary, not Qwen's 152k).

A missing prepared folder is prepared first (``cprec prepare``, pinned the same way). Results go to
``benchmarks/results/train.json``, one entry per model (``speedup`` = CPRec / HF Trainer tokens/s);
``--merge`` keeps the entries of models not run this time. The README table between the
``train-table`` markers is regenerated from that JSON.

    taskset -c 0 python benchmarks/train.py --models 7m --repeats 3 --cores 0 --threads 1
    python benchmarks/train.py --models smollm2-135m --steps 6 --warmup 2 --merge   # a quiet machine
    # On a GPU, without data: synthetic shards of the model's vocabulary (benchmarks/synthetic.py),
    # CPRec alone, MFU against the chip's dense bf16 peak (cprec.train.mfu.GPU_PEAKS).
    python benchmarks/train.py --device cuda --synthetic-vocab 151936 --seq-len 4096 --micro-batch 4 \
        --no-baseline --no-readme model.arch=qwen2 model.hidden_size=896 ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # children are started as scripts: `benchmarks.*` and `cprec` importable
log = logging.getLogger("benchmarks.train")

SIDES = ("cprec", "hf_trainer", "plain", "plain_kernels")
# The hand-written loop's kernels: a block-diagonal SDPA mask, full logits, transformers' own
# norms and MLPs.
HANDWRITTEN_KERNELS = [
    "model.attn_backend=sdpa",
    "model.ce_backend=reference",
    "model.norm_backend=eager",
    "model.mlp_backend=eager",
]
# With --nproc > 1: `cprec train` on one rank (the first of --cores), interleaved with the N-rank
# side, for the scaling ratio of the same run (``scaling_vs_1_rank``).
ONE_RANK = "cprec_1rank"
README_MARKERS = ("<!-- train-table:start -->", "<!-- train-table:end -->")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its config, prepared shards and extra overrides."""

    name: str
    description: str
    config: str
    prepared: str
    overrides: list[str] = field(default_factory=list)


ML1M_SMOLLM2 = ["model.name_or_path=smollm2-135m", "data.tokenizer.path=smollm2-135m"]
MODELS = {
    "7m": ModelSpec(
        "7m",
        "7.3M-parameter Llama (configs/model/small.yaml), food-kitchen, 8k sentencepiece vocabulary",
        "configs/food_kitchen_stable.yaml",
        "out/prepared/food_kitchen",
    ),
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "SmolLM2-135M base (134.5M parameters, 49k vocabulary, tied embeddings), ML-1M genre domains",
        "configs/demo_ml1m.yaml",
        "out/prepared/ml1m_smollm2",
        ML1M_SMOLLM2,
    ),
    # --synthetic-vocab: shards of benchmarks/synthetic.py, the model shape from the overrides.
    "synthetic": ModelSpec(
        "synthetic",
        "the overrides' model shape on synthetic shards of its vocabulary (benchmarks/synthetic.py)",
        "configs/food_kitchen_stable.yaml",
        "",
    ),
    "qwen2-0.5b-shape": ModelSpec(
        "qwen2-0.5b-shape",
        "from-scratch Qwen2-0.5B shape (896 x 24 layers, 14/2 heads, 4864 MLP, tied), ML-1M, 49k vocabulary",
        "configs/demo_ml1m.yaml",
        "out/prepared/ml1m_smollm2",
        [
            "data.tokenizer.path=smollm2-135m",
            "model.name_or_path=",
            "model.arch=qwen2",
            "model.hidden_size=896",
            "model.num_layers=24",
            "model.num_heads=14",
            "model.num_kv_heads=2",
            "model.intermediate_size=4864",
            "model.tie_word_embeddings=true",
            "model.rope_theta=1000000.0",
        ],
    ),
}


# ------------------------------------------------------------------------------- shared pieces
def train_overrides(args) -> list[str]:
    """The overrides every side's config gets (geometry, length, no checkpoints or tracking)."""
    out = [
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum=1",
        "train.global_batch_size=0",
        f"train.max_steps={args.warmup + args.steps}",
        "train.max_tokens=0",
        "train.phase=stable",
        "train.init_from=",
        "train.checkpoint.every_steps=0",
        "train.log_every=1000000",
        "tracking.backend=none",
    ]
    if args.zero_stage is not None:
        out.append(f"train.zero_stage={args.zero_stage}")
    return out


def spec_prepared(spec: ModelSpec, args) -> Path:
    """The model's prepared folder: its own, or the synthetic one ``--synthetic-vocab`` wrote."""
    return Path(args.prepared) if spec.name == "synthetic" else REPO / spec.prepared


def model_overrides(spec: ModelSpec, args) -> list[str]:
    return [*spec.overrides, f"data.output_dir={spec_prepared(spec, args)}", *args.overrides]


def load_cfg(spec: ModelSpec, args, resolve: bool = True):
    from cprec.config import load_config

    cfg = load_config(REPO / spec.config, train_overrides(args) + model_overrides(spec, args))
    if resolve:
        from cprec.model.bases import resolve_config

        cfg = resolve_config(cfg)  # a named base -> its converted HF folder
    return cfg


def iter_documents(prepared: Path, seq_len: int):
    """Documents (token ids) of the shards in manifest order, cut to ``seq_len``."""
    from cprec.stream.tars import decode_ids, iter_tar_samples

    manifest = json.loads((prepared / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for key, sample in iter_tar_samples(str(prepared / shard["path"])):
            yield decode_ids(sample["ids.npy"], key).tolist()[:seq_len]


def read_documents(prepared: Path, max_docs: int, seq_len: int) -> list[list[int]]:
    """The first ``max_docs`` documents (`iter_documents`)."""
    docs: list[list[int]] = []
    for doc in iter_documents(prepared, seq_len):
        if len(docs) >= max_docs:
            break
        docs.append(doc)
    return docs


def pin_self(cores: str, threads: int) -> dict:
    """Pin this process to ``cores`` with ``threads`` intra-op threads; what it now runs with."""
    import torch

    os.sched_setaffinity(0, parse_cores(cores))
    torch.set_num_threads(threads)
    return {
        "affinity": sorted(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def parse_cores(cores: str) -> set[int]:
    out: set[int] = set()
    for part in cores.split(","):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
        "runs": values,
    }


# ------------------------------------------------------------------------------- the children
def child_cprec(args, work: Path) -> dict:
    """``cprec train`` in this process (every rank under torchrun); rank 0 returns the throughput."""
    from cprec import cli

    spec = MODELS[args.model]
    out = work / "cprec_run"
    argv = ["--log-level", "WARNING", "train", str(REPO / spec.config)]
    argv += train_overrides(args) + model_overrides(spec, args) + json.loads(args.variant_overrides or "[]")
    argv.append(f"train.output_dir={out}")
    rc = cli.main(argv)
    if rc:
        raise RuntimeError(f"cprec train exited with {rc}")
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = rows[args.warmup :]
    t0, t1 = rows[args.warmup - 1], rows[-1]
    tokens, seconds = t1["tokens"] - t0["tokens"], t1["time"] - t0["time"]
    cpu_seconds = t1["cpu_time"] - t0["cpu_time"]  # rank 0's process
    world = int(os.environ.get("WORLD_SIZE", "1"))
    breakdown = {}
    for key in [k for k in timed[0] if k.startswith("time/")]:
        breakdown[key[len("time/") : -len("_s")]] = statistics.median(r[key] for r in timed)
    return {
        "timed_steps": len(timed),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_s": tokens / world / cpu_seconds,  # per rank: rank 0's tokens / its CPU time
        "non_pad_fraction": tokens / (len(timed) * world * args.micro_batch * args.seq_len),
        "tokens_per_step": tokens / len(timed),
        "final_loss": t1["loss"],
        "ranks": world,
        "step_breakdown_s": breakdown,
    }


def child_hf(args, work: Path) -> dict:
    """The padded HF Trainer baseline, in this process."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cprec.model.build import build_model

    cfg = load_cfg(MODELS[args.model], args)
    prepared = Path(cfg.data.output_dir)
    tok = json.loads((prepared / "manifest.json").read_text())["tokenizer"]
    steps = args.warmup + args.steps
    sample = read_documents(prepared, 4000, args.seq_len)
    mean_len = sum(map(len, sample)) / len(sample)
    batch = max(1, round(args.micro_batch * args.seq_len / mean_len))
    docs = read_documents(prepared, batch * steps, args.seq_len)
    if len(docs) < batch * steps:
        raise ValueError(f"{prepared} has only {len(docs)} documents, the baseline needs {batch * steps}")
    pad = int(tok["pad_id"])
    counts: list[int] = []

    def collate(rows: list[list[int]]) -> dict:
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        counts.append(int(mask.sum()))
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())
            cpu.append(time.process_time())

    model = build_model(cfg.model, int(tok["vocab_size"]), pad_token_id=pad, seed=cfg.train.seed)
    model.set_attn_implementation("sdpa")
    targs = TrainingArguments(
        output_dir=str(work / "hf_run"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        adam_beta1=cfg.train.betas[0],
        adam_beta2=cfg.train.betas[1],
        max_grad_norm=cfg.train.grad_clip,
        lr_scheduler_type="constant",
        bf16=cfg.model.dtype == "bf16",
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_steps=10**9,
        dataloader_num_workers=0,
        seed=cfg.train.seed,
        disable_tqdm=True,
    )
    Trainer(model=model, args=targs, train_dataset=docs, data_collator=collate, callbacks=[Clock()]).train()
    # The collator runs once per step (no accumulation); step i used counts[i].
    tokens = sum(counts[args.warmup : steps])
    seconds = times[steps - 1] - times[args.warmup - 1]
    cpu_seconds = cpu[steps - 1] - cpu[args.warmup - 1]
    capacity = sum(
        batch * max(map(len, docs[i * batch : (i + 1) * batch])) for i in range(args.warmup, steps)
    )
    return {
        "timed_steps": args.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "non_pad_fraction": tokens / capacity,
        "tokens_per_step": tokens / args.steps,
        "docs_per_batch": batch,
        "mean_doc_tokens": mean_len,
    }


def child_plain(args, work: Path, kernels: bool = False) -> dict:
    """The plain loop: hand-written kernels, or CPRec's with ``kernels``."""
    from benchmarks.plain_loop import train_plain

    spec = MODELS[args.model]
    if not kernels:
        overrides = [*spec.overrides, *HANDWRITTEN_KERNELS]
        spec = ModelSpec(spec.name, spec.description, spec.config, spec.prepared, overrides)
    cfg = load_cfg(spec, args)
    prepared = Path(cfg.data.output_dir)
    tok = json.loads((prepared / "manifest.json").read_text())["tokenizer"]
    need = (args.warmup + args.steps) * args.micro_batch * args.seq_len
    docs, n = [], 0
    for d in iter_documents(prepared, args.seq_len):  # enough tokens for every step's rows
        docs.append(d)
        n += len(d)
        if n > need + args.seq_len:
            break
    return train_plain(
        cfg, int(tok["vocab_size"]), int(tok["pad_id"]), docs, args.steps, args.warmup, args.micro_batch
    )


CHILDREN = {
    "cprec": child_cprec,
    "hf_trainer": child_hf,
    "plain": child_plain,
    "plain_kernels": lambda args, work: child_plain(args, work, kernels=True),
}


def run_child(args) -> int:
    """``--part SIDE``: pin, run one side, write its JSON (plus how it was pinned) to ``--result``.

    A torchrun rank keeps the affinity of the launcher's ``taskset`` and only sets its threads."""
    import torch

    if args.device == "cpu":
        if os.environ.get("LOCAL_RANK") is None:
            pin_self(args.cores, args.threads)
        torch.set_num_threads(args.threads)
    pinned = {
        "affinity": sorted(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The ranks of one run share its output folder (checkpoints are written by all of them);
        # it sits beside the result file, inside the parent's temporary folder, which removes it.
        work = Path(args.result).with_suffix(".work")
        work.mkdir(parents=True, exist_ok=True)
        result = CHILDREN[args.part](args, work)
    else:
        with tempfile.TemporaryDirectory(prefix=f"cprec-bench-{args.part}-") as tmp:
            result = CHILDREN[args.part](args, Path(tmp))
    if result:
        result["pinning"] = pinned
        Path(args.result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------- the parent
def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """``NAME:key=value;key=value`` -> {NAME: overrides}: extra cprec sides (A/B of one change)."""
    out = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name or "=" not in rest:
            raise ValueError(f"--variant {item!r}: want NAME:key=value[;key=value]")
        out[name] = [o for o in rest.split(";") if o]
    return out


def child_env(args) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    if args.device == "cuda":  # DeepSpeed detects the GPU; the host's threads are not the bottleneck
        env.pop("DS_ACCELERATOR")
    else:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def launch(args, model: str, side: str, work: Path) -> dict:
    """One run of one side in a pinned child process; its result JSON."""
    result = work / f"{model}-{side.replace(':', '_')}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(result.with_suffix(".work"), ignore_errors=True)  # an N-rank run's folder: never resumed
    part, _, variant = side.partition(":")
    cores, nproc = args.cores, args.nproc
    if part == ONE_RANK:
        part, nproc, cores = "cprec", 1, str(min(parse_cores(args.cores)))
    cmd = [sys.executable] if args.device == "cuda" else ["taskset", "-c", cores, sys.executable]
    if part == "cprec" and nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone"]
    cmd += [__file__, f"--part={part}", f"--model={model}", f"--result={result}", f"--cores={cores}"]
    cmd += [f"--threads={args.threads}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    cmd += [f"--seq-len={args.seq_len}", f"--micro-batch={args.micro_batch}", f"--device={args.device}"]
    if args.prepared:
        cmd.append(f"--prepared={args.prepared}")
    if args.zero_stage is not None:
        cmd.append(f"--zero-stage={args.zero_stage}")
    if variant:
        cmd.append(f"--variant-overrides={json.dumps(args.variants[variant])}")
    cmd += ["--", *args.overrides]
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(args), capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{side} on {model} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["process_wall_s"] = time.perf_counter() - start
    out["load_average_1min"] = [load_before, os.getloadavg()[0]]  # how busy the machine was
    return out


def ensure_prepared(spec: ModelSpec, args) -> Path:
    prepared = spec_prepared(spec, args)
    if not (prepared / "manifest.json").is_file():
        log.info("%s: preparing %s (cprec prepare %s)", spec.name, prepared, spec.config)
        cmd = ["taskset", "-c", args.cores, sys.executable, "-m", "cprec.cli", "prepare"]
        cmd += [str(REPO / spec.config), *model_overrides(spec, args)]
        subprocess.run(cmd, cwd=REPO, env=child_env(args), check=True)
    return prepared


def model_facts(spec: ModelSpec, args) -> dict:
    """Parameters, vocabulary and training FLOPs per token of one model (built once, on CPU)."""
    from cprec.model.build import meta_model
    from cprec.model.flops import count_params, flops_per_token

    cfg = load_cfg(spec, args)
    manifest = json.loads((Path(cfg.data.output_dir) / "manifest.json").read_text())
    vocab = int(manifest["tokenizer"]["vocab_size"])
    model = meta_model(cfg.model, vocab)  # shapes only: a 0.5B model costs no memory here
    shape = model.config if cfg.model.name_or_path else cfg.model
    c = model.config
    return {
        "params": count_params(model),
        "vocab": vocab,
        "shape": {
            "hidden_size": c.hidden_size,
            "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads,
            "intermediate_size": c.intermediate_size,
            "tie_word_embeddings": bool(c.tie_word_embeddings),
        },
        "dtype": cfg.model.dtype,
        "zero_stage": cfg.train.zero_stage,
        "train_flops_per_token": flops_per_token(
            shape, count_params(model, exclude_input_embeddings=True), args.seq_len
        ),
    }


def summarize(runs: list[dict], flops_per_token: float, peak: float) -> dict:
    """Median and spread over one side's repeats (wall and CPU-time throughput), MFU of the median."""
    tps = spread([r["tokens_per_s"] for r in runs])
    devices = runs[0].get("ranks", 1)
    out = {
        "tokens_per_s": tps,
        "tokens_per_cpu_s": spread([r["tokens_per_cpu_s"] for r in runs]),
        "mfu": tps["median"] * flops_per_token / (peak * devices),
        "non_pad_fraction": statistics.median(r.get("non_pad_fraction", 1.0) for r in runs),
        "pinning": runs[0]["pinning"],
        "runs": runs,
    }
    if "step_breakdown_s" in runs[0]:
        keys = runs[0]["step_breakdown_s"]
        out["step_breakdown_s"] = {k: statistics.median(r["step_breakdown_s"][k] for r in runs) for k in keys}
    return out


def run_settings(args) -> dict:
    return {
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "nproc": args.nproc,
        "warmup": args.warmup,
        "steps": args.steps,
        "zero_stage_override": args.zero_stage,
        "overrides": args.overrides,
    }


def bench_model(args, name: str, work: Path, peak: float) -> dict:
    spec = MODELS[name]
    ensure_prepared(spec, args)
    facts = model_facts(spec, args)
    sides = list(args.sides) + [f"cprec:{v}" for v in args.variants]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    failed: dict[str, str] = {}
    for rep in range(args.repeats):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # rotate: no side always first
        for side in order:
            log.info("%s: repeat %d/%d, %s", name, rep + 1, args.repeats, side)
            try:
                r = launch(args, name, side, work)
            except RuntimeError as e:
                if ":" not in side:
                    raise
                log.error("%s", e)  # a failing A/B variant is recorded, the others go on
                failed[side] = str(e)[-2000:]
                sides.remove(side)
                continue
            runs[side].append(r)
            log.info(
                "%s %s: %.0f tokens/s, %.0f per CPU-s", name, side, r["tokens_per_s"], r["tokens_per_cpu_s"]
            )
    entry = {"model": name, "ranks": args.nproc, "description": spec.description, "config": spec.config}
    entry["prepared"] = str(spec_prepared(spec, args).relative_to(REPO)) if spec.prepared else args.prepared
    entry["run"] = {  # this entry's own run (entries of earlier runs are kept by --merge)
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": run_settings(args),
        "repeats": args.repeats,
        "pinning": {"cores": args.cores, "threads": args.threads},
        "peak_flops_per_device": peak,
    }
    entry["overrides"] = [o for o in model_overrides(spec, args) if not o.startswith("data.output_dir=")]
    entry.update(facts)
    entry["sides"] = {s: summarize(rs, facts["train_flops_per_token"], peak) for s, rs in runs.items() if rs}
    if args.variants:
        entry["variants"] = args.variants
    if failed:
        entry["failed"] = failed
    med = {s: v["tokens_per_s"]["median"] for s, v in entry["sides"].items()}
    cpu = {s: v["tokens_per_cpu_s"]["median"] for s, v in entry["sides"].items()}
    if "cprec" in med and "hf_trainer" in med:
        entry["speedup"] = med["cprec"] / med["hf_trainer"]
        entry["speedup_cpu_time"] = cpu["cprec"] / cpu["hf_trainer"]
        entry["speedup_per_repeat"] = [
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["cprec"], runs["hf_trainer"])
        ]
    if "cprec" in med and ONE_RANK in med:
        entry["scaling_vs_1_rank"] = med["cprec"] / med[ONE_RANK]
    for plain in ("plain", "plain_kernels"):
        if "cprec" in med and plain in med:
            entry[f"speedup_vs_{plain}"] = med["cprec"] / med[plain]
            entry[f"speedup_vs_{plain}_cpu_time"] = cpu["cprec"] / cpu[plain]
    if "cprec" in med:
        for v in args.variants:  # A/B: each variant against the default cprec side
            side = f"cprec:{v}"
            if side not in med:
                continue
            entry.setdefault("variant_ratio", {})[v] = {
                "tokens_per_s": med[side] / med["cprec"],
                "tokens_per_cpu_s": cpu[side] / cpu["cprec"],
            }
    return entry


# ------------------------------------------------------------------------------- README table
QUIET_COMMAND = (
    "taskset -c 0 python benchmarks/train.py --models smollm2-135m,qwen2-0.5b-shape --steps 6 "
    "--warmup 2 --repeats 3 --cores 0 --threads 1 --merge"
)
BREAKDOWN = ("forward", "backward", "optimizer", "loader", "comm")


def _label(entry: dict) -> str:
    """An entry's name in the table: the model, and its ranks when more than one."""
    ranks = entry.get("ranks", 1)
    return entry["model"] + (f" × {ranks} ranks" if ranks > 1 else "")


def _tps(entry: dict, side: str, key: str = "tokens_per_s") -> str:
    s = entry["sides"].get(side)
    if not s:
        return "—"
    t = s[key]
    return f"{t['median']:,.0f} [{t['min']:,.0f}, {t['max']:,.0f}]"


def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key]:.2f}×" if key in entry else "—"


def table(results: dict) -> str:
    """The README table (from the JSON): one row per model, then the models not measured yet."""
    lines = [
        "| model | params | CPRec tok/s [min, max] | plain packed loop | plain loop, CPRec kernels | "
        "HF Trainer, padded | CPRec / HF | CPRec / plain | CPRec / plain with its kernels | "
        "per CPU-second: CPRec / HF, / plain | CPRec MFU | CPRec step: " + " / ".join(BREAKDOWN) + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    done = set()
    for e in results["models"]:
        done.add(e["model"])
        label = _label(e)
        ours = e["sides"].get("cprec", {})
        b = ours.get("step_breakdown_s", {})
        step = b.get("step") or 1.0
        parts = " / ".join(f"{100 * b.get(k, 0) / step:.0f}%" for k in BREAKDOWN) + f" of {step:.2f} s"
        mfu = f"{ours['mfu']:.2f}" if ours else "—"
        cpu = f"{_ratio(e, 'speedup_cpu_time')}, {_ratio(e, 'speedup_vs_plain_cpu_time')}"
        lines.append(
            f"| {label} | {e['params'] / 1e6:.1f}M | {_tps(e, 'cprec')} | {_tps(e, 'plain')} | "
            f"{_tps(e, 'plain_kernels')} | {_tps(e, 'hf_trainer')} | {_ratio(e, 'speedup')} | "
            f"{_ratio(e, 'speedup_vs_plain')} | {_ratio(e, 'speedup_vs_plain_kernels')} | {cpu} | "
            f"{mfu} | {parts if b else '—'} |"
        )
    for name in MODELS:
        if name not in done and MODELS[name].prepared:  # not "synthetic": a GPU-check entry
            todo = f"not measured yet: `--models {name} --merge` on a quiet core"
            lines.append(f"| {name} | {todo} |||||||||||")
    lines.append("")
    for e in results["models"]:
        r = e.get("run") or {  # an entry written before entries carried their own run
            "settings": results["settings"],
            "repeats": results["repeats"],
            "pinning": results["pinning"],
            "peak_flops_per_device": results["peak_flops_per_device"],
        }
        s, p = r["settings"], r["pinning"]
        label = _label(e)
        scaling = ""
        if "scaling_vs_1_rank" in e:
            scaling = (
                f" {e['ranks']} ranks (one thread each) reach {e['scaling_vs_1_rank']:.2f}× the tokens/s "
                f"of one rank ({_tps(e, ONE_RANK)}, pinned to one of the cores, interleaved in the same run)."
            )
        lines.append(
            f"- {label}: pinned to cores `{p['cores']}`, {p['threads']} thread(s) per side, "
            f"{r['repeats']} interleaved repeats (median [min, max]), {s['warmup']} warm-up + {s['steps']} "
            f"timed steps of {s['micro_batch']} × {s['seq_len']} tokens, MFU against a "
            f"{r['peak_flops_per_device'] / 1e9:.0f} GFLOP/s bf16 matmul measured pinned in the same run."
            + scaling
        )
    lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def write_readme(md: str, readme: Path = REPO / "README.md") -> None:
    from benchmarks.readme_table import write_between

    write_between(md, README_MARKERS, readme)


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="7m", help=f"comma-separated, of {list(MODELS)}")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {list(SIDES)}")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:key=value[;key=value]: an extra cprec side with these overrides (A/B; repeatable)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per side")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4, help="packed rows per rank and step (cprec, plain)")
    p.add_argument("--nproc", type=int, default=1, help="cprec ranks (CPU processes)")
    p.add_argument("--cores", default="0", help="taskset core list every side runs on (e.g. 0 or 0-1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process, every side")
    p.add_argument("--zero-stage", type=int, default=None, help="override train.zero_stage (cprec)")
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device (0 = measure)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: a GPU per rank, unpinned")
    p.add_argument("--no-baseline", action="store_true", help="CPRec alone (same as --sides cprec)")
    p.add_argument(
        "--synthetic-vocab", type=int, default=0, help="model 'synthetic': shards of this vocabulary size"
    )
    p.add_argument("--synthetic-dir", default="", help="where the synthetic shards go (kept for reuse)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    p.add_argument("--merge", action="store_true", help="keep entries of models not run this time")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--note", default="", help="replaces the default note in the JSON")
    p.add_argument("--part", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, in a child
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--prepared", default="", help=argparse.SUPPRESS)
    p.add_argument("--variant-overrides", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for every side")
    return p


DEFAULT_NOTE = (
    "Measured on a 2-core machine whose core 0 was shared with other jobs while core 1 ran another "
    "benchmark: wall-clock tokens/s are low and noisy; the per-CPU-second ratios (each process's own "
    "CPU time, which other jobs' turns on the core do not inflate) and the ratios between interleaved "
    f"sides are what to read. The 135M and 0.5B rows need a quiet machine: `{QUIET_COMMAND}`."
)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's time includes start-up)")
    if args.part:
        return run_child(args)
    if args.synthetic_vocab:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from synthetic import write_synthetic_prepared

        root = Path(args.synthetic_dir or REPO / "out" / "synthetic") / f"vocab{args.synthetic_vocab}"
        args.prepared = str(write_synthetic_prepared(root, args.synthetic_vocab))
        args.models = "synthetic"
    elif "synthetic" in args.models.split(","):
        p.error("model 'synthetic' needs --synthetic-vocab")
    if args.no_baseline:
        args.sides = "cprec"
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")
    args.sides = [s for s in args.sides.split(",") if s]
    if set(args.sides) - {*SIDES, ONE_RANK}:
        unknown = sorted(set(args.sides) - {*SIDES, ONE_RANK})
        p.error(f"unknown side(s) {unknown}; choose from {[*SIDES, ONE_RANK]}")
    if ONE_RANK in args.sides and args.nproc < 2:
        p.error(f"side {ONE_RANK} is the 1-rank baseline of an --nproc > 1 run")
    try:
        args.variants = parse_variants(args.variant)
    except ValueError as e:
        p.error(str(e))
    from cprec.train.mfu import measure_matmul_flops, peak_flops

    peak, peak_source = args.peak_flops, "given"
    pinned = {}
    if args.device == "cuda" and not peak:
        peak, peak_source = peak_flops()  # the chip's dense bf16 peak from the table
    elif args.device == "cpu":
        pinned = pin_self(args.cores, args.threads)  # the peak is measured like the children run
    if not peak:
        peak, peak_source = measure_matmul_flops(seconds=3.0), "measured: 2048x2048 bf16 matmul, 3 s, pinned"
    log.info("peak %.3g FLOP/s (%s), pinned %s", peak, peak_source, pinned)
    with tempfile.TemporaryDirectory(prefix="cprec-bench-train-") as tmp:
        entries = [bench_model(args, m, Path(tmp), peak) for m in models]
    out = REPO / args.out
    if args.merge and out.is_file():
        old = json.loads(out.read_text()).get("models", [])
        ran = {(e["model"], e.get("ranks", 1)) for e in entries}
        entries = [e for e in old if (e["model"], e.get("ranks", 1)) not in ran] + entries
    result = {
        "benchmark": "train",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "pinning": {"cores": args.cores, "threads": args.threads, "parent": pinned},
        "repeats": args.repeats,
        "settings": run_settings(args),
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "goals": {
            "7m": {"speedup": 2.5},
            "smollm2-135m": {"speedup": 1.5, "speedup_vs_plain": 1.2, "mfu": 0.3},
        },
        "models": entries,
        "note": args.note or DEFAULT_NOTE,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = table(result)
    if not args.no_readme:
        write_readme(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
