"""What CPT is worth, measured: the CPT study (`cprec.study`) over datasets and base models.

    python benchmarks/quality.py                 # the whole study, ~90 min on the 2-core machine
    python benchmarks/quality.py --size tiny     # every stage at toy size (what CI runs)
    python benchmarks/quality.py --only ml1m-genres:smollm2-135m

Datasets: MovieLens-1M as one domain and as three genre domains (action, comedy, drama), and
food-kitchen (Amazon Grocery A, Home&Kitchen B, from ../shared/data). Models: the SmolLM2-135M base
(continually pre-trained from its real weights) and a tiny from-scratch Llama trained the same way.
Each (dataset, model) is one study: the base without CPT (zero-shot and fine-tuned), after stable,
after stable + anneal, the data.kinds ablation (domain-only, mixed-only), popularity and SASRec
(trained to early stopping), all on the same users and candidates, with 95% bootstrap intervals
and paired differences. Writes ``benchmarks/results/quality.json`` and the README table (between
the ``quality-table`` markers) from that JSON, with the wall time of every stage.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cprec.cli import setup_logging  # noqa: E402
from cprec.demo import SCRATCH  # noqa: E402
from cprec.study import StudyPlan, run_study, study_markdown  # noqa: E402

log = logging.getLogger("quality")
CONFIGS = REPO / "configs"
RESULTS = REPO / "benchmarks" / "results" / "quality.json"
FOOD_KITCHEN = Path(os.environ.get("CPREC_SHARED_DATA", REPO.parent / "shared" / "data")) / "food-kitchen"

DATASETS = {
    "ml1m-single": (CONFIGS / "ml1m_single.yaml", CONFIGS / "ml1m_single_anneal.yaml", []),
    "ml1m-genres": (CONFIGS / "demo_ml1m.yaml", CONFIGS / "demo_ml1m_anneal.yaml", []),
    "food-kitchen": (
        CONFIGS / "food_kitchen_stable.yaml",
        CONFIGS / "food_kitchen_anneal.yaml",
        [f"data.path={FOOD_KITCHEN}"],
    ),
}
# Both models read the same text with the same eval; only the starting point differs.
MODELS = {
    "smollm2-135m": ["model.name_or_path=smollm2-135m", "data.tokenizer.path=smollm2-135m", "train.lr=1e-4"],
    "scratch-tiny": SCRATCH,
}
# Per size: overrides for every stage, the anneal, and the rows. `full` is sized for ~90 minutes
# on 2 CPU cores (most of it SmolLM2 forward/backward passes); `tiny` only proves every stage runs.
SIZES = {
    "full": {
        # The demo's own settings (configs/demo_ml1m.yaml), so its stages are shared with `cprec demo`,
        # with more eval users per domain for tighter intervals.
        "every": [
            "data.max_doc_tokens=256",
            "train.seq_len=256",
            "train.micro_batch_size=4",
            "train.max_steps=30",
            "train.schedule.warmup_steps=5",
            "train.checkpoint.every_steps=15",
            "eval.max_users=200",
            "eval.max_history_items=10",
            "eval.finetune_epochs=0.0105",
            "eval.finetune_batch_size=8",
            "eval.finetune_negatives=32",
            "eval.finetune_lr=1e-4",
            "eval.finetune_max_items=20",
            "eval.finetune_seq_len=1024",
        ],
        "anneal": ["train.max_steps=8", "train.schedule.decay_steps=8"],
        "rows": ("base", "stable", "anneal", "domain_only", "mixed_only", "pairwise"),
        # The generative head (trie-constrained beam search) on the last CPT checkpoint only.
        "row_overrides": {"anneal": ["eval.generative=true", "eval.beam_width=10"]},
    },
    "tiny": {
        "every": [
            "data.max_doc_tokens=128",
            "train.seq_len=128",
            "train.micro_batch_size=2",
            "train.max_steps=3",
            "train.schedule.warmup_steps=1",
            "train.checkpoint.every_steps=3",
            "eval.max_users=20",
            "eval.max_history_items=5",
            "eval.finetune_epochs=0.002",
            "eval.finetune_max_items=8",
            "eval.finetune_seq_len=256",
            "eval.sasrec_epochs=1",
        ],
        "anneal": ["train.max_steps=2", "train.schedule.decay_steps=2"],
        "rows": ("base", "stable", "anneal", "domain_only", "mixed_only", "pairwise"),
        "row_overrides": {"anneal": ["eval.generative=true", "eval.beam_width=4", "eval.rerank_top_n=5"]},
    },
}
# One domain has no all-domain mixed sequences (configs/ml1m_single.yaml reads domain sequences only),
# so the data.kinds ablation does not apply there.
NO_ABLATION = {"ml1m-single"}
# The scratch model learns from nothing: it gets a higher LR (in SCRATCH) and the same steps.
SCRATCH_EXTRA = {"food-kitchen": ["data.tokenizer.vocab_size=4000"]}


def run_one(
    dataset: str,
    model: str,
    size: str,
    out_root: Path,
    rows: tuple[str, ...] | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    stable, anneal, extra = DATASETS[dataset]
    s = dict(SIZES[size])
    if rows:
        s["rows"] = tuple(r for r in s["rows"] if r in rows)
    over = [*extra, *MODELS[model], *(SCRATCH_EXTRA.get(dataset, []) if model == "scratch-tiny" else [])]
    plan = StudyPlan(
        stable_config=stable,
        anneal_config=anneal,
        out=out_root / f"{dataset}--{model}",
        rows=tuple(r for r in s["rows"] if dataset not in NO_ABLATION or not r.endswith("_only")),
        overrides=[*over, *s["every"], *extra],
        anneal_overrides=s["anneal"],
        row_overrides=s.get("row_overrides", {}),
    )
    t = time.perf_counter()
    study = run_study(plan)
    study["wall_seconds"] = time.perf_counter() - t
    study["dataset"], study["model"] = dataset, model
    return study


def sasrec_reference(out_root: Path, size: str) -> dict | None:
    """SASRec on ML-1M as one domain vs the published number (benchmarks/sasrec_ml1m.py)."""
    try:
        from benchmarks.sasrec_ml1m import run_sasrec_ml1m
    except ImportError as e:
        log.warning("SASRec ML-1M reference not available (%s)", e)
        return None
    tiny = ["eval.sasrec_epochs=1", "eval.max_users=200"] if size == "tiny" else []
    return run_sasrec_ml1m(out_root / "sasrec_ml1m", tiny)


def table(results: dict) -> str:
    """The README table: one block per study, then the SASRec reference line."""
    lines = []
    for s in results["studies"]:
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
        lines += [f"**{s['dataset']} · {s['model']}** (wall {s['wall_seconds'] / 60:.1f} min: {stages})", ""]
        lines += [study_markdown(s), ""]
    ref = results.get("sasrec_ml1m")
    if ref:
        t, pub, s = ref["sasrec"]["test"], ref["reference"], ref["sasrec"]
        lines.append(
            f"SASRec on ML-1M as one domain (full ranking, {ref['data']['test_users']:,} users): "
            f"HR@10 {t['hr@10']:.4f}, NDCG@10 {t['ndcg@10']:.4f} vs published {pub['hr@10']} / "
            f"{pub['ndcg@10']} (ratio {ref['ratio_to_reference']['hr@10']:.3f}); best epoch "
            f"{s['best_epoch']} of {s['epochs_run']}; "
            f"popularity HR@10 {ref['popularity']['test']['hr@10']:.4f}."
        )
    return "\n".join(lines) + "\n"


def write_readme(md: str, readme: Path = REPO / "README.md") -> None:
    from benchmarks.readme_table import write_between

    write_between(md, ("<!-- quality-table:start -->", "<!-- quality-table:end -->"), readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default="out/quality", help="working folder of every study")
    p.add_argument("--only", nargs="*", default=None, help="DATASET:MODEL pairs to run (default all)")
    p.add_argument("--rows", default="", help="comma-separated subset of the study rows (default all)")
    p.add_argument("--results", default=str(RESULTS), help="JSON written here")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument(
        "--merge", action="store_true", help="keep the other studies already in --results (runs in parts)"
    )
    p.add_argument("--no-sasrec-reference", action="store_true", help="skip the SASRec ML-1M reference")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every stage of every study")
    p.add_argument(
        "--sasrec-json", default="", help="take the SASRec ML-1M reference from this sasrec_ml1m.py result"
    )
    args = p.parse_args(argv)
    setup_logging("INFO")
    pairs = [(d, m) for d in DATASETS for m in MODELS]
    if args.only:
        pairs = [tuple(x.split(":", 1)) for x in args.only]
        bad = [x for x in pairs if x[0] not in DATASETS or x[1] not in MODELS]
        if bad:
            p.error(f"unknown DATASET:MODEL {bad}; datasets {list(DATASETS)}, models {list(MODELS)}")
    out_root = Path(args.out).resolve()
    rows = tuple(filter(None, args.rows.split(",")))
    t = time.perf_counter()
    results = {
        "size": args.size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows or "all",
        "studies": [run_one(d, m, args.size, out_root, rows, tuple(args.overrides)) for d, m in pairs],
    }
    if args.sasrec_json:
        results["sasrec_ml1m"] = json.loads(Path(args.sasrec_json).read_text(encoding="utf-8"))
    elif not args.no_sasrec_reference:
        results["sasrec_ml1m"] = sasrec_reference(out_root, args.size)
    results["wall_seconds"] = time.perf_counter() - t
    path = Path(args.results)
    if args.merge and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        done = {(s["dataset"], s["model"]) for s in results["studies"]}
        keep = [s for s in old.get("studies", []) if (s["dataset"], s["model"]) not in done]
        results["studies"] = keep + results["studies"]
        if results.get("sasrec_ml1m") is None:
            results["sasrec_ml1m"] = old.get("sasrec_ml1m")
        results["wall_seconds"] += old.get("wall_seconds", 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    md = table(results)
    path.with_suffix(".md").write_text(md, encoding="utf-8")
    if not args.no_readme and args.size == "full":
        write_readme(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
