"""`make faults`: production faults against a real, supervised server, measured.

    python -m bench.faults                 # the full report: reports/faults.md + faults.json
    python -m bench.faults --quick         # minutes; the test suite runs this mode
    python -m bench.faults --scenarios overload --models seed-inception

Every scenario starts the launcher the way `make serve` does (`python -m launcher
--no-build`, supervised, model control explicit) on free ports and talks to it over gRPC:

- overload: capacity at 8 clients, then N closed-loop clients with 2 s deadlines that
  back off when refused (bench/overload.py): goodput / capacity, refusal latency, and how
  long after the load stops a single client's latency is back to normal;
- stub-kill: SIGKILL of each Python model's stub in turn; hang: SIGSTOP of one while it
  is inside an execute (an execute that never returns); hang-idle: SIGSTOP of one between
  executes (a process frozen while idle); each while clients of the client
  library caption with retries: time until readiness says NOT ready and until it is
  ready again (repaired), time until captions come back, requests lost;
- server-kill: SIGKILL of tritonserver itself: time to captions again, orphaned stubs left;
- abort-in-repair: SIGKILL of a stub, then SIGABRT of tritonserver while the supervisor
  reloads its model (the Python backend's abort on a lock the dead stub held): the
  reload given up, the server restarted, requests lost;
- drain: SIGTERM to the launcher under load: accepted requests that failed (must be 0),
  what new requests got;
- soak: steady load: failures and the server's memory (RSS of tritonserver and its stubs);
- rollout: plain clients (no retries) while `make rollout` switches the server to a
  checkpoint with other layer sizes and `make rollback` switches it back (rollout.py):
  failures, answers not from the version they name, p99 during the switch vs steady,
  time to the first new-version caption, readiness; then a stub of the version served
  after it killed and repaired by the supervisor.

The parts: harness.py (the launcher under test, ready over HTTP), load.py (the load
drivers), scenarios.py (the registry of scenarios), runner.py (a run: plan, builds,
results), report.py (faults.md and faults.json), cli.py (the flags).
"""

from ..variants import MODELS
from . import rollout as _rollout  # noqa: F401 - registers the "rollout" scenario
from .cli import main, parse_args
from .runner import FaultRun, Plan
from .scenarios import SCENARIOS

__all__ = ["MODELS", "SCENARIOS", "FaultRun", "Plan", "main", "parse_args"]
