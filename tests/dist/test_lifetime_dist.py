"""Job lifetime under torchrun: ranks die with their launcher, a run folder has one writer, and a
config error is reported once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_launch import REPO, cprec_args, losses, torchrun

from cprec.lifetime import LOCK_FILE, FolderLock, pid_alive

pytestmark = pytest.mark.dist


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.2)


def test_killed_launcher_takes_its_ranks_and_a_second_job_is_refused(train_yaml, runs_root):
    """SIGKILL of torchrun's process group: its ranks (each in a session of its own) are gone within
    seconds instead of training on as orphans. Before that, a second `cprec train` on the running
    job's folder is refused, naming the holder; after it, the dead job's lock is stale and taken over."""
    out = runs_root / "orphans"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    args = ["train", str(train_yaml), f"train.output_dir={out}", "train.max_steps=200", "tracking.backend=none"]
    cmd += cprec_args(args, faults=["--sleep-each", "train:0.5"])  # a job that keeps running
    launcher = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ranks: list[int] = []
    try:
        _wait(lambda: (out / "metrics.jsonl").is_file() and losses(out), 240, "training never started")
        ranks = _children(launcher.pid)
        assert len(ranks) == 2
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] in ranks  # rank 0 holds the folder

        second = subprocess.run(
            [sys.executable, "-m", "cprec.cli", "train", str(train_yaml), f"train.output_dir={out}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"train.output_dir {out} is in use by another job: host {holder['host']}, pid {holder['pid']}" in (
            second.stderr
        )
        assert "Traceback" not in second.stderr

        os.killpg(launcher.pid, signal.SIGKILL)  # torchrun's process group; the ranks are not in it
        launcher.wait()
        _wait(lambda: not any(pid_alive(p) for p in ranks), 30, f"ranks {ranks} outlived their launcher")
        lock = FolderLock(out, "train.output_dir").acquire()  # the dead job's lock is stale
        assert lock.held
        lock.release()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for p in ranks:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)


def test_config_error_is_printed_once_under_torchrun(train_yaml):
    proc = torchrun(["-m", "cprec.cli", "train", str(train_yaml), "train.lrr=1"])
    assert proc.returncode != 0
    assert proc.stdout.count("unknown config key 'train.lrr'; did you mean 'train.lr'?") == 1, proc.stdout
