"""podman on this project's machines, and `podman run` held to what the Kubernetes pod
allows. Shared by `make image` (deploy.images), `make serve-containers`
(deploy.serve_containers) and the container tests (tests/containers).

Two adjustments every podman command here needs (see deploy/README.md, "Images"):
- runc, not crun: crun refuses a host with cgroup v1 controllers ("cgroups in hybrid mode
  not supported");
- explicit ulimits: podman's defaults exceed a sandbox's hard limits and the container
  fails to start ("setrlimit RLIMIT_NOFILE: Operation not permitted"); the caller's own
  hard limits always fit.

The pod's constraints (deploy/k8s/base/deployment.yaml with overlays/cpu) as podman flags:
uid 1000, read-only root with /tmp as a size-limited tmpfs, every capability dropped, no
new privileges, the memory limit, /dev/shm sized from the build (build_manifest.json),
the repository mounted read-only at /mnt/models, the pod's grace period as the stop
timeout. tests/unit/test_k8s_manifests.py checks these values against the manifests.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_IMAGE = "localhost/captioner-server-cpu"
REPOSITORY_IMAGE = "localhost/captioner-repository"
MANIFEST = "build_manifest.json"

# What the pod gives the serving container (checked against deploy/k8s by the unit tests).
POD_USER = "1000:1000"
POD_MEMORY = "3g"  # overlays/cpu: limits.memory 3Gi
POD_TMP = "256m"  # base: the /tmp emptyDir's sizeLimit 256Mi
POD_GRACE_S = 60  # terminationGracePeriodSeconds
MODELS_DIR = "/mnt/models"  # --repo in the container's args, and where KServe puts a model
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "supervisor": 8003}


class ContainerError(RuntimeError):
    """podman is missing or a repository cannot be served from a container."""


def podman() -> list[str]:
    if shutil.which("podman") is None:
        raise ContainerError("podman is not installed (make image installs it with apt-get)")
    return ["podman", "--runtime", "runc"] if shutil.which("runc") else ["podman"]


def _limit(value: int) -> str:
    return "-1" if value == resource.RLIM_INFINITY else str(value)


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return resource.RLIM_INFINITY


def ulimits() -> list[str]:
    """--ulimit flags at this process's own hard limits, which a container may take; the
    process count no higher than the kernel's pid_max, which podman's conmon holds to."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = _pid_max() if nproc == resource.RLIM_INFINITY else min(nproc, _pid_max())
    return ["--ulimit", f"nofile={_limit(nofile)}:{_limit(nofile)}", "--ulimit", f"nproc={_limit(nproc)}:{_limit(nproc)}"]


def build_manifest(repo: Path) -> dict:
    path = Path(repo) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ContainerError(f"{repo} holds no built repository ({MANIFEST} missing): make build-engines TARGET=cpu") from None


def shm_bytes(repo: Path) -> int:
    """The /dev/shm the repository's build sized for a full batch of the largest images."""
    shm = build_manifest(repo).get("shm")
    if not shm:
        raise ContainerError(
            f"{repo}/{MANIFEST} has no 'shm' entry (built before /dev/shm was sized): rebuild it with make build-engines"
        )
    return int(shm["bytes"])


def pod_run_args(
    repo: Path | None,
    *,
    name: str,
    publish: dict[str, int] | None = None,
    host: str = "127.0.0.1",
    shm: int | None = None,
    memory: str = POD_MEMORY,
    env: dict[str, str] | None = None,
    init: bool = False,
    volume: str | None = None,
) -> list[str]:
    """`podman run` flags (after `run`, before the image) that hold a serving container to
    the pod's constraints. The repository is the folder `repo` or the podman volume
    `volume` (filled by the repository image, as the pod's init container fills its
    emptyDir), mounted read-only; shm defaults to the repository's build_manifest.json.
    publish: container port name -> host port (0 or absent: none)."""
    if volume is None:
        if repo is None:
            raise ValueError("give repo= or volume=")
        repo = Path(repo).resolve()
        shm_size = shm_bytes(repo) if shm is None else shm
    elif shm is None:
        raise ValueError("a repository volume needs shm= (its build_manifest.json is inside it)")
    else:
        shm_size = shm
    args = [
        "--name",
        name,
        *ulimits(),
        "--user",
        POD_USER,
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        f"/tmp:rw,nosuid,nodev,size={POD_TMP},mode=1777",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--memory",
        memory,
        "--memory-swap",
        memory,
        "--shm-size",
        str(shm_size),
        "--volume",
        f"{volume or repo}:{MODELS_DIR}:ro",
        "--stop-timeout",
        str(POD_GRACE_S),
        # The image's HEALTHCHECK needs systemd timers under podman; the pod's probes
        # are what count, and tests/containers runs them with `podman exec`.
        "--health-cmd",
        "none",
    ]
    if init:
        args.append("--init")
    for port_name, host_port in (publish or {}).items():
        if host_port:
            args += ["--publish", f"{host}:{host_port}:{CONTAINER_PORTS[port_name]}"]
    for k, v in (env or {}).items():
        args += ["--env", f"{k}={v}"]
    return args


def run_line(repo: str = "model_repository", shm: int | None = None) -> str:
    """The documented `podman run` line for one serving container on the default ports."""
    shm_flag = f"--shm-size {shm}" if shm is not None else "--shm-size <shm.bytes from build_manifest.json>"
    return (
        f"podman run --rm --user {POD_USER} --read-only --tmpfs /tmp:size={POD_TMP} --cap-drop ALL "
        f"--security-opt no-new-privileges --memory {POD_MEMORY} {shm_flag} "
        f'-p 8000-8003:8000-8003 -v "$PWD/{repo}:{MODELS_DIR}:ro" {SERVER_IMAGE}'
    )


def repository_volume(name: str, image: str = REPOSITORY_IMAGE) -> dict:
    """A podman volume filled from the repository image by the pod's init container command
    (`cp -R /models/. /mnt/models/`, as uid 1000 on a read-only root); the repository's
    build_manifest.json. The volume is owned by uid 1000, as the pod's emptyDir is
    writable by its fsGroup."""
    uid, gid = POD_USER.split(":")
    subprocess.run(podman() + ["volume", "rm", "-f", name], capture_output=True)
    subprocess.run(podman() + ["volume", "create", "--opt", f"o=uid={uid},gid={gid}", name], check=True, capture_output=True)
    init = subprocess.run(
        podman()
        + [
            "run",
            "--rm",
            *ulimits(),
            "--user",
            POD_USER,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            f"{name}:{MODELS_DIR}",
            image,
            "cp",
            "-R",
            "/models/.",
            f"{MODELS_DIR}/",
        ],
        capture_output=True,
        text=True,
    )
    if init.returncode != 0:
        raise ContainerError(f"the init container's copy failed: {init.stderr.strip()}")
    out = subprocess.run(
        podman() + ["run", "--rm", *ulimits(), "--volume", f"{name}:{MODELS_DIR}:ro", image, "cat", f"{MODELS_DIR}/{MANIFEST}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def image_exists(image: str) -> bool:
    return subprocess.run(podman() + ["image", "exists", image]).returncode == 0
