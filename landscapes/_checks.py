"""Shared argument validation; every message names the argument, the value and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from landscapes.errors import ConfigurationError


def check_choice(name: str, value: Any, choices: Iterable[Any], *, where: str = "") -> Any:
    """Return ``value`` if it is one of ``choices``; the string "none" counts as None."""
    choices = tuple(choices)
    if isinstance(value, str) and value.lower() == "none" and None in choices:
        return None
    if value in choices:
        return value
    prefix = f"{where}: " if where else ""
    shown = ", ".join(repr(c) for c in choices)
    raise ConfigurationError(f"{prefix}{name}={value!r} is not an option; choose one of {shown}.")


def check_positive_int(name: str, value: Any, *, where: str = "", allow_none: bool = False) -> Any:
    """Return ``value`` if it is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = f"{where}: " if where else ""
        raise ConfigurationError(f"{prefix}{name}={value!r}: expected a positive integer.")
    return value
