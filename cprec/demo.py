"""`cprec demo`: the whole job on MovieLens-1M with a small from-scratch model, on a CPU.

prepare -> stable phase -> anneal phase (branched from the stable checkpoint) -> contrastive
fine-tuning -> full-ranking eval with popularity and SASRec baselines -> report table.

Each training phase runs in its own process (as a real job would: `cprec train` under torchrun or
SLURM), so the stable and anneal runs are separate, checkpointed runs with their own MLflow runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from cprec.config import load_config

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Reduced sizes keep the same stages; `tiny` is what the slow test runs.
SIZES: dict[str, list[str]] = {
    "full": [],
    "small": [
        "train.max_steps=80",
        "train.schedule.warmup_steps=10",
        "train.checkpoint.every_steps=40",
        "eval.max_users=300",
        "eval.sasrec_epochs=5",
    ],
    "tiny": [
        "data.max_doc_tokens=128",
        "train.seq_len=128",
        "train.micro_batch_size=4",
        "train.max_steps=12",
        "train.schedule.warmup_steps=4",
        "train.checkpoint.every_steps=6",
        "eval.max_users=60",
        "eval.sasrec_epochs=2",
        "eval.finetune_epochs=0.2",
    ],
}
# The anneal's own length (full size: as in configs/demo_ml1m_anneal.yaml).
ANNEAL_SIZES: dict[str, list[str]] = {
    "full": [],
    "small": ["train.max_steps=30", "train.schedule.decay_steps=30"],
    "tiny": ["train.max_steps=6", "train.schedule.decay_steps=6"],
}


def _paths(out: Path) -> dict[str, Path]:
    return {
        "prepared": out / "prepared",
        "stable": out / "runs" / "stable",
        "anneal": out / "runs" / "anneal",
        "eval": out / "eval",
    }


def _stage(name: str) -> float:
    log.info("==== demo: %s ====", name)
    return time.time()


def _train(config: Path, overrides: list[str]) -> None:
    """One phase in its own process, like `cprec train` on a cluster (single CPU rank here)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "cprec.cli", "train", str(config), *overrides]
    log.info("running: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def run(out: str, size: str, overrides: list[str]) -> dict:
    """Run the demo into `out`; returns the eval report."""
    from cprec.data.prepare import run as prepare
    from cprec.eval.report import to_markdown
    from cprec.eval.run import run as evaluate

    out_dir = Path(out).resolve()
    p = _paths(out_dir)
    common = [
        f"data.output_dir={p['prepared']}",
        # One tracking store for all stages, so the anneal run links to its stable parent.
        f"tracking.uri=sqlite:///{out_dir / 'mlflow.db'}",
        *SIZES[size],
        *overrides,
    ]
    stable_cfg = CONFIGS / "demo_ml1m.yaml"
    anneal_cfg = CONFIGS / "demo_ml1m_anneal.yaml"
    t_all = time.time()

    t = _stage("1/4 prepare MovieLens-1M (genre domains)")
    cfg = load_config(stable_cfg, common)
    prepare(cfg)
    log.info("prepare took %.0fs", time.time() - t)

    t = _stage("2/4 stable phase")
    _train(stable_cfg, [*common, f"train.output_dir={p['stable']}"])
    log.info("stable phase took %.0fs", time.time() - t)

    t = _stage("3/4 anneal phase (branched from the stable checkpoint)")
    anneal = [f"train.output_dir={p['anneal']}", f"train.init_from={p['stable']}", *ANNEAL_SIZES[size]]
    _train(anneal_cfg, [*common, *anneal])
    log.info("anneal phase took %.0fs", time.time() - t)

    t = _stage("4/4 fine-tune + evaluate with baselines")
    eval_cfg = load_config(
        anneal_cfg,
        [*common, f"train.output_dir={p['anneal']}", f"eval.output_dir={p['eval']}"],
    )
    report = evaluate(eval_cfg)
    log.info("eval took %.0fs", time.time() - t)

    table = to_markdown(report)
    # The final table is the demo's product: print it to stdout, not only to the log.
    sys.stdout.write("\n" + table + "\n")
    sys.stdout.write(
        f"\nDemo finished in {time.time() - t_all:.0f}s.\n"
        f"  prepared data : {p['prepared']}\n"
        f"  checkpoints   : {p['stable'] / 'checkpoints'}  and  {p['anneal'] / 'checkpoints'}\n"
        f"  report        : {p['eval'] / 'report.json'} (+ report.md, metrics.png)\n"
        f"  MLflow        : mlflow ui --backend-store-uri sqlite:///{out_dir / 'mlflow.db'}\n"
    )
    sys.stdout.flush()
    return report
