"""The one fault-injection seam: the training and fine-tuning loops report every finished step here.

``step_done(job, step)`` is called after step ``step`` of ``job`` ("train" or "finetune") has been
logged and, when due, checkpointed. A normal run installs nothing, so the call does nothing. Tests
install actions before the job starts, in the same process - in a child process through
``tests/fault_cli.py`` (``python tests/fault_cli.py --kill-after train:5 -- train CONFIG ...``, also
as a torchrun script) - to crash a job at an exact step (`kill_after`) or slow it down so that a
signal sent from outside lands mid-run (`sleep_each`). No environment variable reaches the loops.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Action = Callable[[str, int], None]
_actions: list[Action] = []


def install(action: Action) -> None:
    """Run ``action(job, step)`` after every step of every job in this process."""
    _actions.append(action)


def clear() -> None:
    _actions.clear()


def step_done(job: str, step: int) -> None:
    """Called by the loops after each step (a no-op unless a test installed an action)."""
    for action in list(_actions):
        action(job, step)


def kill_after(job: str, step: int) -> Action:
    """SIGKILL this process right after ``step`` of ``job``: a crash with no chance to clean up."""

    def action(j: str, s: int) -> None:
        if j == job and s == step:
            log.warning("fault injection: killing %s after step %d", job, step)
            os.kill(os.getpid(), signal.SIGKILL)

    return action


def sleep_each(job: str, seconds: float) -> Action:
    """Sleep ``seconds`` after every step of ``job`` (room for a signal sent from outside)."""

    def action(j: str, s: int) -> None:
        if j == job:
            time.sleep(seconds)

    return action
