"""Shared by every command line: flags take their defaults from environment variables."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """`$name` cast to the flag's type, or `default` when unset or empty. A value the cast
    rejects is a ValueError that names the variable."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return cast(value)
    except ValueError as e:
        raise ValueError(f"${name}: {e}") from None


def flag(value: str) -> bool:
    """An environment variable read as a boolean switch: 1/true/yes/on or 0/false/no/off
    (any case); anything else is a ValueError, so that a typo cannot switch a flag off."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r} is not a yes/no value (want one of {'/'.join(TRUE_WORDS + FALSE_WORDS)})")
