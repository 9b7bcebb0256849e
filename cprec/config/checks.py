"""The two checks every config section's ``__post_init__`` uses: errors name the config field."""

from __future__ import annotations

from typing import Any


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config field '{name}': {msg}")


def _one_of(value: Any, name: str, choices: tuple) -> None:
    _check(value in choices, name, f"must be one of {list(choices)}, got {value!r}")
