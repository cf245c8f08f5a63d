"""Start and stop a peer server the way the bench starts the naive one: a subprocess (the
peer's own venv python, the project root on PYTHONPATH so captioner/ imports) on a free
port, a readiness wait, and teardown of its whole process tree.

The command lines are spelled here once (`server_command`), the frameworks' settings
in each server module's docstring."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from .venv import PEERS, ROOT

MODULES = {"ray": "bench.peers.ray_server", "litserve": "bench.peers.litserve_server", "mlserver": "bench.peers.mlserver_server"}
PROTOCOL = {"ray": "http", "litserve": "http", "mlserver": "grpc"}
# The batcher's wait for company: none, the Triton stack's policy (a batch is whatever
# queued while the last one ran), where the framework allows it; MLServer batches only
# with a positive max_batch_time.
DEFAULT_BATCH_WAIT_MS = {"ray": 0.0, "litserve": 0.0, "mlserver": 1.0}


@dataclass(frozen=True)
class PeerConfig:
    """How a peer is sized: worker processes (replicas), intra-op threads per engine in
    each, the batcher's max batch and its wait for company."""

    workers: int = 2
    threads: int = 1
    max_batch_size: int = 32
    batch_wait_ms: float | None = None  # None: DEFAULT_BATCH_WAIT_MS of the peer

    def __post_init__(self):
        if self.workers < 1 or self.threads < 1 or self.max_batch_size < 1:
            raise ValueError(f"workers, threads and max_batch_size must be >= 1: {self}")
        if self.batch_wait_ms is not None and self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


def batch_wait_ms(name: str, cfg: PeerConfig) -> float:
    return DEFAULT_BATCH_WAIT_MS[name] if cfg.batch_wait_ms is None else cfg.batch_wait_ms


def server_command(
    name: str,
    python: str | Path,
    spec: str | Path,
    port: int,
    cfg: PeerConfig,
    batch_log_dir: str | Path | None = None,
    grpc_port: int | None = None,
) -> list[str]:
    """The peer's command line. MLServer also needs `grpc_port` (it serves V2 over gRPC
    and its REST port, unused, on `port`)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    cmd = [
        str(python),
        "-m",
        MODULES[name],
        "--spec",
        str(spec),
        "--port",
        str(port),
        "--workers",
        str(cfg.workers),
        "--threads",
        str(cfg.threads),
        "--max-batch-size",
        str(cfg.max_batch_size),
        "--batch-wait-ms",
        f"{batch_wait_ms(name, cfg):g}",
    ]
    if PROTOCOL[name] == "grpc":
        if grpc_port is None:
            raise ValueError(f"{name} serves gRPC: give grpc_port")
        cmd += ["--grpc-port", str(grpc_port)]
    if batch_log_dir is not None:
        cmd += ["--batch-log-dir", str(batch_log_dir)]
    return cmd


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The peer's environment: the project root first on PYTHONPATH."""
    base = dict(os.environ if base is None else base)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    return base


def free_ports(n: int) -> list[int]:
    """n distinct free ports (sockets held open together so none is handed out twice)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PeerServer:
    """One peer in a subprocess; a context manager. `url` (HTTP peers) or `grpc_url`."""

    def __init__(
        self,
        name: str,
        python: str | Path,
        spec: str | Path,
        cfg: PeerConfig = PeerConfig(),
        log_path: str | Path | None = None,
        batch_log_dir: str | Path | None = None,
        startup_timeout: float = 240.0,
    ):
        self.name, self.python, self.spec, self.cfg = name, python, spec, cfg
        self.port, self.grpc_port = free_ports(2)
        self.log_path, self.batch_log_dir = log_path, batch_log_dir
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | int | None = None  # the log file, subprocess.DEVNULL or None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def command(self) -> list[str]:
        return server_command(
            self.name,
            self.python,
            self.spec,
            self.port,
            self.cfg,
            self.batch_log_dir,
            self.grpc_port if PROTOCOL[self.name] == "grpc" else None,
        )

    def start(self) -> PeerServer:
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # A session of its own: the peer's helpers (Ray's raylet and workers, MLServer's
        # pool) are torn down with it, and a Ctrl-C at the bench reaches the bench only.
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=server_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        if PROTOCOL[self.name] == "grpc":
            import tritonclient.grpc as grpcclient

            try:
                with grpcclient.InferenceServerClient(self.grpc_url) as c:
                    return bool(c.is_model_ready("captioner"))
            except Exception:
                return False
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None  # start() launched it before waiting
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} peer exited with {proc.returncode} (log: {self.log_path})")
            if self.ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} peer not ready after {self.startup_timeout:.0f} s (log: {self.log_path})")

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        """SIGTERM to the peer (it shuts its framework down), then SIGKILL to whatever of
        its process tree is left after 30 s."""
        if self.proc is None:
            return
        try:
            tree = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs([p for p in tree if p.pid != self.proc.pid], timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self._log is not None and not isinstance(self._log, int):  # an int is DEVNULL
            self._log.close()
        self._log = None

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
