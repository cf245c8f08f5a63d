"""python -m monitor: `make monitor`. Prometheus (127.0.0.1:9090) and Alertmanager
(127.0.0.1:9093), from Debian's packages, with the project's rules, scraping what
`make serve` (REPLICAS=N) serves: every replica's tritonserver metrics port and the
launcher's own exporter. Configuration and data under artifacts/monitor/; Ctrl-C or
SIGTERM stops both.

    with Monitor(work, replicas=1, ...) as m:     # started and ready
        m.alerts()                                # Alertmanager's /api/v2/alerts
        m.query("up")                             # Prometheus' /api/v1/query
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from captioner.cli import env
from captioner.signals import StopFlag
from launcher.tritonserver import DEFAULT_PORTS, PROJECT_ROOT

from . import config

DEFAULT_WORK = PROJECT_ROOT / "artifacts" / "monitor"
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
SETUP_HINT = "make monitor-setup installs Debian's prometheus and prometheus-alertmanager (as root)"


class MonitorError(RuntimeError):
    pass


def binaries() -> dict[str, str]:
    """prometheus and alertmanager on PATH (Debian names the latter prometheus-alertmanager)."""
    found = {
        "prometheus": shutil.which("prometheus"),
        "alertmanager": shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise MonitorError(f"{' and '.join(missing)} not on PATH: {SETUP_HINT}")
    return {k: str(v) for k, v in found.items()}


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read().decode()
    return json.loads(body) if body.strip().startswith(("{", "[")) else body


class Monitor:
    """Prometheus and Alertmanager as child processes. `rules_for`: replace every alert's
    `for:` (tests); intervals as Prometheus durations."""

    def __init__(
        self,
        work: Path = DEFAULT_WORK,
        replicas: int = 1,
        metrics_port: int = DEFAULT_PORTS["metrics"],
        supervisor_port: int | None = None,
        host: str = "127.0.0.1",
        prometheus_port: int = PROMETHEUS_PORT,
        alertmanager_port: int = ALERTMANAGER_PORT,
        scrape_interval: str = "15s",
        evaluation_interval: str = "15s",
        rules_for: str | None = None,
        group_wait: str = "10s",
    ):
        self.work = Path(work)
        self.host = "127.0.0.1"  # the UIs: local only
        self.prometheus_url = f"http://{self.host}:{prometheus_port}"
        self.alertmanager_url = f"http://{self.host}:{alertmanager_port}"
        self._ports = (prometheus_port, alertmanager_port)
        self.replicas, self.metrics_port, self.supervisor_port, self.target_host = replicas, metrics_port, supervisor_port, host
        self.scrape_interval, self.evaluation_interval = scrape_interval, evaluation_interval
        self.rules_for, self.group_wait = rules_for, group_wait
        self.processes: dict[str, subprocess.Popen] = {}

    # -- files ---------------------------------------------------------------------------
    def write_config(self) -> Path:
        cfg_dir = self.work / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        rules_file = config.RULES
        if self.rules_for is not None:
            rules_file = cfg_dir / "captioner.rules.yml"
            rules_file.write_text(config.dump(config.with_for(config.load_rules(), self.rules_for)))
        prom = config.prometheus_config(
            replicas=self.replicas,
            host=self.target_host,
            metrics_port=self.metrics_port,
            supervisor_port=self.supervisor_port,
            rule_files=(str(rules_file),),
            alertmanager=f"{self.host}:{self._ports[1]}",
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
        )
        (cfg_dir / "prometheus.yml").write_text(config.dump(prom))
        (cfg_dir / "alertmanager.yml").write_text(config.dump(config.alertmanager_config(group_wait=self.group_wait)))
        return cfg_dir

    # -- processes -----------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> Monitor:
        bins = binaries()
        for name, port in zip(("Prometheus", "Alertmanager"), self._ports):
            if _port_taken(self.host, port):
                raise MonitorError(
                    f"{self.host}:{port} is taken ({name} already running? a Debian service started on install: "
                    f"systemctl stop {'prometheus' if name == 'Prometheus' else 'prometheus-alertmanager'})"
                )
        cfg = self.write_config()
        data = self.work / "data"
        (data / "prometheus").mkdir(parents=True, exist_ok=True)
        (data / "alertmanager").mkdir(parents=True, exist_ok=True)
        self._spawn(
            "alertmanager",
            [
                bins["alertmanager"],
                f"--config.file={cfg / 'alertmanager.yml'}",
                f"--storage.path={data / 'alertmanager'}",
                f"--web.listen-address={self.host}:{self._ports[1]}",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
        )
        self._spawn(
            "prometheus",
            [
                bins["prometheus"],
                f"--config.file={cfg / 'prometheus.yml'}",
                f"--storage.tsdb.path={data / 'prometheus'}",
                f"--web.listen-address={self.host}:{self._ports[0]}",
                "--storage.tsdb.retention.time=15d",
                "--web.enable-lifecycle",
            ],
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {"prometheus": f"{self.prometheus_url}/-/ready", "alertmanager": f"{self.alertmanager_url}/-/ready"}
        while pending:
            for name, url in list(pending.items()):
                proc = self.processes[name]
                if proc.poll() is not None:
                    raise MonitorError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
                try:
                    _get(url, timeout=2)
                    del pending[name]
                except (urllib.error.URLError, OSError):
                    pass
            if pending and time.monotonic() > deadline:
                raise MonitorError(f"{', '.join(pending)} not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.work / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes = {}

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- reading -------------------------------------------------------------------------
    def query(self, promql: str) -> list[dict]:
        """An instant query's result vector; raises MonitorError on a query error."""
        out = _get(f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=10)
        if out.get("status") != "success":
            raise MonitorError(f"{promql}: {out.get('error')}")
        return out["data"]["result"]

    def targets(self) -> list[dict]:
        return _get(f"{self.prometheus_url}/api/v1/targets", timeout=10)["data"]["activeTargets"]

    def alerts(self) -> list[dict]:
        """What Alertmanager holds (firing alerts Prometheus sent it)."""
        return _get(f"{self.alertmanager_url}/api/v2/alerts", timeout=10)


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m monitor", description=__doc__.splitlines()[0])
    p.add_argument(
        "--replicas", type=int, default=env("CAPTIONER_REPLICAS", 1, int), help="replicas make serve runs [$CAPTIONER_REPLICAS]"
    )
    p.add_argument("--host", default="127.0.0.1", help="where the servers listen (make serve's --host)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=env("CAPTIONER_METRICS_PORT", DEFAULT_PORTS["metrics"], int),
        help="replica 0's metrics port (make serve's) [$CAPTIONER_METRICS_PORT]",
    )
    p.add_argument(
        "--supervisor-metrics-port",
        type=int,
        default=env("CAPTIONER_SUPERVISOR_METRICS_PORT", None, int),
        help="the launcher's exporter; default the metrics port + 1 [$CAPTIONER_SUPERVISOR_METRICS_PORT]",
    )
    p.add_argument("--prometheus-port", type=int, default=PROMETHEUS_PORT)
    p.add_argument("--alertmanager-port", type=int, default=ALERTMANAGER_PORT)
    p.add_argument("--scrape-interval", default="15s")
    p.add_argument("--evaluation-interval", default="15s")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="configuration, data and logs")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("--replicas must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stop = StopFlag().install()
    m = Monitor(
        a.work,
        replicas=a.replicas,
        metrics_port=a.metrics_port,
        supervisor_port=a.supervisor_metrics_port,
        host=a.host,
        prometheus_port=a.prometheus_port,
        alertmanager_port=a.alertmanager_port,
        scrape_interval=a.scrape_interval,
        evaluation_interval=a.evaluation_interval,
    )
    try:
        m.start()
    except (MonitorError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"Prometheus   {m.prometheus_url}   (rules: {config.RULES.relative_to(PROJECT_ROOT)})", flush=True)
        print(f"Alertmanager {m.alertmanager_url}", flush=True)
        print(f"Scraping {a.replicas} replica(s) from {a.host}:{a.metrics_port} and the supervisor; data in {a.work}", flush=True)
        print("Dashboard: import deploy/monitoring/dashboard.json into Grafana. Ctrl-C stops both.", flush=True)
        while not stop.wait(1.0):
            dead = [n for n, p in m.processes.items() if p.poll() is not None]
            if dead:
                print(f"error: {dead[0]} exited:\n{m.log_tail(dead[0])}", file=sys.stderr)
                return 1
        return 0
    finally:
        m.stop()
        print("Stopped Prometheus and Alertmanager.", flush=True)
