"""The one place that spells the `python -m builder.build_engines` command line.

The launcher (a stale repository), the benchmark and the fault harness all run the build
through its own entry point, as `make build-engines` does; they ask this module for the
argv instead of assembling flags themselves. It imports nothing heavy, so the launcher can
use it without loading the build."""

from __future__ import annotations

import sys
from pathlib import Path


def build_command(
    model: str | Path,
    repo: str | Path,
    *,
    target: str | None = None,
    precision: str | None = None,
    runtime: str | None = None,
    layout: str | None = None,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """argv for one build; flags left None take build_engines' own defaults."""
    cmd = [sys.executable, "-m", "builder.build_engines", "--model", str(model), "--repo", str(repo)]
    for name, value in (("--target", target), ("--precision", precision), ("--runtime", runtime), ("--layout", layout)):
        if value is not None:
            cmd += [name, value]
    return cmd + list(extra)
