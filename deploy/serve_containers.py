"""make serve-containers: N serving containers of the CPU image, each held to the pod's
constraints (deploy.containers), behind nginx balancing gRPC per call on 127.0.0.1:8001.

    python -m deploy.serve_containers --replicas 2 [--repo model_repository] [--port 8001]

Replica k publishes its gRPC port on 127.0.0.1 (a free port) for nginx alone; the
repository folder is mounted read-only in every replica. nginx's configuration is
deploy/proxy/nginx.conf with the replicas filled in, written under logs/proxy/. Ctrl-C or
SIGTERM stops nginx, then drains and stops every replica (podman stop, in parallel).
nginx is installed with apt-get when missing (root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from captioner.signals import StopFlag
from deploy.containers import POD_GRACE_S, ROOT, SERVER_IMAGE, ContainerError, build_manifest, image_exists, pod_run_args, podman

TEMPLATE = ROOT / "deploy" / "proxy" / "nginx.conf"
ENVOY_TEMPLATE = ROOT / "deploy" / "proxy" / "envoy.yaml"
RUN_DIR = ROOT / "logs" / "proxy"
# Passive health: a replica is skipped for FAIL_TIMEOUT_S after MAX_FAILS failed calls.
MAX_FAILS = 1
FAIL_TIMEOUT_S = 10
# Request bookkeeping beside the images (tensor metadata, parameters) in the largest request.
BODY_MARGIN_BYTES = 1 << 20


def say(msg: str) -> None:
    print(f"serve-containers: {msg}", flush=True)


def render(upstreams: list[str], listen: str, max_body: int, template: Path = TEMPLATE) -> str:
    servers = "\n".join(f"        server {u} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_S}s;" for u in upstreams)
    text = template.read_text()
    for key, value in (("@UPSTREAM_SERVERS@", servers), ("@LISTEN@", listen), ("@MAX_BODY@", str(max_body))):
        assert key in text, f"{template} lacks {key}"
        text = text.replace(key, value)
    return text


def render_envoy(upstreams: list[str], listen: str, max_body: int, template: Path = ENVOY_TEMPLATE) -> str:
    """deploy/proxy/envoy.yaml for these replicas (not run here: no Envoy in Debian 12)."""
    endpoints = "\n".join(
        f'              - endpoint: {{address: {{socket_address: {{address: "{host}", port_value: {port}}}}}}}'
        for host, _, port in (u.rpartition(":") for u in upstreams)
    )
    host, _, port = listen.rpartition(":")
    text = template.read_text()
    for key, value in (
        ("@ENDPOINTS@", endpoints),
        ("@LISTEN_ADDRESS@", host),
        ("@LISTEN_PORT@", port),
        ("@MAX_BODY@", str(max_body)),
    ):
        assert key in text, f"{template} lacks {key}"
        text = text.replace(key, value)
    return text


def largest_request(repo: Path) -> int:
    """Bytes of the largest request the repository admits (nginx's client_max_body_size)."""
    shm = build_manifest(repo).get("shm") or {}
    if not shm:
        raise ContainerError(f"{repo}/build_manifest.json has no 'shm' entry: rebuild it with make build-engines")
    return shm["max_batch_size"] * (shm["max_image_bytes"] + 4) + BODY_MARGIN_BYTES


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ContainerError("nginx is not installed: apt-get install nginx (as root)")
    say("installing nginx with apt-get (missing here)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx"], check=True, env=env)
    return shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Replica:
    name: str
    grpc_port: int
    http_port: int
    metrics_port: int

    def successes(self) -> int | None:
        """Caption requests this replica answered (Triton's counter for the ensemble)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith('nv_inference_request_success{model="captioner"'):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    @property
    def upstream(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


@dataclass
class Fleet:
    """N replica containers and nginx in front; a context manager that stops them all."""

    repo: Path
    replicas: int = 2
    listen: str = "127.0.0.1:8001"
    image: str = SERVER_IMAGE
    prefix: str = "captioner-replica"
    run_dir: Path = RUN_DIR
    members: list[Replica] = field(default_factory=list)
    nginx: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> Fleet:
        from launcher.tritonserver import free_ports

        if not image_exists(self.image):
            raise ContainerError(f"{self.image} is not built: make image")
        nginx = ensure_nginx()
        p = podman()
        for k in range(self.replicas):
            ports = free_ports({"grpc": 0, "http": 0, "metrics": 0})
            replica = Replica(f"{self.prefix}-{k}", ports["grpc"], ports["http"], ports["metrics"])
            subprocess.run(p + ["rm", "-f", "-t", "0", replica.name], capture_output=True)
            run = subprocess.run(
                p + ["run", "-d"] + pod_run_args(self.repo, name=replica.name, publish=ports) + [self.image],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                raise ContainerError(f"podman run {replica.name} failed: {run.stderr.strip()}")
            self.members.append(replica)
            say(f"{replica.name}: gRPC {replica.upstream}, HTTP 127.0.0.1:{replica.http_port}")
        deadline = time.monotonic() + timeout_s
        for replica in self.members:
            while not replica.ready():
                if time.monotonic() > deadline:
                    raise ContainerError(f"{replica.name} not ready after {timeout_s:.0f} s")
                time.sleep(0.5)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.run_dir / "tmp" / d).mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "nginx.conf"
        conf.write_text(render([r.upstream for r in self.members], self.listen, largest_request(self.repo)))
        test = subprocess.run([nginx, "-t", "-p", str(self.run_dir), "-c", str(conf)], capture_output=True, text=True)
        if test.returncode != 0:
            raise ContainerError(f"nginx -t refused {conf}:\n{test.stderr}")
        self.nginx = subprocess.Popen([nginx, "-p", str(self.run_dir), "-c", str(conf), "-g", "daemon off;"])
        host, _, port = self.listen.rpartition(":")
        deadline = time.monotonic() + 10
        while not _listening(host, int(port)):
            if self.nginx.poll() is not None or time.monotonic() > deadline:
                raise ContainerError(f"nginx did not start on {self.listen} (exit {self.nginx.poll()})")
            time.sleep(0.1)
        say(f"nginx on {self.listen} balancing gRPC over {len(self.members)} replica(s) (config {conf})")
        return self

    def kill(self, k: int) -> None:
        """SIGKILL replica k's container (no drain): what a node failure does."""
        subprocess.run(podman() + ["kill", self.members[k].name], check=True, capture_output=True)

    def stop(self) -> None:
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)  # graceful: finishes the calls it is proxying
            try:
                self.nginx.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait()
        p = podman()

        def stop_one(r: Replica) -> str:
            out = subprocess.run(p + ["stop", "-t", str(POD_GRACE_S), r.name], capture_output=True, text=True)
            code = subprocess.run(
                p + ["inspect", "--format", "{{.State.ExitCode}}", r.name], capture_output=True, text=True
            ).stdout.strip()
            subprocess.run(p + ["rm", "-f", "-t", "0", r.name], capture_output=True)
            return f"{r.name}: stopped (exit {code})" if out.returncode == 0 else f"{r.name}: {out.stderr.strip()}"

        with ThreadPoolExecutor(max(1, len(self.members))) as pool:
            for line in pool.map(stop_one, self.members):
                say(line)
        self.members.clear()

    def __enter__(self) -> Fleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host or "127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.serve_containers", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository")
    p.add_argument("--listen", default="127.0.0.1:8001", help="nginx's address (gRPC, plaintext HTTP/2)")
    p.add_argument("--image", default=SERVER_IMAGE)
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("--replicas must be >= 1")
    stop = StopFlag().install()
    fleet = Fleet(a.repo.resolve(), a.replicas, a.listen, a.image)
    try:
        fleet.start()
        nginx = fleet.nginx
        assert nginx is not None  # start() launched it or raised
        say(f"serving: python -m client --url {a.listen} scene.png; Ctrl-C or SIGTERM stops everything")
        while not stop.wait(0.5):
            if nginx.poll() is not None:
                say(f"nginx exited with code {nginx.returncode}")
                return 1
        return 0
    except ContainerError as e:
        print(f"serve-containers: error: {e}", file=sys.stderr)
        return 1
    finally:
        say("stopping nginx and draining the replicas ...")
        fleet.stop()


if __name__ == "__main__":
    raise SystemExit(main())
