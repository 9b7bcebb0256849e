"""The `cprec` command: parse arguments, set up logging, dispatch. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cprec import quiet

DESCRIPTION = """CPRec: all-domain continual pre-training of LLMs for recommendation.

Typical flow:  cprec prepare CONFIG  ->  cprec train CONFIG_stable  ->  cprec train CONFIG_anneal
               ->  cprec eval CONFIG  ->  cprec export CKPT OUT        (or: cprec demo)
               ->  cprec embed CONFIG --out DIR --faiss    (embeddings + FAISS index for serving)

CONFIG is a YAML file (see configs/); append dotted overrides such as train.lr=1e-4 data.seed=3.
"""

# Each command names the function it runs. prepare/train/eval functions take a validated Config;
# export takes (checkpoint, out); demo takes (out, size, overrides); eval --compare takes paths.
COMMANDS = {
    "prepare": (
        "cprec.prepare.pipeline:run",
        "Read interaction logs, split leave-one-out, render prompts, tokenize, write WebDataset "
        "shards + manifest + eval inputs into data.output_dir.",
    ),
    "train": (
        "cprec.train.trainer:run",
        "Run one pre-training phase (stable or anneal) with DeepSpeed; resumes automatically from "
        "the latest checkpoint in train.output_dir. Launch with torchrun/srun for several ranks.",
    ),
    "eval": (
        "cprec.eval.run:run",
        "Evaluate a checkpoint or HF export: optional contrastive fine-tuning, full-ranking "
        "Recall/NDCG/MRR@K per domain next to popularity and SASRec baselines.",
    ),
    "embed": (
        "cprec.eval.embed:run",
        "Write the checkpoint's item embeddings (per domain) and user embeddings (the eval users or "
        "--users FILE) as Parquet and NumPy with ids, plus a FAISS index of the items (--faiss).",
    ),
    "export": (
        "cprec.runtime.export:run",
        "Gather a (ZeRO-3) checkpoint into a Hugging Face folder (safetensors + config + tokenizer).",
    ),
    "study": (
        "cprec.study:main",
        "What CPT is worth: the base without CPT, after stable, after stable + anneal, and the "
        "domain/mixed ablation, fine-tuned and ranked on the same users, with intervals.",
    ),
    "demo": (
        "cprec.demo:run",
        "Continual pre-training of SmolLM2-135M on MovieLens-1M on CPU: prepare -> base eval -> "
        "stable -> anneal -> eval with baselines (--size tiny: a from-scratch smoke run).",
    ),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    _add_check_arg(p)


def _add_check_arg(p: argparse.ArgumentParser) -> None:
    # The launch scripts validate once before torchrun, which would print a config error once per
    # rank plus its own traceback.
    p.add_argument("--check", action="store_true", help="only validate CONFIG and the overrides, then exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cprec", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("prepare", "train"):
            _add_config_args(p)
        elif name == "eval":
            p.add_argument("config", nargs="?", help="YAML config file (see configs/)")
            p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.split=valid")
            p.add_argument(
                "--compare", nargs="+", metavar="REPORT", help="print several report.json side by side"
            )
            _add_check_arg(p)
        elif name == "embed":
            _add_config_args(p)
            p.add_argument("--out", required=True, help="output folder (replaced as a whole)")
            p.add_argument(
                "--users",
                default=None,
                help="Parquet or JSON Lines of (user, history) rows (default: eval users)",
            )
            p.add_argument(
                "--faiss", action="store_true", help="also write a FAISS index of each domain's items"
            )
        elif name == "export":
            p.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXX) or run folder")
            p.add_argument("out", help="output HF folder")
        elif name == "study":
            p.add_argument("config", help="YAML of dataset, model, stable phase and eval (see configs/)")
            p.add_argument("--anneal", default=None, help="YAML of the annealing phase (anneal row)")
            p.add_argument("--out", required=True, help="output root of every stage")
            p.add_argument(
                "--rows",
                default="base,stable,anneal,domain_only,mixed_only",
                help="comma-separated rows to run (default: all)",
            )
            p.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")
        elif name == "demo":
            p.add_argument("--out", default="out/demo", help="output root (default out/demo)")
            p.add_argument(
                "--size",
                default="full",
                choices=["full", "small", "tiny"],
                help="full: the ~15-minute CPU demo; small/tiny: reduced runs for tests",
            )
            p.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _call(args: argparse.Namespace) -> int:
    from cprec.config import load_config

    target = COMMANDS[args.command][0]
    if args.command == "eval" and args.compare:
        target = "cprec.eval.report:compare"
    module_name, func_name = target.split(":")
    # Config errors surface before any heavy import; every rank meets the same one.
    try:
        has_config = getattr(args, "config", None) and args.command != "study"  # study loads its own
        cfg = load_config(args.config, args.overrides) if has_config else None
    except (ValueError, FileNotFoundError) as e:
        e.same_on_every_rank = True
        raise
    if getattr(args, "check", False):
        if cfg is None:
            raise ValueError(f"'cprec {args.command} --check' needs a CONFIG file")
        logging.getLogger("cprec").info("config OK: %s", args.config)
        return 0
    func = getattr(importlib.import_module(module_name), func_name)
    if args.command == "eval" and args.compare:
        return int(func(args.compare) or 0)
    if args.command == "export":
        func(args.checkpoint, args.out)
    elif args.command == "embed":
        func(cfg, args.users, args.out, args.faiss)
    elif args.command == "study":
        func(args.config, args.anneal, args.out, args.rows.split(","), args.overrides)
    elif args.command == "demo":
        func(args.out, args.size, args.overrides)
    elif cfg is None:
        raise ValueError(f"'cprec {args.command}' needs a CONFIG file")
    else:
        func(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet.at_start_up()  # library warnings, bars and log lines the user cannot act on: off, once
    setup_logging(args.log_level)
    from cprec.lifetime import die_with_launcher

    die_with_launcher()  # a rank under torchrun: exit when torchrun does (no-op otherwise)
    try:
        return _call(args)
    except (ValueError, FileNotFoundError) as e:
        # Config and input errors are the user's to fix: one clear line (traceback at DEBUG). One
        # that every rank meets alike (``same_on_every_rank``: config, tokenizer mismatch) is printed by
        # rank 0 alone; others, which may be a rank's own (a file its host cannot see), by each.
        from cprec.runtime.dist import dist_info

        logger = logging.getLogger("cprec")
        logger.debug("traceback", exc_info=True)
        rank = dist_info().rank
        if rank == 0:
            logger.error("%s", e)
        elif not getattr(e, "same_on_every_rank", False):
            logger.error("rank %d: %s", rank, e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
