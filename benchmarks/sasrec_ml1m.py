"""SASRec on MovieLens-1M as one domain, against the published sampled-softmax SASRec.

Reference: the SASRec baseline of the HSTU paper, in the generative-recommenders repository
(``configs/ml-1m/sasrec-sampled-softmax-n128-final.gin``): HR@10 0.2853, NDCG@10 0.1603 on ML-1M,
last item of every user held out, full ranking over the catalogue with seen items masked. Their
setting — 50 dims, 2 blocks, 1 head, dropout 0.2, 200 items, sampled softmax with 128 uniform
negatives, L2-normalised user and item embeddings with temperature 0.05, Adam lr 1e-3, batch 128,
101 epochs — is our SASRec's default (``eval.sasrec_*``), with two differences of protocol: we hold
out the second-last item too (the validation target early stopping needs, never trained on; they
train on it), and we stop on validation NDCG@10 instead of running a fixed 101 epochs.

Data goes through the normal path: ``cprec prepare configs/ml1m_single.yaml`` (every genre -> one
domain ``movies``; per-user leave-one-out; a small sentencepiece tokenizer that SASRec never uses),
then the eval inputs, the validation tasks and the SASRec training of ``cprec eval``.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/sasrec_ml1m.py \\
        --out benchmarks/results/sasrec_ml1m.json [eval.sasrec_patience=3 ...]

``run_sasrec_ml1m(out_dir, overrides)`` is the same thing as a function (benchmarks/quality.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cprec.config import load_config
from cprec.eval import baselines
from cprec.eval.inputs import load_inputs
from cprec.eval.ranking import build_tasks, evaluate
from cprec.eval.run import validation_tasks
from cprec.prepare import pipeline

log = logging.getLogger("benchmarks.sasrec_ml1m")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ml1m_single.yaml"
REFERENCE = {
    "hr@10": 0.2853,
    "ndcg@10": 0.1603,
    "source": "facebookresearch/generative-recommenders, SASRec (sampled softmax, n=128), ML-1M, "
    "configs/ml-1m/sasrec-sampled-softmax-n128-final.gin (HSTU paper baseline)",
}
TOLERANCE = 0.05
"""The acceptance bar: within 5% of the reference on HR@10."""


def run_sasrec_ml1m(out_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Prepare ML-1M as one domain under ``out_dir`` (reused when unchanged), train SASRec with
    early stopping on the validation users, rank the test users; returns the result dict."""
    out_dir = Path(out_dir)
    cfg = load_config(
        CONFIG,
        [
            f"data.output_dir={out_dir / 'prepared'}",
            f"eval.output_dir={out_dir / 'eval'}",
            "data.num_workers=0",
            *overrides,
        ],
    )
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    prepared = pipeline.run(cfg)
    seconds["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    inputs = load_inputs(prepared, "test")
    tasks = build_tasks(inputs, cfg.eval.max_users, cfg.eval.seed)
    valid = validation_tasks(prepared, inputs, cfg.eval.max_users, cfg.eval.seed)
    seconds["inputs"] = time.perf_counter() - t
    if set(tasks) != {"movies"}:
        raise ValueError(f"expected ML-1M as the single domain 'movies', got domains {sorted(tasks)}")

    t = time.perf_counter()
    scfg = baselines.sasrec_config(cfg.eval)
    model, stats = baselines.train_sasrec(inputs.train_sequences, inputs.catalogue, scfg, valid)
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    test = evaluate(tasks, baselines.sasrec_score_fn(model, inputs.catalogue), [10, 50], "full")["overall"]
    counts = baselines.popularity_counts(inputs.train_sequences, inputs.catalogue)
    pop_fn = baselines.popularity_score_fn(baselines.popularity_scores(counts, inputs.catalogue))
    pop = evaluate(tasks, pop_fn, [10, 50], "full")["overall"]
    seconds["rank"] = time.perf_counter() - t

    hr, ndcg = test["recall@10"], test["ndcg@10"]
    ratio = {"hr@10": hr / REFERENCE["hr@10"], "ndcg@10": ndcg / REFERENCE["ndcg@10"]}
    return {
        "benchmark": "sasrec_ml1m",
        "protocol": "ML-1M as one domain, per-user leave-one-out (test = last item, valid = second last, "
        "test history includes the valid item), full ranking over the catalogue, history masked",
        "data": {
            "catalogue_items": len(inputs.catalogue.items),
            "rated_items": len({i for _, items, _ in inputs.train_sequences for i in items}),
            "test_users": len(tasks["movies"].users),
            "valid_users": stats["valid_users"],
            "train_events": sum(len(items) for _, items, _ in inputs.train_sequences),
        },
        "sasrec": {
            "test": {"hr@10": hr, "ndcg@10": ndcg, "hr@50": test["recall@50"], "ndcg@50": test["ndcg@50"]},
            "epochs_run": stats["epochs_run"],
            "best_epoch": stats["best_epoch"],
            "best_valid_ndcg@10": stats["best_valid_ndcg@10"],
            "stopped_early": stats["stopped_early"],
            "valid_history": stats["valid_history"],
            "epoch_losses": stats["epoch_losses"],
            "config": stats["config"],
            "train_seconds": stats["seconds"],
        },
        "popularity": {"test": {"hr@10": pop["recall@10"], "ndcg@10": pop["ndcg@10"]}},
        "reference": REFERENCE,
        "ratio_to_reference": ratio,
        "within_5pct": bool(ratio["hr@10"] >= 1 - TOLERANCE),
        "seconds": seconds,
        "wall_seconds": sum(seconds.values()),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus_allowed": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "overrides": list(overrides),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="out/bench/sasrec_ml1m", help="prepared data + scratch folder")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.sasrec_patience=3")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_sasrec_ml1m(args.work, args.overrides)
    s = result["sasrec"]
    log.info(
        "SASRec ML-1M: HR@10 %.4f (%.1f%% of %.4f), NDCG@10 %.4f (%.1f%% of %.4f); "
        "%d epochs, best %d; %.0f s",
        s["test"]["hr@10"],
        100 * result["ratio_to_reference"]["hr@10"],
        REFERENCE["hr@10"],
        s["test"]["ndcg@10"],
        100 * result["ratio_to_reference"]["ndcg@10"],
        REFERENCE["ndcg@10"],
        s["epochs_run"],
        s["best_epoch"],
        result["wall_seconds"],
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
