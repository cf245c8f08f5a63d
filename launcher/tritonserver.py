"""Start and stop a real `tritonserver` on a model repository.

    with TritonServer("model_repository") as server:   # free local ports, waits until ready
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

The binary is the `tritonserver` on PATH when there is one (e.g. the NGC image),
otherwise the one inside the nvidia-pytriton wheel, which needs a backend directory
holding the Python backend and the stub for this interpreter, and the wheel's bundled
libraries on LD_LIBRARY_PATH. PYTHONPATH gets the project root so that the Python
models can `import captioner`.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from captioner.serving.triton import EXECUTING_DIR_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# glibc malloc settings for tritonserver and its stubs (docs/operations.md, memory): blocks
# under 16 MiB come from the heap and up to 64 MiB of freed heap stays in the process, so
# the megabytes a photo's decode allocates and frees per image are reused, not handed back
# to the kernel and page-faulted in again on the next request. An operator's own
# GLIBC_TUNABLES replaces these.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=16777216:glibc.malloc.trim_threshold=67108864"


class ServerError(RuntimeError):
    """tritonserver did not come up; the message carries the end of its log."""


@dataclass(frozen=True)
class Binary:
    path: Path
    wheel_root: Path | None  # the wheel's `pytriton/tritonserver` when the binary comes from it


def _wheel_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_binary() -> Binary:
    """PATH first, else the nvidia-pytriton wheel's binary."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Binary(Path(on_path), None)
    root = _wheel_root()
    if root is None:
        raise ServerError("no tritonserver on PATH and nvidia-pytriton is not installed (make setup installs it)")
    return Binary(root / "bin" / "tritonserver", root)


def make_backend_dir(wheel_root: Path, dest: Path) -> Path:
    """A --backend-directory holding the wheel's Python backend and this Python's stub."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no Python backend stub for Python {py}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        wheel_root / "backends" / "python" / "libtriton_python.so",
        wheel_root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        link = python_dir / src.name
        if not link.exists():
            link.symlink_to(src)
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(wanted: dict[str, int], host: str = "127.0.0.1") -> dict[str, int]:
    """`wanted` with every 0 replaced by a free port, all of them distinct: a port just
    released can come back from the next bind (seen in CI: gRPC and metrics got the same
    one, and tritonserver refused to start)."""
    out, taken = {}, {p for p in wanted.values() if p}
    for name, port in wanted.items():
        while not port or (port in taken and not wanted[name]):
            port = free_port(host)
        taken.add(port)
        out[name] = port
    return out


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class TritonServer:
    """A tritonserver process. Ports given as 0 are picked free; `start()` waits until
    the server reports ready; `stop()` asks it to shut down and kills it if it hangs.

    URLs: `grpc_url` and `http_url` are host:port as tritonclient wants them;
    `metrics_url` is the full Prometheus URL."""

    def __init__(
        self,
        repository: str | Path,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_file: str | Path | None = None,
        log_verbose: int = 0,
        exit_timeout_s: int = 10,
        extra_args: tuple[str, ...] = (),
        control_mode: str = "none",
    ):
        self.repository = Path(repository).resolve()
        self.host = host
        self._wanted = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ports = dict(self._wanted)
        self._tmp = Path(tempfile.mkdtemp(prefix="captioner-triton-"))
        # Each model instance says here since when it has been in execute (the supervisor's
        # per-instance hang check; captioner.serving.triton.ExecuteClock).
        self.executing_dir = self._tmp / "executing"
        # None ("-"): tritonserver writes to our stdout (a container's log, `kubectl logs`).
        self.log_file = None if str(log_file) == "-" else Path(log_file).resolve() if log_file else self._tmp / "tritonserver.log"
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.startup_s: float | None = None  # launch to ready, of the last start (every model loaded)
        self.extra_args = tuple(extra_args)
        if control_mode not in ("none", "explicit"):
            raise ValueError(f"control_mode must be none or explicit, got {control_mode!r}")
        # explicit: every model is loaded at start, and a supervisor may unload and load one.
        self.control_mode = control_mode
        self.binary = find_binary()
        self.process: subprocess.Popen | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.host)}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.ports['metrics']}/metrics"

    # -- process ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [
            str(self.binary.path),
            f"--model-repository={self.repository}",
            f"--model-control-mode={self.control_mode}",
            "--strict-readiness=true",
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.control_mode == "explicit":
            cmd.append("--load-model=*")
        if self.binary.wheel_root is not None:
            cmd.append(f"--backend-directory={make_backend_dir(self.binary.wheel_root, self._tmp / 'backends')}")
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        # The stub embeds its own interpreter: it finds this environment's packages (numpy,
        # Pillow, onnxruntime) through the venv's python on PATH, as an activated venv would.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
        self.executing_dir.mkdir(parents=True, exist_ok=True)
        env[EXECUTING_DIR_ENV] = str(self.executing_dir)
        if self.binary.wheel_root is not None:
            libs = self.binary.wheel_root.parent.parent / "nvidia_pytriton.libs"
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def start(self, timeout_s: float = 180.0, attempts: int = 3, keep_ports: bool = False) -> TritonServer:
        """Launch and wait until ready. keep_ports: a restart, on the ports already in use
        (clients and load balancers know those)."""
        if not (self.repository / "captioner" / "config.pbtxt").is_file():
            raise ServerError(f"{self.repository} holds no captioner model repository (make build-engines)")
        wanted = dict(self.ports) if keep_ports else self._wanted
        for attempt in range(attempts):
            self.ports = free_ports(wanted, self.host)
            t0 = time.monotonic()
            self._launch()
            try:
                self.wait_ready(timeout_s)
                self.startup_s = time.monotonic() - t0
                atexit.register(self.stop)
                return self
            except ServerError as e:
                self.stop()
                # Another process may have taken a free port between the pick and the bind.
                if (
                    attempt + 1 < attempts
                    and not all(wanted.values())
                    and ("already in use" in str(e) or "at the same address and port" in str(e))
                ):
                    continue
                raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        if self.log_file is None:
            sys.stdout.flush()
            self._popen(None)
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self._popen(log)

    def _popen(self, log) -> None:
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            # Own process group: a terminal's Ctrl-C reaches us, and we stop the server in order.
            start_new_session=True,
        )

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(f"tritonserver exited with code {code}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_file is None:
            return "(tritonserver's log is on standard output, above)"
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def listening(self) -> bool:
        """Whether the HTTP endpoint takes connections. Only a refused connect says no (no
        listener: an aborted server closes its endpoints before it exits); a slow one is
        a busy server, not a gone one."""
        try:
            with socket.create_connection((_client_host(self.host), self.ports["http"]), timeout=1.0):
                return True
        except ConnectionRefusedError:
            return False
        except OSError:
            return True

    def stop(self, wait_s: float | None = None) -> bool:
        """Drain and stop: on SIGTERM Triton turns readiness false, refuses new requests
        with UNAVAILABLE and finishes those in flight for up to exit_timeout_s. Killed
        after `wait_s` (default exit_timeout_s + 10) if still running; True when it
        exited on its own."""
        proc, self.process = self.process, None
        exited = True
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.exit_timeout_s + 10 if wait_s is None else wait_s)
            except subprocess.TimeoutExpired:
                exited = False
                proc.kill()
                proc.wait()
        if proc is not None:
            try:  # Python-backend stubs left behind by a server that did not exit in order
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        atexit.unregister(self.stop)
        return exited

    def kill(self) -> None:
        """End the server and its whole process group (Python stubs included) at once: for
        a server that is already broken, where a drain would only wait on dead stubs."""
        proc, self.process = self.process, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        atexit.unregister(self.stop)

    def close(self, wait_s: float | None = None) -> bool:
        """Stop (see `stop`), and remove the temporary backend directory (and the log, when
        it lives there)."""
        exited = self.stop(wait_s)
        shutil.rmtree(self._tmp, ignore_errors=True)
        return exited

    def __enter__(self) -> TritonServer:
        try:
            return self.start()
        except BaseException:
            self.close()  # `with` calls no __exit__ when __enter__ raises: the temp dir would stay
            raise

    def __exit__(self, *exc) -> None:
        self.close()
