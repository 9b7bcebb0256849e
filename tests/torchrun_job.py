"""Launching a job on CPU ranks under ``torchrun``: the one launcher every multi-process test uses
(``tests/dist``'s training runs, ``tests/eval``'s 2-rank evaluation workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
    # PYTHONPATH: the ranks import this checkout's cprec, whichever checkout the venv was installed from.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path
    )
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
