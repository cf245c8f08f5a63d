"""Keep a tritonserver captioning with no one acting: the launcher's supervision loop.

Triton 2.51's Python backend does not restart a dead stub, and model readiness does not
notice it: every request to that model fails from then on while health says all is well.
The supervisor watches what Triton does not:

- **dead stub**: each Python-backend model's stub processes (children of tritonserver);
  one gone or a zombie means that model is broken;
- **hung stub**: a model with requests pending whose execution count has not moved for
  `hang_timeout_s` (a periodic tiny caption, the probe, makes sure something is pending
  when the server is otherwise idle), or one stub inside a single execute for longer
  (each instance's ExecuteClock: with two instances of a model, the other one keeps the
  model's execution count moving), or one whose heartbeat thread has gone silent that
  long (a stub frozen between executes);
- **broken server**: tritonserver exited, or the probe fails `probe_failures` times in a
  row with anything but an overload refusal.

Models with several versions (a rollout, launcher/rollout.py, loads a new version beside the
serving one and unloads the old): stubs are told apart by version, and every round follows
Triton's repository index, so a version unloaded on purpose is no dead stub and a version
newly loaded is watched from then on.

A broken model is unloaded at once (the ensemble goes with it, so with strict readiness
`/v2/health/ready` answers NOT ready and load balancers stop routing), its remaining stubs
are killed, and it is loaded again (`--model-control-mode=explicit`). A dead server, or a
model that will not come back, means a restart of tritonserver on the same ports after
its orphaned stubs are ended. Restarts back off exponentially and are bounded: past
`max_restarts` within `restart_window_s` the supervisor gives up and the launcher exits
non-zero, so that a process manager above it (Kubernetes, systemd) takes over.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from captioner.serving.triton import executing_since, heartbeats

from .tritonserver import ServerError, TritonServer
from .watch import BackgroundProbe as BackgroundProbe  # the launcher's and the tests' name for it
from .watch import HangWatch, parse_metrics

log = logging.getLogger("launcher.supervisor")

STUB_BINARY = "triton_python_backend_stub"
# The supervisor's defaults, which the launcher's flags show (--hang-timeout, --max-restarts).
DEFAULT_HANG_TIMEOUT_S = 8.0
DEFAULT_MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
# What Triton answers once it has found a stub unresponsive (e.g. stopped): names the instance.
UNHEALTHY_STUB = re.compile(r"Stub process '([^']+)' is not healthy")


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str
    version: int = 1

    @property
    def key(self) -> str:
        """The instance of one version: every version of a model has the same instance names."""
        return f"{self.instance}@{self.version}"


def stubs_of(server_pid: int) -> list[Stub]:
    """The live Python-backend stubs of a tritonserver process (zombies excluded)."""
    out: list[Stub] = []
    try:
        children = psutil.Process(server_pid).children()
    except psutil.NoSuchProcess:
        return out
    for p in children:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        # stub <repo>/<model>/<version>/model.py <shm region> ... <instance name> <mode>
        if cmd and os.path.basename(cmd[0]) == STUB_BINARY and len(cmd) > 8:
            version_dir = os.path.dirname(cmd[1])
            version = os.path.basename(version_dir)
            model = os.path.basename(os.path.dirname(version_dir))
            if cmd[8] == model:
                # The model's own stub, not an instance's: Triton runs it while it loads the
                # model (config auto-complete) and ends it; its going away is no failure.
                continue
            out.append(Stub(p.pid, model, cmd[8], int(version) if version.isdigit() else 1))
    return out


def stub_cpu(stubs: list[Stub]) -> dict[str, float]:
    """CPU seconds used so far by each stub (instance name -> seconds)."""
    out: dict[str, float] = {}
    for s in stubs:
        try:
            t = psutil.Process(s.pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[s.instance] = t.user + t.system
    return out


class GiveUp(RuntimeError):
    """Recovery failed too often; the launcher exits and lets its own manager act."""


class Supervisor:
    """Supervises one TritonServer started with model control mode explicit.

    `probe` (a BackgroundProbe, or anything with poll/reset) reports tiny real captions:
    None when one came back (an overload refusal counts as alive), else the failure."""

    def __init__(
        self,
        server: TritonServer,
        probe,
        control,  # launcher.control.ModelControl (or anything with load/unload_model and the index)
        *,
        loader=None,  # the client for load_model: loading may take long, the other calls must not
        interval_s: float = 0.5,
        hang_timeout_s: float = DEFAULT_HANG_TIMEOUT_S,
        probe_failures: int = 3,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        headers: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.server, self.probe, self.control = server, probe, control
        self.loader = loader or control
        self.interval_s = interval_s
        self.hangs = HangWatch(hang_timeout_s)
        self.probe_failures, self.max_restarts = probe_failures, max_restarts
        self.restart_window_s, self.backoff_s, self.max_backoff_s = restart_window_s, backoff_s, max_backoff_s
        self.headers = headers or {}
        self.clock = clock
        self.expected: dict[str, set[str]] = {}  # model -> its stubs' keys (instance@version)
        self.restarts: list[float] = []
        self.failed_probes = 0
        self.events: list[dict] = []  # what happened, for reports and tests
        # Called with (kind, info) on every event: the launcher's metrics (launcher.metrics).
        self.on_event: Callable[[str, dict], None] | None = None
        self._stopping: Callable[[], bool] = lambda: False

    # -- bookkeeping ---------------------------------------------------------------------
    def _server_pid(self) -> int:
        if self.server.process is None:
            raise RuntimeError("tritonserver is not running")
        return self.server.process.pid

    def _event(self, kind: str, **info) -> None:
        info = {"t": time.time(), "event": kind, **info}
        self.events.append(info)
        log.warning("%s %s", kind, " ".join(f"{k}={v}" for k, v in info.items() if k not in ("t", "event")))
        if self.on_event is not None:
            self.on_event(kind, info)

    def snapshot(self) -> None:
        """Record the stubs of a healthy server: the set a later check compares with."""
        self.expected = {}
        for s in stubs_of(self._server_pid()):
            self.expected.setdefault(s.model, set()).add(s.key)
        self.hangs.reset()
        self.failed_probes = 0
        self.probe.reset()

    # -- checks --------------------------------------------------------------------------
    def model_of(self, instance: str) -> str | None:
        """The model of an instance name, with or without its version (Triton's messages name
        the instance only)."""
        name = instance.partition("@")[0]
        return next((m for m, keys in self.expected.items() if any(k.partition("@")[0] == name for k in keys)), None)

    def follow_versions(self) -> None:
        """Match the watched stubs to the versions Triton has loaded now: drop those of a
        version no longer READY (unloaded on purpose: a rollout's old version), add those of
        a READY version not watched yet (a rollout's new one). Skipped when the index cannot
        be read, or does not say versions."""
        try:
            index = self.control.get_model_repository_index(headers=self.headers)
        except Exception:  # noqa: BLE001 - the other checks still run; the next round asks again
            return
        ready: dict[str, set[int]] = {}
        for m in index:
            if m.get("state") == "READY" and str(m.get("version", "")).isdigit():
                ready.setdefault(m["name"], set()).add(int(m["version"]))
        if not ready:
            return
        stubs = stubs_of(self._server_pid())
        for model in list(self.expected):
            keep = {k for k in self.expected[model] if int(k.partition("@")[2] or 1) in ready.get(model, set())}
            if keep != self.expected[model]:
                self.expected[model] = keep
        for s in stubs:
            if s.version in ready.get(s.model, set()) and not any(
                k.endswith(f"@{s.version}") for k in self.expected.get(s.model, set())
            ):
                new = {t.key for t in stubs if t.model == s.model and t.version == s.version}
                self.expected.setdefault(s.model, set()).update(new)
                self._event("version_watched", model=s.model, version=s.version, stubs=len(new))

    def dead_models(self) -> dict[str, str]:
        """model -> why, for models whose stubs are not all alive."""
        alive: dict[str, set[str]] = {}
        for s in stubs_of(self._server_pid()):
            alive.setdefault(s.model, set()).add(s.key)
        return {
            m: f"stub {', '.join(sorted(want - alive.get(m, set())))} gone"
            for m, want in self.expected.items()
            if want - alive.get(m, set())
        }

    def hung_models(self) -> dict[str, str]:
        import urllib.request

        names = ("nv_inference_pending_request_count", "nv_inference_exec_count")
        t, hung = self.hangs.timeout_s, {}
        stubs = stubs_of(self._server_pid())  # one scan of the process table per round
        cpu = stub_cpu(stubs)
        try:
            with urllib.request.urlopen(self.server.metrics_url, timeout=2) as r:
                m = parse_metrics(r.read().decode(), names)
        except OSError:
            m = None  # the per-instance clocks below need no metrics
        if m is not None:
            # An ensemble executes nothing itself: only models with stubs can hang.
            executions = {k: v for k, v in m[names[1]].items() if k in self.expected}
            model_cpu: dict[str, float] = {}
            for s in stubs:
                model_cpu[s.model] = model_cpu.get(s.model, 0.0) + cpu.get(s.instance, 0.0)
            hung = {
                model: f"no execution for {t:g} s with requests pending"
                for model in self.hangs.update(m[names[0]], executions, self.clock(), model_cpu)
            }
        live, now = {s.instance: s.pid for s in stubs}, time.monotonic()
        for kind, stamps, why in (
            ("execute", executing_since, "inside one execute"),
            ("heartbeat", heartbeats, "silent (no heartbeat)"),
        ):
            for instance in self.hangs.instances(stamps(self.server.executing_dir), live, now, cpu, kind):
                model = self.model_of(instance)
                if model is not None:
                    hung.setdefault(model, f"stub {instance} {why} for over {t:g} s")
        return hung

    def check(self) -> str | None:
        """One round: None when healthy or repaired, else what was repaired (for tests)."""
        if not self.server.running():
            code = self.server.process.returncode if self.server.process else None
            self._event("server_exited", code=code)
            self.restart(f"tritonserver exited with code {code}")
            return "restarted"
        self.follow_versions()
        broken = self.dead_models()
        for m, why in self.hung_models().items():
            broken.setdefault(m, why)
        if broken:
            self.repair(broken)
            return "repaired"
        for failure in self.probe.poll():
            if failure is None:
                self.failed_probes = 0
                continue
            named = UNHEALTHY_STUB.search(failure)
            instance = named.group(1) if named else None
            model = self.model_of(instance) if instance is not None else None
            if model is not None:
                self.repair({model: f"Triton reports stub {instance} not healthy"})
                return "repaired"
            self.failed_probes += 1
            self._event("probe_failed", n=self.failed_probes, reason=failure[:200])
            if self.failed_probes >= self.probe_failures:
                self.restart(f"{self.failed_probes} probes failed: {failure[:200]}")
                return "restarted"
        return None

    # -- actions -------------------------------------------------------------------------
    def repair(self, broken: dict[str, str]) -> None:
        started = self.clock()
        for model, why in broken.items():
            self._event("model_broken", model=model, why=why)
        try:
            for model in broken:
                # Unload first: readiness turns false while the model is away.
                self.control.unload_model(model, headers=self.headers)
            for s in stubs_of(self._server_pid()):
                if s.model in broken:  # a hung stub never finishes its unload on its own
                    _kill(s.pid)
            # No waiting for the unload: with a dead stub it lasts the Python backend's stub
            # timeout (30 s); the new instance loads beside the old one going away.
            for model in broken:
                self.loader.load_model(model, headers=self.headers)
            self._load_all()
        except Exception as e:  # noqa: BLE001 - any failure to reload means a restart
            self._event("reload_failed", error=f"{type(e).__name__}: {e}"[:300])
            self.restart(f"reload of {', '.join(broken)} failed")
            return
        self.snapshot()
        self._event("model_reloaded", models=",".join(broken), seconds=round(self.clock() - started, 2))

    def _load_all(self) -> None:
        """Everything in the repository back to READY (the ensemble was unloaded with its step).
        A model with one version READY is loaded (versions unloaded on purpose stay listed)."""
        index = self.control.get_model_repository_index(headers=self.headers)
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        for name in dict.fromkeys(m["name"] for m in index):
            if name not in ready:
                self.loader.load_model(name, headers=self.headers)

    def restart(self, why: str) -> None:
        if self._stopping():
            return  # the launcher is draining: a server going away now is no crash
        now = self.clock()
        self.restarts = [t for t in self.restarts if now - t < self.restart_window_s]
        if len(self.restarts) >= self.max_restarts:
            self._event("give_up", why=why, restarts=len(self.restarts))
            raise GiveUp(f"{len(self.restarts)} restarts within {self.restart_window_s:g} s; last: {why}")
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** len(self.restarts)) if self.restarts else 0.0
        self.restarts.append(now)
        self._event("restart", why=why, attempt=len(self.restarts), backoff_s=delay)
        self.server.kill()  # a broken server is not drained; its orphaned stubs go too
        time.sleep(delay)
        started = self.clock()
        try:
            self.server.start(keep_ports=True)
        except ServerError as e:
            self._event("restart_failed", error=str(e).splitlines()[0][:300])
            return  # the next check sees the server down and tries again, backed off
        self.snapshot()
        self._event("restarted", seconds=round(self.clock() - started, 2))

    def run(self, stopping: Callable[[], bool]) -> None:
        """Check every interval until `stopping()`; raises GiveUp."""
        self._stopping = stopping
        self.snapshot()
        while not stopping():
            try:
                self.check()
            except GiveUp:
                raise
            except Exception:  # noqa: BLE001 - a bug in one round must not end supervision
                log.exception("supervision round failed; continuing")
            time.sleep(self.interval_s)


def drain(control, model: str, timeout_s: float, headers: dict[str, str] | None = None) -> bool:
    """Stop admitting new requests and let the accepted ones finish, before tritonserver is
    asked to stop. Triton's own shutdown refuses the *next step* of an ensemble request
    already in flight ("Server is stopping"), so in-flight captions of a slow model are
    lost. Unloading the ensemble instead turns readiness false,
    answers new requests NOT_FOUND (clients retry elsewhere) and keeps the composing
    models serving the steps of those in flight until the last one is done. True when
    they all finished within timeout_s."""
    control.unload_model(model, headers=headers or {})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = {m["name"]: m.get("state") for m in control.get_model_repository_index(headers=headers or {})}
        if states.get(model) not in ("READY", "UNLOADING"):
            return True
        time.sleep(0.05)
    return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
