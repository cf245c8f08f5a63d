"""`python -m bench.faults` / `make faults`: the flags, and a run from them to the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from captioner.cli import env
from launcher.tritonserver import PROJECT_ROOT

from ..variants import MODELS
from .report import write
from .runner import FaultRun
from .scenarios import SCENARIOS

DESCRIPTION = "`make faults`: production faults against a real, supervised server, measured."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = tuple(SCENARIOS)
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="short scenarios (the test suite's mode)")
    p.add_argument(
        "--models",
        type=lambda s: [x for x in s.split(",") if x],
        default=env("FAULTS_MODELS", None),
        help=f"of {','.join(MODELS)} (default: both; --quick: default only)",
    )
    p.add_argument("--scenarios", type=lambda s: [x for x in s.split(",") if x], default=list(names), help=",".join(names))
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overload also a repository built without load shedding, in the same run (default: on, off with --quick)",
    )
    p.add_argument(
        "--build-args",
        default=env("FAULTS_BUILD_ARGS", ""),
        help="extra build_engines flags for every repository, e.g. '--layout fused'",
    )
    p.add_argument("--out", default=env("FAULTS_OUT", str(PROJECT_ROOT / "reports")))
    p.add_argument("--work", default=env("FAULTS_WORK", str(PROJECT_ROOT / "artifacts" / "faults")))
    a = p.parse_args(argv)
    a.models = a.models or (["default"] if a.quick else list(MODELS))
    if a.baseline is None:
        a.baseline = not a.quick
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m}; choose from {MODELS}")
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s}; choose from {names}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    results = FaultRun(a).run()
    print(write(results, Path(a.out)))
    return 0
