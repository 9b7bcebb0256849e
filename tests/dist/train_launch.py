"""Launch `cprec train` (or a worker script) under torchrun with CPU ranks, for the dist tests."""

from __future__ import annotations

import json
from pathlib import Path

from torchrun_job import REPO, cprec_args, torchrun  # noqa: F401 (re-exported for the dist tests)


def train(
    config: Path,
    overrides: list[str],
    nproc: int = 2,
    env: dict | None = None,
    expect_ok: bool = True,
    gpu: bool = False,
    faults: list[str] | None = None,
):
    """``cprec train CONFIG overrides`` on ``nproc`` CPU ranks; fails the test with the log tail on error."""
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir="))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    proc = torchrun(
        cprec_args(["train", str(config), *overrides], faults),
        nproc=nproc,
        env=env,
        log=Path(out_dir).parent / f"{Path(out_dir).name}.{nproc}ranks.log",
        gpu=gpu,
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"cprec train failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def losses(run: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
