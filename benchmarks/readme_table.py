"""The README tables the benchmarks regenerate from their JSON: one writer for all of them.

Each table lives between a pair of HTML comment markers in README.md (``<!-- NAME:start -->`` and
``<!-- NAME:end -->``); only the text between them is replaced, so the prose around a table stays
hand-written while the numbers cannot drift from the committed results.
"""

from __future__ import annotations

import logging
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
log = logging.getLogger(__name__)


def write_between(md: str, markers: tuple[str, str], readme: Path = README) -> bool:
    """Replace what lies between ``markers`` in ``readme`` with ``md``; False (and a warning) when the
    README lacks them."""
    start, end = markers
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        log.warning("%s has no %s ... %s markers; not updated", readme, start, end)
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + md + end + tail, encoding="utf-8")
    return True
