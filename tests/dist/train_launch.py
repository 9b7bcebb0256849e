"""Launch `cprec train` (or a worker script) under torchrun with CPU ranks, for the dist tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAULT_CLI = REPO / "tests" / "fault_cli.py"


def cprec_args(args: list[str], faults: list[str] | None = None) -> list[str]:
    """torchrun's script part for ``cprec ARGS``; with ``faults`` (e.g. ``["--kill-after", "train:5"]``)
    through tests/fault_cli.py, which installs them at `cprec.runtime.faults` in every rank."""
    return [str(FAULT_CLI), *faults, "--", *args] if faults else ["-m", "cprec.cli", *args]


def torchrun(
    args: list[str],
    nproc: int = 2,
    env: dict | None = None,
    timeout: int = 300,
    log: Path | None = None,
    gpu: bool = False,
):
    """Run ``torchrun --nproc_per_node N <args>`` (CPU ranks unless ``gpu``); output in ``.stdout``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",  # the OS picks a free rendezvous port: no race with other jobs
        *args,
    ]
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if gpu:
        full_env.pop("DS_ACCELERATOR")
    full_env.update(env or {})
    proc = subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if log is not None:
        log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    proc.stdout = proc.stdout + proc.stderr
    return proc


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
