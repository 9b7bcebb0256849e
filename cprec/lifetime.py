"""How a job's processes live and die: ranks die with their launcher; one writer per output folder.

**Ranks die with their launcher.** torchrun starts every rank in a session of its own
(``Popen(start_new_session=True)`` in ``torch.distributed.elastic``), so that it can signal each
rank's process group; the price is that a signal to torchrun's own process group (``kill -9
-PGID``, a batch system or a shell tearing the job down) never reaches the ranks. With torchrun gone
nothing stops them: they train on as orphans and write into the run folder alongside the restarted
job. `die_with_launcher`, called first thing in every rank under torchrun, asks Linux to SIGKILL
the rank when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and starts a watchdog thread that does
the same when ``os.getppid()`` changes (systems without prctl). SIGKILL, not SIGTERM: the launcher
that would collect a graceful exit is gone, and checkpoints are atomic, so the rerun resumes from the
last complete one. Plain ``cprec train`` (no torchrun) is left alone: its parent is a shell, which a
user may close while the job runs on (``nohup``).

**One writer per output folder.** `FolderLock` is a file ``cprec.lock`` in the folder, created
atomically (``O_CREAT | O_EXCL``) by rank 0 before anything else and naming its holder (host, PID,
process start time, SLURM job, command). A second job on the folder is refused with the holder named.
A stale lock - its holder dead (same host: no such PID, a zombie, or the PID reused by a process that
started later), or an earlier run of the same SLURM job (a requeue: SLURM ends a job's processes
before running it again, on any node) - is taken over, with a warning. A lock from another host
cannot be checked and is never taken over: the error says to delete the file if that job is gone.
The lock is released when the job ends, however it ends short of SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "cprec.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


# ------------------------------------------------------------------------------ launcher death
def launched_by_torchrun() -> bool:
    """torchrun's agent exports TORCHELASTIC_RUN_ID to every worker it starts."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def die_with_launcher(force: bool = False) -> bool:
    """Make this process exit (SIGKILL) when its parent dies; returns whether it was armed.

    A no-op unless under torchrun (or ``force``). prctl where there is one, plus a daemon thread
    polling ``os.getppid()`` every `WATCH_INTERVAL_S`, which also covers a parent that died before
    prctl was set (the process has been handed to init already)."""
    if not (force or launched_by_torchrun()):
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.warning(
                    "prctl(PR_SET_PDEATHSIG) failed (errno %d): relying on the watchdog", ctypes.get_errno()
                )
        except (OSError, AttributeError) as e:
            log.warning("prctl unavailable (%s): relying on the watchdog", e)
    if parent == 1:  # the launcher is already gone
        _launcher_gone(parent)
    threading.Thread(target=_watch_parent, args=(parent,), name="cprec-launcher-watch", daemon=True).start()
    return True


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != parent:
            _launcher_gone(parent)


def _launcher_gone(parent: int) -> None:
    sys.stderr.write(f"cprec: launcher (pid {parent}) is gone; rank pid {os.getpid()} exits\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ process liveness
def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) from /proc/<pid>/stat; None without /proc or that PID."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return fields[0], fields[19]


def process_start(pid: int) -> str | None:
    """An opaque start time of a live process (tells a reused PID apart); None where unknown."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (not a zombie) and, when ``start`` is given, is the
    process that had that start time."""
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in ("Z", "X") and (start is None or started == start)
    if Path("/proc/self/stat").exists():  # /proc works here and has no such PID
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ------------------------------------------------------------------------------ the folder lock
class FolderInUse(ValueError):
    """Another job holds the output folder's lock."""


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": process_start(pid),
        "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }


@dataclass
class FolderLock:
    """``<folder>/cprec.lock`` for one job (see the module docstring). ``what`` names the config
    field of the folder in errors (``train.output_dir``)."""

    folder: Path
    what: str = "output folder"
    held: bool = False
    holder: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.folder) / LOCK_FILE

    def acquire(self) -> FolderLock:
        """Take the lock, taking over a stale one; raise `FolderInUse` naming a live holder."""
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                return self
            other = self._read()
            if other == {}:  # removed meanwhile: try to create it again
                continue
            if other is None:  # being written by its creator right now, or unreadable
                time.sleep(0.2)
                other = self._read()
                if other is None:
                    raise FolderInUse(
                        f"{self.what} {self.folder}: unreadable lock file {self.path}; delete it"
                    )
            me = _me()
            if other.get("host") == me["host"] and other.get("pid") == me["pid"]:
                return self  # this very process holds it already (nested use): not ours to release
            why = self._stale_reason(other, me)
            if why is None:
                raise FolderInUse(self._in_use_message(other))
            with self._guard():  # one taker at a time on this host; re-check under the guard
                if self._read() == other:
                    log.warning(
                        "%s %s: taking over the stale lock of pid %s on %s (%s)",
                        self.what, self.folder, other.get("pid"), other.get("host"), why,
                    )  # fmt: skip
                    self.path.unlink()
        raise FolderInUse(f"{self.what} {self.folder}: could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock file if this lock holds it (and it still names this process)."""
        if not self.held:
            return
        self.held = False
        current = self._read()
        if current is not None and (current.get("host"), current.get("pid")) == (
            self.holder["host"],
            self.holder["pid"],
        ):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---------------------------------------------------------------------------- internals
    def _create(self) -> bool:
        me = _me()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        self.held, self.holder = True, me
        return True

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}  # gone meanwhile: the next create attempt decides
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _stale_reason(other: dict, me: dict) -> str | None:
        """Why the holder cannot be running any more, or None if it may be."""
        if other.get("slurm_job") and other["slurm_job"] == me["slurm_job"]:
            if str(other.get("slurm_restart")) != str(me["slurm_restart"]):
                return f"an earlier run of SLURM job {me['slurm_job']}"
        if other.get("host") != me["host"]:
            return None
        pid = other.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid, other.get("process_start")):
            return "that process is gone"
        return None

    def _in_use_message(self, other: dict) -> str:
        job = f", SLURM job {other['slurm_job']}" if other.get("slurm_job") else ""
        return (
            f"{self.what} {self.folder} is in use by another job: host {other.get('host')}, "
            f"pid {other.get('pid')}{job}, since {other.get('started')} ({other.get('command', '')!r}). "
            f"Two jobs must not write one folder; wait for it to end, use another {self.what}, or, "
            f"if that job is gone, delete {self.path}"
        )

    @contextlib.contextmanager
    def _guard(self):
        """An flock on a side file, so that two processes of this host never both take over."""
        guard = self.path.with_name(LOCK_FILE + ".guard")
        try:
            import fcntl
        except ImportError:  # not POSIX: no guard
            yield
            return
        with open(guard, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


class _NoLock:
    """What ranks other than 0 hold (rank 0 holds the job's lock)."""

    def release(self) -> None:
        pass


def hold_folder(folder: str | Path, what: str, rank: int) -> FolderLock | _NoLock:
    """The job's lock on ``folder``, taken by rank 0 only (first thing, before the process group);
    other ranks get a no-op. A refusal is a `FolderInUse` on rank 0, which ends the job."""
    if rank != 0:
        return _NoLock()
    return FolderLock(Path(folder), what).acquire()
