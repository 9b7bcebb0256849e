"""Process lifetime: a rank dies with its launcher; an output folder has one writer (real processes).

The torchrun versions (SIGKILL of torchrun's process group, a second `cprec train` on a running
job's folder) are in tests/dist/test_lifetime_dist.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cprec.lifetime import LOCK_FILE, FolderInUse, FolderLock, pid_alive, process_start

REPO = Path(__file__).resolve().parents[1]

# A "launcher" that starts a "rank" in a session of its own, as torchrun does, prints the rank's
# pid and waits; the rank arms die_with_launcher and would sleep for a minute.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(120)
"""
RANK = """
import sys, time
from cprec.lifetime import die_with_launcher
assert die_with_launcher(force=True)
open(sys.argv[1], "w").close()
time.sleep(60)
"""


def _wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_rank_in_its_own_session_dies_when_its_launcher_is_killed(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    armed = tmp_path / "armed"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, RANK, str(armed)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    rank_pid = int(launcher.stdout.readline())
    try:
        deadline = time.time() + 30
        while not armed.exists():
            assert time.time() < deadline, "the rank never armed die_with_launcher"
            time.sleep(0.05)
        assert pid_alive(rank_pid)
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's whole process group
        launcher.wait()
        assert _wait_gone(rank_pid), "the rank outlived its launcher"
    finally:
        if pid_alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)


def test_die_with_launcher_is_off_outside_torchrun(monkeypatch):
    from cprec.lifetime import die_with_launcher

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert die_with_launcher() is False  # a plain `cprec train` may outlive the shell that started it


# ---------------------------------------------------------------------------------- the lock
def _write_lock(folder: Path, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "command": "cprec train x"}
    (folder / LOCK_FILE).write_text(json.dumps(base | holder))


def test_lock_names_its_holder_and_is_released(tmp_path):
    lock = FolderLock(tmp_path / "run", "train.output_dir").acquire()
    held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert held["process_start"] == process_start(os.getpid())
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_lock_held_by_a_live_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path, pid=holder.pid, process_start=process_start(holder.pid))
        with pytest.raises(
            FolderInUse, match=rf"train.output_dir .* in use .*host {socket.gethostname()}, pid {holder.pid}"
        ):
            FolderLock(tmp_path, "train.output_dir").acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over.
    lock = FolderLock(tmp_path, "train.output_dir").acquire()
    assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_stale_locks_reused_pid_and_slurm_requeue_are_taken_over(tmp_path, monkeypatch):
    # A live PID that is not the process that wrote the lock (other start time): the PID was reused.
    _write_lock(tmp_path / "a", pid=os.getppid(), process_start="1")
    FolderLock(tmp_path / "a").acquire().release()
    # Another host's lock cannot be checked: refused ...
    _write_lock(tmp_path / "b", host="gpu-node-7", pid=4242, slurm_job="991", slurm_restart="0")
    with pytest.raises(FolderInUse, match="host gpu-node-7, pid 4242, SLURM job 991.*delete"):
        FolderLock(tmp_path / "b").acquire()
    # ... unless it is an earlier run of this very SLURM job (requeued, possibly onto another node).
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = FolderLock(tmp_path / "b").acquire()
    assert json.loads((tmp_path / "b" / LOCK_FILE).read_text())["slurm_restart"] == "1"
    lock.release()


def test_release_leaves_a_lock_that_another_process_took(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    _write_lock(tmp_path, pid=1)  # someone deleted ours and took the folder
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 1
