"""The server under test: `python -m launcher --no-build` on free ports, as an operator
runs it (supervised, model control explicit), serving once Triton's readiness endpoint
says ready and the launcher's own supervisor-metrics endpoint answers (it opens that
right before its supervisors start), and the handles a fault needs (tritonserver, its
Python stubs, their memory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from client.readiness import http_ready
from launcher.supervisor import stubs_of
from launcher.tritonserver import PROJECT_ROOT, free_ports

STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0


class Launcher:
    """`python -m launcher --no-build` on free ports; `with` waits until it is ready and
    stops it (SIGTERM, then SIGKILL of its process group) afterwards."""

    def __init__(self, repo: Path, log_dir: Path, name: str, extra: tuple[str, ...] = ()):
        self.ports = free_ports({"grpc": 0, "http": 0, "metrics": 0, "supervisor_metrics": 0})
        self.log = log_dir / f"faults-{name}-launcher.log"
        self.server_log = log_dir / f"faults-{name}-tritonserver.log"
        self.cmd = [
            sys.executable,
            "-m",
            "launcher",
            "--no-build",
            "--repo",
            str(repo),
            "--samples",
            "0",
            "--grpc-port",
            str(self.ports["grpc"]),
            "--http-port",
            str(self.ports["http"]),
            "--metrics-port",
            str(self.ports["metrics"]),
            "--supervisor-metrics-port",
            str(self.ports["supervisor_metrics"]),
            "--log-file",
            str(self.server_log),
            *extra,
        ]
        self._proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def proc(self) -> subprocess.Popen:
        """The launcher's process (started by `with`)."""
        if self._proc is None:
            raise RuntimeError("the launcher is not started: use it in `with`")
        return self._proc

    def __enter__(self) -> Launcher:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "w")
        self._proc = subprocess.Popen(
            self.cmd, cwd=PROJECT_ROOT, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self.wait_ready(STARTUP_TIMEOUT_S)
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until the launcher serves (`serving()`); an exit first is an error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.serving():
                return
            time.sleep(0.2)
        raise RuntimeError(f"launcher not ready after {timeout_s:.0f} s: {self.log}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()

    def ready(self) -> bool:
        """Triton's readiness, as a load balancer sees it."""
        return http_ready(self.http_url)

    def serving(self) -> bool:
        """Ready, and the launcher past its start-up: its supervisor-metrics endpoint,
        opened just before the supervisors start, answers."""
        return self.ready() and http_ready(f"127.0.0.1:{self.ports['supervisor_metrics']}", "/metrics")

    def tritonserver(self) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children():
            if child.name() == "tritonserver":
                return child
        raise RuntimeError("no tritonserver under the launcher")

    def stub_models(self) -> list[str]:
        """The models on a caption's path that run in their own stub (the fused CPU
        layout has no encoder model: preprocess runs it; the whole layout has preprocess
        alone)."""
        have = {s.model for s in stubs_of(self.tritonserver().pid)}
        return [m for m in ("preprocess", "encoder", "caption_generator") if m in have]

    def encoder_model(self) -> str:
        """The model that runs the encoder: its own, or preprocess (fused, whole)."""
        return "encoder" if "encoder" in self.stub_models() else "preprocess"

    def stub(self, model: str) -> int:
        pids = [s.pid for s in stubs_of(self.tritonserver().pid) if s.model == model]
        if not pids:
            raise RuntimeError(f"no stub for {model}")
        return pids[0]

    def stop_stub(self, model: str, inside: bool = True, wait_s: float = 10.0) -> tuple[int, bool | None]:
        """SIGSTOP a stub of `model` while it is inside an execute (`inside`; its
        ExecuteClock file says so: an execute that never returns), or while it is between
        executes (a process frozen while idle: Triton finds it only when it next sends it
        work). After `wait_s` without such a moment the first stub is stopped as it is.
        Returns (pid, whether it was inside an execute; None: not known)."""
        from captioner.serving.triton import EXECUTING_DIR_ENV, executing_since

        ts = self.tritonserver()
        folder = ts.environ().get(EXECUTING_DIR_ENV)
        deadline = time.monotonic() + wait_s
        while folder and time.monotonic() < deadline:
            live = {s.instance: s.pid for s in stubs_of(ts.pid) if s.model == model}
            busy = {i for i, (pid, _) in executing_since(folder).items() if live.get(i) == pid}
            for instance, pid in live.items():
                if (instance in busy) != inside:
                    continue
                os.kill(pid, signal.SIGSTOP)
                # The execute may have ended (or begun) between the read and the stop:
                # executes can be a millisecond long. A stopped stub cannot touch its
                # file, so this second read is certain.
                now = executing_since(folder).get(instance)
                if (now is not None and now[0] == pid) == inside:
                    return pid, inside
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
        pid = self.stub(model)
        os.kill(pid, signal.SIGSTOP)
        return pid, None

    def rss_mb(self) -> float:
        ts = self.tritonserver()
        return sum(p.memory_info().rss for p in [ts] + ts.children()) / 2**20

    def supervisor_events(self) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if "launcher.supervisor" in ln]
