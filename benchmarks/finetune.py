"""Fine-tuning throughput: training signals (next-item targets) per second, all-position packed vs
pair-wise padded, on the same model and data, in the same run.

- **all_positions** (`cprec.eval.all_positions`, the default ``eval.finetune_objective``): one packed
  forward over each user's sequence scores the state after every item against the next item.
- **pairs** (the old objective, the baseline): one (history -> next item) pair per example, padded.

Both go through the same `FineTuner` (a ZeRO-0 DeepSpeed engine on one process, bf16 autocast where
the CPU has native bf16), the same model folder and prepared folder, the same temperature and
per-step negatives. Each side runs in its own child process pinned to the same core with one thread
(``taskset -c CORE``, ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), the sides interleaved
``--repeats`` times; the first step of each child is not timed. The JSON holds the median and the
spread per side and ``speedup`` = median all-position signals/s over median pair-wise signals/s.

    python benchmarks/finetune.py --out benchmarks/results/finetune.json
    python benchmarks/finetune.py --model DIR --prepared DIR   # e.g. SmolLM2 and ML-1M prepared with it

Default data: ML-1M as genre domains prepared by `configs/demo_ml1m.yaml` with a small
sentencepiece tokenizer, and a ~7M-parameter Llama (`configs/model/small.yaml`) built from scratch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
log = logging.getLogger("benchmarks.finetune")
SETTINGS = ("steps", "repeats", "batch_users", "batch_pairs", "negatives", "max_items")


def child(args) -> dict:
    """One side: ``--steps`` timed fine-tuning steps after one untimed step; prints a JSON line."""
    import torch

    from cprec.config import load_config
    from cprec.eval.all_positions import build_sequences
    from cprec.eval.encode import load_model
    from cprec.eval.finetune import CheckpointPolicy, FineTuner, build_pairs
    from cprec.eval.inputs import load_inputs
    from cprec.eval.run import LLMSide

    torch.set_num_threads(1)
    over = [
        f"data.output_dir={args.prepared}",
        f"eval.output_dir={args.work}/{args.child}",
        f"eval.finetune_objective={args.child}",
        f"eval.finetune_batch_size={args.batch_users if args.child == 'all_positions' else args.batch_pairs}",
        f"eval.finetune_negatives={args.negatives}",
        f"eval.finetune_max_items={args.max_items}",
        f"eval.max_history_items={args.max_items}",
        "eval.finetune_epochs=100",
    ]
    cfg = load_config(None, over)
    inputs = load_inputs(Path(args.prepared), "test")
    side = LLMSide(cfg, Path(args.prepared), inputs)
    model = load_model(args.model, torch.device("cpu"), dtype=torch.float32)
    builder = side.builder(model.config)
    cat = inputs.catalogue
    if args.child == "all_positions":
        examples, _ = build_sequences(
            inputs.train_sequences, cat, builder, None, args.max_items, builder.max_len
        )
    else:
        examples, _ = build_pairs(inputs.train_sequences, cat, None, 1)
    tuner = FineTuner(model, builder, cat, examples, cfg, side.pad_id)
    policy = CheckpointPolicy(Path(args.work) / args.child / "ckpt", {"bench": args.child}, every=0)
    try:
        tuner.train(policy, stop_after=1)  # untimed: first-call costs (kernels, allocator)
        signals0 = tuner.signals
        t = time.perf_counter()
        tuner.train(policy, stop_after=1 + args.steps)
        seconds = time.perf_counter() - t
        signals = tuner.signals - signals0
    finally:
        tuner.close()
    out = {
        "objective": args.child,
        "steps": args.steps,
        "signals": signals,
        "seconds": seconds,
        "signals_per_second": signals / seconds,
        "signals_per_step": signals / args.steps,
        "batch": cfg.eval.finetune_batch_size,
        "loss_last": tuner.losses[-1],
    }
    print("RESULT " + json.dumps(out), flush=True)
    return out


def prepare_default(work: Path) -> tuple[Path, Path]:
    """ML-1M genre domains with a small tokenizer, and a from-scratch ~7M Llama folder."""
    from cprec.config import load_config
    from cprec.model.build import build_model
    from cprec.prepare import pipeline
    from cprec.prepare.tokenize import load_tokenizer, special_ids

    cfg = load_config(
        REPO / "configs" / "demo_ml1m.yaml",
        [
            f"data.output_dir={work / 'prepared'}",
            "data.tokenizer.path=",
            "data.tokenizer.vocab_size=4000",
            "model.name_or_path=",
            "data.num_workers=0",
        ],
    )
    prepared = pipeline.run(cfg)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        small = load_config(REPO / "configs" / "model" / "small.yaml", [])
        tok = load_tokenizer(Path(prepared) / "tokenizer")
        ids = special_ids(tok)
        model = build_model(
            small.model, len(tok), bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"],
            pad_token_id=ids["pad_id"], seed=0,
        )  # fmt: skip
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return Path(prepared), model_dir


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["all_positions", "pairs"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help="HF model folder (default: a from-scratch ~7M Llama)")
    p.add_argument("--prepared", default="", help="prepared folder (default: ML-1M genres, small tokenizer)")
    p.add_argument("--work", default="out/bench/finetune")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-users", type=int, default=8, help="all_positions: users per step")
    p.add_argument("--batch-pairs", type=int, default=8, help="pairs: pairs per step")
    p.add_argument("--negatives", type=int, default=16)
    p.add_argument("--max-items", type=int, default=20)
    p.add_argument("--core", type=int, default=int(os.environ.get("CPREC_BENCH_CORE", "0")))
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        return child(args)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.prepared or not args.model:
        prepared, model = prepare_default(work)
        args.prepared, args.model = args.prepared or str(prepared), args.model or str(model)
    runs: dict[str, list[dict]] = {"all_positions": [], "pairs": []}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    for r in range(args.repeats):
        for side in ("pairs", "all_positions") if r % 2 else ("all_positions", "pairs"):
            cmd = ["taskset", "-c", str(args.core), sys.executable, __file__, "--child", side]
            for k in ("model", "prepared", "work", "steps", "negatives"):
                cmd += [f"--{k}", str(getattr(args, k))]
            cmd += ["--batch-users", str(args.batch_users), "--batch-pairs", str(args.batch_pairs)]
            cmd += ["--max-items", str(args.max_items)]
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(cmd, env={**env, "TMPDIR": tmp}, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"{side} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(line[len("RESULT ") :]))
            log.info("repeat %d %s: %.1f signals/s", r + 1, side, runs[side][-1]["signals_per_second"])

    def summary(xs: list[dict]) -> dict:
        v = [x["signals_per_second"] for x in xs]
        return {
            "signals_per_second_median": statistics.median(v),
            "signals_per_second_min": min(v),
            "signals_per_second_max": max(v),
            "signals_per_step": xs[0]["signals_per_step"],
            "batch": xs[0]["batch"],
            "runs": xs,
        }

    result = {
        "benchmark": "finetune",
        "metric": "training signals (next-item targets) per second",
        "model": args.model,
        "prepared": args.prepared,
        "settings": {
            k: getattr(args, k)
            for k in ("steps", "repeats", "batch_users", "batch_pairs", "negatives", "max_items")
        },  # fmt: skip
        "all_positions": summary(runs["all_positions"]),
        "pairs": summary(runs["pairs"]),
        "machine": {"processor": platform.processor(), "core": args.core, "threads": 1},
    }
    result["speedup"] = (
        result["all_positions"]["signals_per_second_median"] / result["pairs"]["signals_per_second_median"]
    )
    log.info("all-position / pair-wise signals per second: %.1fx", result["speedup"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
