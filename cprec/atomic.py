"""Atomic writes: build a file or folder under a temporary name beside it, then rename it into place.

A reader (or a rerun after a crash) sees the old content or the new one, never half of either:
``os.replace`` is one rename on one file system. The temporary name carries the process id, so ranks
writing the same cache file at once do not write into each other's temp file; a crash leaves a
``.<name>.tmp-<pid>`` leftover that the next write of the same path does not trip over.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write a file or a folder there. On a clean exit it
    replaces ``path``; on an error it is deleted. An existing folder is first renamed aside
    (``.<name>.old-<pid>``: ``os.replace`` cannot put a folder over a non-empty one) and removed
    only once the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            path.rename(old)
            try:
                os.replace(tmp, path)
            except BaseException:
                old.rename(path)  # the old folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data, **dumps) -> Path:
    """``json.dumps(data, **dumps)`` to ``path`` atomically."""
    return write_text(path, json.dumps(data, **dumps))
