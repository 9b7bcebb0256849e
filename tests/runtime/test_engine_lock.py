"""A JIT-build lock left by a killed process no longer blocks every later job."""

from __future__ import annotations

import os
import time

from cprec.runtime.engine import STALE_LOCK_S, clear_stale_build_lock


def test_stale_build_lock_beside_a_built_op_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    op = tmp_path / "some_op"
    op.mkdir()
    lock = op / "lock"
    lock.write_text("")
    assert not clear_stale_build_lock("some_op")  # not built yet: a build may be running
    (op / "some_op.so").write_bytes(b"")
    assert not clear_stale_build_lock("some_op") and lock.exists()  # fresh: a load in progress
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("some_op") and not lock.exists()
    assert not clear_stale_build_lock("some_op")  # nothing left to remove
