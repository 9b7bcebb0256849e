"""Pre-training throughput: CPRec (packed rows + DeepSpeed) against a plain HF `Trainer` with padding.

Both sides train the same model config on the same prepared shards, one after the other in this run:

- **cprec**: ``cprec train`` (DeepSpeed ZeRO stage of the config, bf16, packed rows with per-document
  attention, no padding inside rows), launched as a subprocess on ``--nproc`` CPU ranks. Throughput
  comes from the run's ``metrics.jsonl`` (non-pad tokens and wall time per optimizer step).
- **hf_trainer**: ``transformers.Trainer`` (bf16 autocast, AdamW, same LR/clipping) on the same
  documents, one document per row, each batch padded to its longest document (the usual dynamic
  padding); batch size chosen so a step holds about as many real tokens as a CPRec step.

The first ``--warmup`` steps of each side are not timed. Tokens/s counts non-pad tokens only.
MFU = tokens/s x training FLOPs per token / peak, with the peak measured here as the FLOP/s of a
large bf16 matmul on this machine (``--peak-flops`` to give one instead).

    python benchmarks/train.py --out benchmarks/results/train.json
    python benchmarks/train.py --config configs/demo_ml1m.yaml    # on the ML-1M demo shards
    # On a GPU, without data: synthetic shards of the model's vocabulary, no HF baseline, MFU
    # against the chip's bf16 peak (cprec.train.mfu.GPU_PEAKS).
    python benchmarks/train.py --device cuda --synthetic-vocab 151936 --seq-len 4096 --micro-batch 4 \
        --no-baseline model.arch=qwen2 model.hidden_size=896 ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.train")


def load_cfg(args):
    from cprec.config import load_config

    overrides = [
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
        f"train.zero_stage={args.zero_stage}",
        "tracking.backend=none",
    ]
    if args.prepared:
        overrides.append(f"data.output_dir={args.prepared}")
    return load_config(REPO / args.config, overrides + args.overrides), overrides


# ----------------------------------------------------------------------------------- cprec
def run_cprec(args, overrides: list[str], work: Path) -> dict:
    out = work / "cprec_run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    if args.device == "cuda":
        env.pop("DS_ACCELERATOR")
    if args.nproc > 1 and args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.nproc}",
            "--standalone",
        ]
    else:
        launcher = [sys.executable]
    cmd = [*launcher, "-m", "cprec.cli", "--log-level", "WARNING", "train", str(REPO / args.config)]
    cmd += [*overrides, f"train.output_dir={out}", *args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cprec train failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    t0, t1 = rows[args.warmup - 1], rows[-1]
    tokens = t1["tokens"] - t0["tokens"]
    seconds = t1["time"] - t0["time"]
    capacity = (len(rows) - args.warmup) * args.nproc * args.micro_batch * args.seq_len
    return {
        "timed_steps": len(rows) - args.warmup,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "non_pad_fraction": tokens / capacity,
        "tokens_per_step": tokens / (len(rows) - args.warmup),
        "final_loss": t1["loss"],
        "ranks": args.nproc,
        "process_wall_s": wall,
    }


# ------------------------------------------------------------------------------- HF Trainer
def read_documents(prepared: Path, max_docs: int, seq_len: int) -> list[list[int]]:
    """Documents (token ids) of the shards in manifest order, cut to ``seq_len``."""
    from cprec.stream.tars import decode_ids, iter_tar_samples

    manifest = json.loads((prepared / "manifest.json").read_text())
    docs: list[list[int]] = []
    for shard in manifest["shards"]:
        for key, sample in iter_tar_samples(str(prepared / shard["path"])):
            docs.append(decode_ids(sample["ids.npy"], key).tolist()[:seq_len])
            if len(docs) >= max_docs:
                return docs
    return docs


def run_hf(args, work: Path, tokens_per_step: float) -> dict:
    """The baseline, in this process: returns throughput of the timed steps."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cprec.model.build import build_model

    cfg, _ = load_cfg(args)
    prepared = Path(cfg.data.output_dir)
    tok = json.loads((prepared / "manifest.json").read_text())["tokenizer"]
    steps = args.warmup + args.steps
    sample = read_documents(prepared, 4000, args.seq_len)
    mean_len = sum(map(len, sample)) / len(sample)
    batch = max(1, round(tokens_per_step / mean_len))
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

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

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
    padded = sum(counts[args.warmup : steps]) / sum(
        batch * max(map(len, docs[i * batch : (i + 1) * batch])) for i in range(args.warmup, steps)
    )
    return {
        "timed_steps": args.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "non_pad_fraction": padded,
        "tokens_per_step": tokens / args.steps,
        "docs_per_batch": batch,
        "mean_doc_tokens": mean_len,
    }


# ------------------------------------------------------------------------------------- main
def model_flops(cfg, vocab: int, seq_len: int) -> tuple[int, float]:
    from cprec.model.build import meta_model
    from cprec.model.flops import count_params, flops_per_token

    model = meta_model(cfg.model, vocab)  # shapes only: a 0.5B model costs no memory here
    n = count_params(model, exclude_input_embeddings=True)
    shape = model.config if cfg.model.name_or_path else cfg.model
    return count_params(model), flops_per_token(shape, n, seq_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="configs/food_kitchen_stable.yaml", help="config (relative to the repo)"
    )
    p.add_argument("--prepared", default="", help="prepared folder (default: the config's data.output_dir)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4, help="packed rows per rank and step (cprec)")
    p.add_argument("--nproc", type=int, default=1, help="cprec ranks (CPU processes)")
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device (0 = measure)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank")
    p.add_argument("--no-baseline", action="store_true", help="skip the HF Trainer baseline")
    p.add_argument(
        "--synthetic-vocab", type=int, default=0, help="train on synthetic shards of this vocabulary"
    )
    p.add_argument("--synthetic-dir", default="", help="where the synthetic shards go (kept for reuse)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    p.add_argument("--part", choices=["hf"], help=argparse.SUPPRESS)  # internal: run one side only
    p.add_argument("--tokens-per-step", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for both sides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's time includes start-up)")

    with tempfile.TemporaryDirectory(prefix="cprec-bench-train-") as tmp:
        work = Path(tmp)
        if args.part == "hf":  # a clean process for the baseline (no DeepSpeed/process-group state)
            print(json.dumps(run_hf(args, work, args.tokens_per_step)))
            return 0
        if args.synthetic_vocab:
            from synthetic import write_synthetic_prepared

            root = Path(args.synthetic_dir or work / "synthetic") / f"vocab{args.synthetic_vocab}"
            args.prepared = str(write_synthetic_prepared(root, args.synthetic_vocab))
        cfg, overrides = load_cfg(args)
        prepared = Path(cfg.data.output_dir)
        if not (prepared / "manifest.json").is_file():
            log.error("no prepared shards at %s: run `cprec prepare %s` first", prepared, args.config)
            return 2
        from cprec.train.mfu import measure_matmul_flops, peak_flops

        peak, peak_source = args.peak_flops, "given"
        if not peak and args.device == "cuda":
            os.environ.pop("DS_ACCELERATOR", None)
            peak, peak_source = peak_flops()  # the chip's dense bf16 peak from the table
        elif not peak:
            peak, peak_source = measure_matmul_flops(seconds=3.0), "measured: 2048x2048 bf16 matmul, 3 s"
        log.info("peak %.3g FLOP/s (%s)", peak, peak_source)
        vocab = json.loads((prepared / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        n_params, fpt = model_flops(cfg, vocab, args.seq_len)

        log.info("cprec: %d+%d steps on %d rank(s)", args.warmup, args.steps, args.nproc)
        ours = run_cprec(args, overrides, work)
        log.info("cprec: %.0f tokens/s", ours["tokens_per_s"])
        hf = None
        if not args.no_baseline:
            cmd = [sys.executable, __file__, "--part", "hf", f"--tokens-per-step={ours['tokens_per_step']}"]
            cmd += [f"--config={args.config}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
            cmd += [
                f"--seq-len={args.seq_len}",
                f"--micro-batch={args.micro_batch}",
                f"--prepared={args.prepared}",
            ]
            cmd += args.overrides
            log.info("hf_trainer: %d+%d steps", args.warmup, args.steps)
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"HF Trainer baseline failed:\n{proc.stderr[-4000:]}")
            hf = json.loads(proc.stdout.strip().splitlines()[-1])
            log.info("hf_trainer: %.0f tokens/s", hf["tokens_per_s"])

    devices = args.nproc
    ours["mfu"] = ours["tokens_per_s"] * fpt / (peak * devices)
    if hf is not None:
        hf["mfu"] = hf["tokens_per_s"] * fpt / peak
    result = {
        "benchmark": "train",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "data": {"prepared": str(prepared), "config": args.config},
        "model": {
            "config": {
                k: getattr(cfg.model, k) for k in ("arch", "hidden_size", "num_layers", "num_heads", "dtype")
            },
            "params": n_params,
            "vocab": vocab,
            "train_flops_per_token": fpt,
        },
        "settings": {
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "zero_stage": args.zero_stage,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "device": args.device,
            "overrides": args.overrides,
        },
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "cprec": ours,
        "hf_trainer": hf,
        "speedup_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"] if hf else None,
        "goal_speedup": 1.3,
        "note": "2-core machine shared with other jobs: timings are noisy"
        if args.device == "cpu"
        else f"{args.nproc} GPU(s)",
    }
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
