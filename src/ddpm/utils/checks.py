"""Argument checks shared by constructors: a bad value raises a ValueError naming the setting."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> Any:
    """``value`` if it is an integer >= 1 (or None with ``allow_none``), else a ValueError that
    names the setting ``name``."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}"
        )
    return value
