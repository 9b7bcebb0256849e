"""Data preparation throughput on food-kitchen, and the cost of a cache hit relative to a full run.

Runs ``cprec.prepare.pipeline.run`` twice on the same config into a temporary folder: the first run
does everything (read, split, train the tokenizer, tokenize in workers, write shards); the second
finds the same content hash and returns (the baseline it is compared with is the first run, in
the same process). Reports sequences/s and tokens/s of the first run, the tokenize+write stage on
its own, and ``cache_hit_s / first_run_s`` (goal: < 5%). A cache hit through the CLI (a fresh
Python process, imports included) is timed too.

    python benchmarks/prepare.py --out benchmarks/results/prepare.json

The machine is shared: the load average at start and end is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cprec.config import load_config
from cprec.prepare import pipeline

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.prepare")


class _StageCapture(logging.Handler):
    """Keeps the 'stage times' line that prepare logs, to report the tokenize+write stage."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.stages: dict[str, float] = {}

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("stage times:"):
            self.stages = {k.strip(): float(v) for k, v in re.findall(r"([\w+ ]+?) ([\d.]+)s", msg[12:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/food_kitchen.yaml"))
    ap.add_argument(
        "--data", default=str(REPO.parent / "shared/data/food-kitchen"), help="food-kitchen folder"
    )
    ap.add_argument("--workers", type=int, default=2, help="tokenization worker processes")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    capture = _StageCapture()
    logging.getLogger("cprec.prepare.pipeline").addHandler(capture)

    with tempfile.TemporaryDirectory(prefix="cprec-bench-prepare-") as tmp:
        out_dir = Path(tmp) / "prepared"
        overrides = [
            f"data.path={args.data}",
            f"data.output_dir={out_dir}",
            f"data.num_workers={args.workers}",
        ]
        cfg = load_config(args.config, overrides + args.overrides)
        load_start = os.getloadavg()

        t = time.perf_counter()
        pipeline.run(cfg)
        first = time.perf_counter() - t
        stages = dict(capture.stages)

        t = time.perf_counter()
        pipeline.run(cfg)
        hit = time.perf_counter() - t

        t = time.perf_counter()
        cmd = [sys.executable, "-m", "cprec.cli", "--log-level", "WARNING", "prepare", args.config]
        cmd += overrides + args.overrides
        subprocess.run(cmd, check=True, cwd=REPO)
        hit_cli = time.perf_counter() - t

        manifest = json.loads((out_dir / "manifest.json").read_text())
    sequences = sum(s["sequences"] for s in manifest["streams"].values())
    tokens = sum(s["tokens"] for s in manifest["streams"].values())
    stage = stages.get("tokenize+shards", 0.0)
    result = {
        "benchmark": "prepare",
        "dataset": "food-kitchen",
        "workers": args.workers,
        "sequences": sequences,
        "tokens": tokens,
        "interactions_in": manifest["counts"]["interactions_in"],
        "first_run_s": round(first, 2),
        "sequences_per_s": round(sequences / first, 1),
        "tokens_per_s": round(tokens / first, 1),
        "tokenize_write_s": stage,
        "tokenize_write_tokens_per_s": round(tokens / stage, 1) if stage else None,
        "stages_s": stages,
        "cache_hit_s": round(hit, 3),
        "cache_hit_ratio": round(hit / first, 4),
        "cache_hit_goal": "< 0.05",
        "cache_hit_cli_s": round(hit_cli, 2),
        "cache_hit_cli_ratio": round(hit_cli / first, 4),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
