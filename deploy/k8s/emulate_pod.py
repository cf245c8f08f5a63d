"""Run the CPU pod's serving container here, as close to the pod as a machine without a
container engine gets, and check what the manifests promise.

    sudo .venv/bin/python deploy/k8s/emulate_pod.py --repo model_repository

- the image: a venv with deploy/requirements-serving.txt only (no torch), and captioner/
  and client/ copied as deploy/Dockerfile.cpu copies them;
- the init container's own command lays the repository out in the pod's volume;
- the container's command, args and env from `kubectl kustomize deploy/k8s/overlays/cpu`,
  run in a private mount namespace (unshare, hence root) where / is read-only and only
  the pod's volumes are writable (/tmp, /dev/shm), as with
  readOnlyRootFilesystem; the repository volume is read-only, as mounted in the pod;
- checks: ready within the startup probe's budget; the liveness command passes; after
  SIGKILL of the encoder's Python stub, readiness and liveness fail, then pass again once
  the launcher has reloaded the model (the supervisor notices within a few seconds, so
  readiness lags liveness); SIGTERM under load: the launcher exits within the
  pod's terminationGracePeriodSeconds less the preStop sleep.

Ports are moved (CAPTIONER_*_PORT) so that a server on 8000-8002 does not collide.
Exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # client.readiness: the emulator runs in the project venv
POD_PATHS = ("/mnt/models", "/tmp")


def render(overlay: str) -> dict:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")


def prepare(work: Path, repo: Path, venv_python: str) -> None:
    """The image (venv + copied packages) and the pod's volumes, under work/."""
    if work.exists():
        shutil.rmtree(work)
    app = work / "opt" / "captioner"
    for package in ("captioner", "client"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([venv_python, "-m", "venv", str(work / "venv")], check=True)
    subprocess.run([str(work / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir",
                    "-r", str(ROOT / "deploy" / "requirements-serving.txt")], check=True)
    shutil.copytree(repo, work / "image" / "models", ignore=shutil.ignore_patterns("__pycache__"))
    for p in POD_PATHS:
        (work / "pod" / p.lstrip("/")).mkdir(parents=True, exist_ok=True)


def relocate(arg: str, work: Path) -> str:
    """A path of the pod (alone or as --flag=PATH) moved under work/pod."""
    if arg.startswith("--") and "=" not in arg:
        return arg
    flag, eq, path = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    for p in POD_PATHS:
        if path.startswith(p):
            path = str(work / "pod" / p.lstrip("/")) + path[len(p):]
            break
    else:
        if path.startswith("/models"):
            path = str(work / "image") + path
    return f"{flag}{eq}{path}" if eq else path


class Checks:
    def __init__(self):
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        self.failed += not ok


def inside(work: Path) -> int:
    from client.readiness import ReadinessWatch, http_ready

    dep = yaml.safe_load((work / "deployment.yaml").read_text())
    spec = dep["spec"]["template"]["spec"]
    (c,) = [x for x in spec["containers"] if x["name"] == "tritonserver"]
    (init,) = spec["initContainers"]
    check = Checks()

    subprocess.run([relocate(a, work) for a in init["command"]], check=True)
    # Read-only from here on, as the server container mounts it.
    subprocess.run(["mount", "-o", "remount,ro,bind", str(work / "pod" / "mnt" / "models")], check=True)
    ports = {"http": 18000, "grpc": 18001, "metrics": 18002}
    app = work / "opt" / "captioner"
    env = {"PATH": f"{work / 'venv' / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(app)}
    env |= {e["name"]: e["value"] for e in c.get("env", [])}
    env |= {f"CAPTIONER_{k.upper()}_PORT": str(v) for k, v in ports.items()}
    cmd = c["command"] + [relocate(a, work) for a in c["args"]]
    print("$ " + " ".join(cmd), flush=True)
    out = open(work / "out" / "launcher.out", "w")
    launcher = subprocess.Popen(cmd, cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        return http_ready(f"127.0.0.1:{ports['http']}", c["readinessProbe"]["httpGet"]["path"], timeout_s=2)

    def live() -> bool:
        probe = list(c["livenessProbe"]["exec"]["command"])
        probe[probe.index("--url") + 1] = f"127.0.0.1:{ports['grpc']}"
        try:
            return subprocess.run(probe, cwd=app, env=env, capture_output=True,
                                  timeout=c["livenessProbe"]["timeoutSeconds"]).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    try:
        budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        t0 = time.monotonic()
        while not ready() and launcher.poll() is None and time.monotonic() - t0 < budget:
            time.sleep(0.5)
        check(ready(), f"ready after {time.monotonic() - t0:.1f} s (startup probe budget {budget} s)")
        if launcher.poll() is not None:
            print((work / "out" / "launcher.out").read_text())
            return 1
        check(live(), "liveness command passes on a healthy pod")
        check("Started GRPCInferenceService" in (work / "out" / "launcher.out").read_text(),
              "tritonserver's log is on the container's stdout (--log-file=-), where `kubectl logs` reads it")

        stub = encoder_stub(launcher.pid)
        check(stub is not None, "found the Python stub that runs the encoder")
        if stub is not None:
            # The repair takes ~1.5 s, shorter than one liveness run (a Python start):
            # readiness is watched on its own, as often as a load balancer would.
            with ReadinessWatch(ready) as watch:
                t, seen = time.monotonic(), []
                os.kill(stub, signal.SIGKILL)
                while time.monotonic() - t < 60:
                    seen.append((round(time.monotonic() - t, 1), ready(), live()))
                    if seen[-1][1] and seen[-1][2] and len(seen) > 1:
                        break
                    time.sleep(1)
            since = {k: v and round(v - t, 2) for k, v in (("from", watch.not_ready_at), ("to", watch.ready_again_at))}
            print(f"  after SIGKILL of stub {stub} (seconds, ready, live): {seen}; NOT ready {since}")
            # No check that liveness fails: the front model has two instances, so a caption
            # still comes back through the healthy one while the supervisor reloads.
            check(watch.not_ready_at is not None, "readiness turns false until the model is reloaded")
            check(seen[-1][1] and seen[-1][2], f"ready and live again {seen[-1][0]} s later (model reloaded)")

        load = subprocess.Popen([str(work / "venv" / "bin" / "python"), "-c", textwrap.dedent(f"""
            import asyncio
            from captioner.scenes import encoded_scenes
            from client import AsyncCaptionClient, RetryPolicy
            images = [d for d, _ in encoded_scenes(64, 3)] * 40
            async def main():
                async with AsyncCaptionClient("127.0.0.1:{ports['grpc']}", concurrency=16,
                                              retry=RetryPolicy(max_attempts=1)) as c:
                    res = await c.caption(images)
                print(sum(r.ok for r in res), "captioned,", sum(not r.ok for r in res), "refused")
            asyncio.run(main())
        """)], cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2)  # requests in flight when SIGTERM comes
        grace = spec["terminationGracePeriodSeconds"] - int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        t = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        try:
            code = launcher.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t
        check(code == 0, f"SIGTERM under load: launcher exited {code} after {took:.1f} s (the pod leaves it {grace} s)")
        print("  clients, no retries: " + load.communicate(timeout=120)[0].strip().splitlines()[-1])
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return 1 if check.failed else 0


def encoder_stub(launcher_pid: int) -> int | None:
    """The stub running the encoder: the `encoder` model's, or in the fused CPU layout the
    first `preprocess` instance's (it runs the encoder too)."""
    import psutil

    found = {}
    for server in psutil.Process(launcher_pid).children():
        if "tritonserver" in " ".join(server.cmdline()):
            for stub in server.children():
                line = " ".join(stub.cmdline())
                for model in ("encoder", "preprocess"):
                    if "triton_python_backend_stub" in line and f"/{model}/" in line:
                        found.setdefault(model, stub.pid)
    return found.get("encoder", found.get("preprocess"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/k8s/emulate_pod.py", description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository", help="a CPU repository (make build-engines)")
    p.add_argument("--overlay", default="cpu")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/captioner-pod"),
                   help="scratch folder for the image and volumes; not under /tmp, which the pod's emptyDir covers")
    p.add_argument("--python", default="python3.11", help="the interpreter the venv is made from")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    work = a.work.resolve()
    if a.inside:
        return inside(work)
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("needs root and unshare(1): the read-only root is a private mount namespace", file=sys.stderr)
        return 2
    for path in (ROOT, Path(sys.executable), work):
        if Path("/tmp") in path.resolve().parents:
            print(f"{path} is under /tmp, which the pod's /tmp volume covers: move it", file=sys.stderr)
            return 2
    if not (a.repo / "captioner" / "config.pbtxt").is_file():
        print(f"{a.repo} holds no model repository (make build-engines TARGET=cpu)", file=sys.stderr)
        return 2
    prepare(work, a.repo.resolve(), a.python)
    (work / "out").mkdir(exist_ok=True)
    (work / "deployment.yaml").write_text(yaml.safe_dump(render(a.overlay)))
    pod = work / "pod"
    script = " && ".join([
        f"mount --bind {pod / 'tmp'} /tmp",
        f"mount --bind {work / 'out'} {work / 'out'}",  # the emulator's own output, outside the pod
        f"mount --bind {pod / 'mnt/models'} {pod / 'mnt/models'}",
        "mount -o remount,ro,bind /",
        f"{sys.executable} {Path(__file__).resolve()} --inside --work {work}",
    ])
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
