"""One `make faults` run: the sizes of its scenarios (Plan), the repositories it builds
through the build's own entry point, and the results it collects and rewrites after every
scenario (a long run cut short still leaves a report)."""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from builder import seed_inception
from builder.command import build_command
from launcher.tritonserver import PROJECT_ROOT

from .harness import Launcher
from .report import write
from .scenarios import SCENARIOS

SEED_PARAMS = {"max_length": seed_inception.MAX_LENGTH}
BUILD_MODEL = {"default": "models/default", "seed-inception": "seed-inception"}  # build_engines --model


@dataclass(frozen=True)
class Plan:
    """Sizes of each scenario: the full report, or the quick mode the test suite runs."""

    overload_clients: dict[str, int]
    overload_s: float
    capacity_s: float
    deadline_s: float
    fault_clients: int
    watch_s: float
    soak_s: float
    soak_clients: int
    # The quick mode checks the mechanism, not the tuning: a small queue budget makes
    # sure that 128 clients overflow the queues even of the fast default model.
    queue_budget_ms: int | None

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            # watch_s: a hang is found after 8 s; a repair whose reload does not finish
            # restarts the server after the reload timeout (3 x its start, >= 15 s,
            # launcher/cli.py), which a loaded machine stretches. A healthy repair ends
            # the watch early.
            return Plan({"default": 128, "seed-inception": 64}, 6.0, 3.0, 2.0, 4, 90.0, 8.0, 8, 20)
        return Plan({"default": 512, "seed-inception": 128}, 30.0, 8.0, 2.0, 8, 40.0, 120.0, 16, None)


class FaultRun:
    def __init__(self, a: argparse.Namespace):
        from captioner.scenes import encoded_scenes

        self.a = a
        self.plan = Plan.make(a.quick)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.images = [d for d, _ in encoded_scenes(32, 11)]
        self.results: dict = {
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": a.quick,
            "plan": self.plan.__dict__,
            "scenarios": [],
        }
        self._repos: dict[str, dict[str, Path]] = {}

    def repo(self, model: str, variant: str = "default") -> Path:
        """The CPU repository for `model`, built by the build's own entry point: "default"
        (its defaults, queues sized from rates measured on this machine), "unbounded"
        (`--max-queue-size 0`: no load shedding, the before of the overload comparison) or
        "tight" (the quick overload's small queue budget)."""
        if variant in self._repos.get(model, {}):
            return self._repos[model][variant]
        repo = Path(self.a.work) / model / f"repo-{variant}"
        flags = {
            "default": [],
            "unbounded": ["--max-queue-size", "0"],
            "tight": ["--queue-budget-ms", str(self.plan.queue_budget_ms)],
        }[variant]
        cmd = build_command(
            BUILD_MODEL[model],
            repo,
            target="cpu",
            extra=["--out", str(Path(self.a.work) / model / "out"), "--parity-scenes", "20", *flags, *self.a.build_args.split()],
        )
        with open(self.out / f"faults-build-{model}-{variant}.log", "wb") as f:
            subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
        self._repos.setdefault(model, {})[variant] = repo
        return repo

    def launch(self, model: str, name: str, variant: str = "default") -> Launcher:
        """A launcher (use it in `with`) on the model's `variant` repository; its logs are
        named after the model and `name`."""
        return Launcher(self.repo(model, variant), self.out, f"{model}-{name}")

    def params(self, model: str) -> dict | None:
        return SEED_PARAMS if model == "seed-inception" else None

    def record(self, **r) -> dict:
        """Keep a result, and rewrite the report: a long run cut short still leaves one."""
        self.results["scenarios"].append(r)
        write(self.results, self.out)
        return r

    def run(self) -> dict:
        a = self.a
        with tqdm(total=len(a.models) * len(a.scenarios), desc="faults", unit="scenario") as bar:
            for model in a.models:
                for name in a.scenarios:
                    bar.set_postfix_str(f"{model} {name}")
                    SCENARIOS[name](self, model)
                    bar.update(1)
        self.results["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return self.results
