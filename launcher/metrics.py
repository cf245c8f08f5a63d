"""The launcher's own Prometheus metrics: what the supervisor saw and did, which Triton's
metrics port cannot say (it runs outside tritonserver, and survives its restarts).

Served by prometheus_client on `--supervisor-metrics-port` (default: the metrics port + 1,
free of every replica's ports), one exporter for all the replicas of one launcher, each
series labelled `replica` (0 .. N-1). Every label takes a fixed, small set of values:

- `captioner_supervisor_repairs_total{replica, model, cause}`: models found broken and
  reloaded (or tried to be); cause: stub_died, stub_hung, stub_unhealthy, other.
- `captioner_supervisor_restarts_total{replica, cause}`: tritonserver restarts; cause:
  server_exited, probe_failed, reload_failed, other.
- `captioner_probe_total{replica, result}`: deep probes (one real caption through the
  ensemble every 2 s); result: ok, shed (refused as overloaded: alive), failed.
- `captioner_probe_duration_seconds{replica}`: histogram of the answered (ok) probes'
  end-to-end time, queues included: the project's end-to-end latency histogram (Triton
  2.51 has none: only cumulative durations and, with --metrics-config
  summary_latencies=true, per-replica summaries).
- `captioner_replica_ready{replica}`: 1 when tritonserver answers ready (asked at scrape).
- `captioner_supervisor_gave_up{replica}`: 1 once the supervisor has given up.
- `captioner_model_info{replica, checkpoint, target, precision, layout, encoder_runtime}`:
  1, from the parameters the builder writes in the ensemble's config.pbtxt.

Every series exists from the start at 0, so that increase() sees the first repair.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

REPAIR_CAUSES = ("stub_died", "stub_hung", "stub_unhealthy", "other")
RESTART_CAUSES = ("server_exited", "probe_failed", "reload_failed", "other")
PROBE_RESULTS = ("ok", "shed", "failed")
# Seconds; the objective (deploy/monitoring, docs/monitoring.md) must be one of them.
PROBE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

# What launcher.supervisor writes in its events' `why`, mapped to a cause.
_REPAIR_WHY = (
    (re.compile(r"^stub .* gone$"), "stub_died"),
    (re.compile(r"^no execution for .* with requests pending$|inside one execute|silent \(no heartbeat\)"), "stub_hung"),
    (re.compile(r"^Triton reports stub .* not healthy$"), "stub_unhealthy"),
)
_RESTART_WHY = (
    (re.compile(r"^tritonserver exited"), "server_exited"),
    (re.compile(r"^\d+ probes failed"), "probe_failed"),
    (re.compile(r"^reload of .* failed$"), "reload_failed"),
)


def _classify(why: str, table) -> str:
    return next((cause for pattern, cause in table if pattern.search(why)), "other")


def repair_cause(why: str) -> str:
    return _classify(why, _REPAIR_WHY)


def restart_cause(why: str) -> str:
    return _classify(why, _RESTART_WHY)


INFO_LABELS = ("checkpoint", "target", "precision", "layout", "encoder_runtime")
_PARAMETER = re.compile(r'key:\s*"(\w+)"\s*value\s*\{\s*string_value:\s*"([^"]*)"')


def model_info(repo: str | Path) -> dict[str, str] | None:
    """Labels of captioner_model_info: what the builder recorded in the ensemble's
    config.pbtxt parameters (checkpoint sha256, first 12 hex digits), or None without one."""
    try:
        text = (Path(repo) / "captioner" / "config.pbtxt").read_text()
    except OSError:
        return None
    params = dict(_PARAMETER.findall(text))
    info = {k: params.get(k if k != "checkpoint" else "checkpoint_sha256", "") for k in INFO_LABELS}
    info["checkpoint"] = info["checkpoint"][:12]
    return info


class _Readiness:
    """captioner_replica_ready, asked of each replica when Prometheus scrapes."""

    def __init__(self) -> None:
        self.replicas: dict[str, Callable[[], bool]] = {}

    def collect(self):
        g = GaugeMetricFamily(
            "captioner_replica_ready", "1 when tritonserver answers ready (strict readiness)", labels=["replica"]
        )
        for replica, ready in sorted(self.replicas.items()):
            try:
                g.add_metric([replica], 1.0 if ready() else 0.0)
            except Exception:  # noqa: BLE001 - a scrape must not fail on one replica
                g.add_metric([replica], 0.0)
        yield g


class LauncherMetrics:
    """The registry and its families; `replica(k, ...)` gives one replica's recorder."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.repairs = Counter(
            "captioner_supervisor_repairs",
            "Models the supervisor found broken and reloaded",
            ["replica", "model", "cause"],
            registry=r,
        )
        self.restarts = Counter(
            "captioner_supervisor_restarts", "tritonserver restarts by the supervisor", ["replica", "cause"], registry=r
        )
        self.probes = Counter(
            "captioner_probe", "Deep probes (a real caption through the ensemble) by result", ["replica", "result"], registry=r
        )
        self.probe_seconds = Histogram(
            "captioner_probe_duration_seconds",
            "End-to-end time of answered deep probes, queues included",
            ["replica"],
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.gave_up = Gauge("captioner_supervisor_gave_up", "1 once the supervisor has given up", ["replica"], registry=r)
        self.info = Gauge(
            "captioner_model_info",
            "The served build (the ensemble's config.pbtxt parameters)",
            ["replica", *INFO_LABELS],
            registry=r,
        )
        self._ready = _Readiness()
        r.register(self._ready)
        self._server: Any = None  # the WSGI server start_http_server made

    def replica(
        self, k: int, models: list[str], ready: Callable[[], bool] | None = None, repo: str | Path | None = None
    ) -> ReplicaMetrics:
        return ReplicaMetrics(self, str(k), models, ready, repo)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class ReplicaMetrics:
    """One replica's series. `event` is the supervisor's hook (Supervisor.on_event);
    `probe` is the deep probe's (launcher.captions.http_probe's observe)."""

    def __init__(
        self, parent: LauncherMetrics, replica: str, models: list[str], ready: Callable[[], bool] | None, repo: str | Path | None
    ):
        self.m, self.replica = parent, replica
        for model in models:
            for cause in REPAIR_CAUSES:
                parent.repairs.labels(replica, model, cause)
        for cause in RESTART_CAUSES:
            parent.restarts.labels(replica, cause)
        for result in PROBE_RESULTS:
            parent.probes.labels(replica, result)
        parent.probe_seconds.labels(replica)
        parent.gave_up.labels(replica).set(0)
        if ready is not None:
            parent._ready.replicas[replica] = ready
        info = model_info(repo) if repo is not None else None
        if info:
            parent.info.labels(replica, *info.values()).set(1)

    def event(self, kind: str, info: dict) -> None:
        if kind == "model_broken":
            self.m.repairs.labels(self.replica, str(info.get("model")), repair_cause(str(info.get("why", "")))).inc()
        elif kind == "restart":
            self.m.restarts.labels(self.replica, restart_cause(str(info.get("why", "")))).inc()
        elif kind == "give_up":
            self.m.gave_up.labels(self.replica).set(1)

    def probe(self, result: str, seconds: float) -> None:
        if result not in PROBE_RESULTS:
            raise ValueError(f"probe result must be one of {PROBE_RESULTS}, got {result!r}")
        self.m.probes.labels(self.replica, result).inc()
        if result == "ok":
            self.m.probe_seconds.labels(self.replica).observe(seconds)
