"""Shared by every command line: flags take their defaults from environment variables."""
from __future__ import annotations

import os
from typing import Any, Callable


def env(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """`$name` cast to the flag's type, or `default` when unset or empty."""
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def flag(value: str) -> bool:
    """An environment variable read as a boolean switch (1/true/yes/on)."""
    return value.strip().lower() in ("1", "true", "yes", "on")
