"""The CPU serving image (make image) run as the Kubernetes pod runs it: the Deployment's
command, args and environment (deploy/k8s/base/deployment.yaml); the repository image's
init command fills a volume, mounted read-only; uid 1000, a read-only root with /tmp as a
tmpfs, no capabilities, no new privileges, the pod's memory limit and the build's
/dev/shm (deploy.containers.pod_run_args). Not emulated: the preStop sleep (podman has
none), the kubelet's probe schedule (the probes are run here by hand). Then, from the host and inside:
captions over gRPC, bad input refused, the pod's probes, a killed stub repaired, orphans
reaped by PID 1, and `podman stop` draining with nothing accepted lost. The tests run in
file order on one container; the last one stops it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from captioner.scenes import caption_is_correct, encoded_scenes
from client import CaptionClient, RetryPolicy
from deploy.containers import MODELS_DIR, POD_GRACE_S, POD_MEMORY, pod_run_args, podman, repository_volume
from launcher.tritonserver import PROJECT_ROOT, free_ports

DEPLOYMENT = PROJECT_ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"
START_TIMEOUT_S = 180
PS = (
    "import json, psutil; print(json.dumps([p.info for p in psutil.process_iter("
    "['pid', 'ppid', 'status', 'cmdline', 'uids', 'gids'])]))"
)


def _pod_container() -> dict:
    spec = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "tritonserver")


class Served:
    """One serving container, from the host's side."""

    def __init__(self, name: str, image: str, volume: str, shm: int, memory: str = POD_MEMORY):
        self.name, self.podman = name, podman()
        self.ports = free_ports({"grpc": 0, "http": 0, "metrics": 0})
        # The pod's own container spec: its command (replacing the image's entrypoint),
        # args and environment, as the kubelet would start it.
        pod = _pod_container()
        env = {e["name"]: e["value"] for e in pod.get("env", [])}
        self.run = (
            self.podman
            + ["run", "-d", "--entrypoint", json.dumps(pod["command"][:1])]
            + pod_run_args(None, name=name, publish=self.ports, shm=shm, memory=memory, volume=volume, env=env)
            + [image]
            + pod["command"][1:]
            + pod["args"]
        )

    def start(self) -> Served:
        subprocess.run(self.podman + ["rm", "-f", "-t", "0", self.name], capture_output=True)
        subprocess.run(self.run, check=True, capture_output=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            assert self.running(), f"container exited:\n{self.logs()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT_S} s:\n{self.logs()[-3000:]}"
            time.sleep(0.5)
        return self

    def remove(self) -> None:
        subprocess.run(self.podman + ["rm", "-f", "-t", "0", self.name], capture_output=True)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def inspect(self, fmt: str) -> str:
        return subprocess.run(
            self.podman + ["inspect", "--format", fmt, self.name], capture_output=True, text=True
        ).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        out = subprocess.run(self.podman + ["logs", self.name], capture_output=True, text=True)
        return out.stdout + out.stderr

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.podman + ["exec", self.name, *cmd], capture_output=True, text=True, timeout=timeout)

    def python(self, code: str) -> str:
        out = self.exec("python", "-c", code)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def processes(self) -> list[dict]:
        return [p for p in json.loads(self.python(PS)) if "psutil" not in " ".join(p["cmdline"] or [])]


def _stubs(procs: list[dict], model: str = "") -> list[dict]:
    return [
        p
        for p in procs
        if "triton_python_backend_stub" in " ".join(p["cmdline"] or [])
        and f"{MODELS_DIR}/{model}" in " ".join(p["cmdline"] or [])
    ]


def _tritonserver(procs: list[dict]) -> dict:
    (server,) = [p for p in procs if (p["cmdline"] or [""])[0].endswith("/tritonserver")]
    return server


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(interval_s)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def volume(images):
    """The repository as the pod's init container lays it out (the repository image's
    own `cp`, as uid 1000), and its build_manifest.json."""
    name = "captioner-test-models"
    manifest = repository_volume(name, images[1])
    yield name, manifest
    subprocess.run(podman() + ["volume", "rm", "-f", name], capture_output=True)


@pytest.fixture(scope="module")
def served(images, volume):
    c = Served("captioner-test-pod", images[0], volume[0], volume[1]["shm"]["bytes"])
    c.start()
    yield c
    c.remove()


def _scenes(n: int, seed: int = 5):
    return encoded_scenes(n, seed)


def test_the_container_runs_under_the_pods_constraints(served, volume):
    procs = served.processes()
    pid1 = next(p for p in procs if p["pid"] == 1)
    assert pid1["cmdline"][:2] == ["tini", "--"], pid1  # an init reaps orphans (see the stub test)
    launcher = next(p for p in procs if p["ppid"] == 1 and p["cmdline"][1:3] == ["-m", "launcher"])
    assert launcher["cmdline"][3:] == _pod_container()["args"]  # the Deployment's own args
    for p in procs:
        assert p["uids"][0] == 1000 and p["gids"][0] == 1000, p
    status = served.python(f"print(open('/proc/{launcher['pid']}/status').read())")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0  # --cap-drop ALL
    assert fields["NoNewPrivs"].strip() == "1"
    environ = served.python(f"print(open('/proc/{launcher['pid']}/environ').read())").strip("\n\0").split("\0")
    assert "PYTHONUNBUFFERED=1" in environ

    checks = served.python("""
import errno, json, os
def writable(path):
    try:
        with open(os.path.join(path, ".probe"), "w"):
            pass
        os.remove(os.path.join(path, ".probe"))
        return "yes"
    except OSError as e:
        return errno.errorcode[e.errno]
mounts = {l.split()[1]: l.split() for l in open("/proc/self/mounts")}
print(json.dumps({p: writable(p) for p in ("/", "/opt/captioner", "/tmp", "/dev/shm", "/mnt/models")}
                 | {"mounts": {p: mounts[p][2:4] for p in ("/", "/tmp", "/dev/shm", "/mnt/models")},
                    "shm_bytes": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize,
                    "tmp_bytes": os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize}))
""")
    fs = json.loads(checks)
    assert fs["/"] == fs["/opt/captioner"] == fs["/mnt/models"] == "EROFS"  # read-only root and repository
    assert fs["/tmp"] == fs["/dev/shm"] == "yes"
    assert fs["mounts"]["/tmp"][0] == "tmpfs" and fs["tmp_bytes"] == 256 * 2**20
    assert fs["mounts"]["/mnt/models"][1].startswith("ro")
    assert fs["shm_bytes"] == volume[1]["shm"]["bytes"]
    assert int(served.inspect("{{.HostConfig.Memory}}")) == int(POD_MEMORY.rstrip("g")) * 2**30


def test_captions_are_correct_over_grpc_from_the_host(served):
    scenes = _scenes(16)
    with CaptionClient(served.grpc_url, concurrency=4, timeout=60) as client:
        results = client.caption([data for data, _ in scenes])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(caption_is_correct(r.caption, scene) for r, (_, scene) in zip(results, scenes)), [r.caption for r in results]


@pytest.mark.parametrize("data, message", [(b"", "image is empty"), (b"not an image", "not a decodable image")])
def test_a_bad_input_is_refused_with_invalid_argument(served, data, message):
    client = grpcclient.InferenceServerClient(served.grpc_url)
    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer("captioner", [image], client_timeout=30)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and message in e.value.message()
    client.close()
    assert served.ready()


def test_the_pods_probes_pass_inside_the_container(served):
    pod = _pod_container()
    path = pod["readinessProbe"]["httpGet"]["path"]
    ready = served.exec("python", "-c", f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000{path}')")
    assert ready.returncode == 0, ready.stderr
    live = served.exec(*pod["livenessProbe"]["exec"]["command"], timeout=pod["livenessProbe"]["timeoutSeconds"])
    assert live.returncode == 0 and live.stdout.startswith("ok "), live.stdout + live.stderr


def test_logs_are_on_stdout(served):
    logs = served.logs()
    assert "Serving; supervised" in logs  # the launcher's
    assert "Started GRPCInferenceService" in logs  # tritonserver's (--log-file=-)


def test_a_killed_stub_is_repaired_and_pid_1_reaps_the_orphans(served):
    scene_data, scene = _scenes(1, seed=9)[0]
    (stub, *_) = _stubs(served.processes(), "preprocess")
    served.python(f"import os, signal; os.kill({stub['pid']}, signal.SIGKILL)")
    _wait(lambda: not served.ready(), 30, "readiness turns false while the model is reloaded", 0.05)
    took = _wait(served.ready, 60, "ready again once the launcher has reloaded the model")
    # The model is ready again before tritonserver has waited for the old instance's dead
    # stub (it loads the new instance beside the one going away); then the pid is gone.
    try:
        _wait(lambda: stub["pid"] not in {p["pid"] for p in served.processes()}, 40, "the killed stub reaped")
    except AssertionError as e:
        raise AssertionError(f"{e}; the container's log ends:\n{served.logs()[-4000:]}") from None
    procs = served.processes()
    assert stub["pid"] not in {p["pid"] for p in procs}
    with CaptionClient(served.grpc_url, timeout=60) as client:
        r = client.caption_one(scene_data)
    assert r.ok and caption_is_correct(r.caption, scene), (r, took)

    # tritonserver killed: its stubs are orphaned to PID 1, which must reap them.
    server = _tritonserver(procs)
    old_stubs = {p["pid"] for p in _stubs(procs)}
    served.python(f"import os, signal; os.kill({server['pid']}, signal.SIGKILL)")
    restarted = _wait(lambda: _tritonserver_restarted(served, server["pid"]), 60, "tritonserver restarted")
    restarted += _wait(served.ready, 120, "ready after the restart")
    print(f"\nstub killed: ready again after {took:.1f} s; tritonserver killed: ready again after {restarted:.1f} s")
    procs = served.processes()
    assert not [p for p in procs if p["status"] == "zombie"], procs
    assert not old_stubs & {p["pid"] for p in procs}
    new_server = _tritonserver(procs)
    assert {p["ppid"] for p in _stubs(procs)} == {new_server["pid"]}
    with CaptionClient(served.grpc_url, timeout=60) as client:
        r = client.caption_one(scene_data)
    assert r.ok and caption_is_correct(r.caption, scene)


def _tritonserver_restarted(served: Served, old_pid: int) -> bool:
    try:
        return _tritonserver(served.processes())["pid"] != old_pid
    except ValueError:  # none (between the death and the restart)
        return False


def test_podman_stop_drains_with_nothing_accepted_lost_and_exits_0(served):
    """SIGTERM (podman stop, as the kubelet sends it) under 8 clients without retries:
    every request sent before the signal gets its caption; later ones may be refused; the
    container exits 0 within the pod's grace period."""
    scenes = _scenes(16, seed=13)
    outcomes: list[tuple[float, float, object]] = []  # (sent, answered, caption or error)
    lock, stop = threading.Lock(), threading.Event()

    def client_loop(k: int) -> None:
        client = grpcclient.InferenceServerClient(served.grpc_url)
        i = k
        while not stop.is_set():
            data, scene = scenes[i % len(scenes)]
            i += 1
            image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
            sent = time.monotonic()
            try:
                caption = client.infer("captioner", [image], client_timeout=60).as_numpy("CAPTION")[0, 0].decode()
                outcome = caption if caption_is_correct(caption, scene) else AssertionError(f"wrong: {caption!r}")
            except InferenceServerException as e:
                outcome = e
                time.sleep(0.05)
            with lock:
                outcomes.append((sent, time.monotonic(), outcome))
        client.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    signalled = time.monotonic()
    stopped = subprocess.run(
        served.podman + ["stop", "-t", str(POD_GRACE_S), served.name], capture_output=True, text=True, timeout=POD_GRACE_S + 30
    )
    took = time.monotonic() - signalled
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    before = [o for s, _, o in outcomes if s < signalled]
    lost = [o for o in before if not isinstance(o, str)]
    assert stopped.returncode == 0 and served.inspect("{{.State.ExitCode}}") == "0", served.logs()[-3000:]
    assert took < POD_GRACE_S, took
    assert len(before) > 50 and not lost, lost[:5]
    after = [o for s, _, o in outcomes if s >= signalled]
    print(
        f"\npodman stop: exit 0 after {took:.1f} s; sent before the signal {len(before)} (all captioned), after "
        f"{len(after)} ({sum(isinstance(o, str) for o in after)} captioned, "
        f"{sum(not isinstance(o, str) for o in after)} refused)"
    )
    odd = [o for o in after if not isinstance(o, str) and not _refused(o)]
    assert not odd, [f"{type(o).__name__}: {o}" for o in odd[:5]]
    logs = served.logs()
    assert "every accepted request finished" in logs and "Stopped." in logs


def _refused(outcome: object) -> bool:
    """Turned away during the drain or after the exit, never started: the ensemble is
    unloaded (NOT_FOUND), the port is closed, or the gRPC server shuts down around a call
    that reached no model (the ensemble is gone before tritonserver stops)."""
    if not isinstance(outcome, InferenceServerException):
        return False
    status = outcome.status()
    return (
        (status == "StatusCode.NOT_FOUND" and "has no available versions" in outcome.message())
        or (status == "StatusCode.UNAVAILABLE" and "failed to connect" in outcome.message().lower())
        or status == "StatusCode.CANCELLED"
    )


# -- too little /dev/shm ----------------------------------------------------------------------


def test_with_too_little_dev_shm_the_launcher_says_so_and_a_batch_that_does_not_fit_is_refused(images, volume):
    """64 MiB (a container runtime's default) against the build's figure: a loud warning at
    start naming the --shm-size to give, a full batch of the largest images refused with an
    error that says shared memory, and the server still captions what fits."""
    from bench.shm import largest_images

    manifest = volume[1]
    small = Served("captioner-test-small-shm", images[0], volume[0], shm=64 * 2**20)
    try:
        small.start()
        assert f"--shm-size={manifest['shm']['bytes']}" in small.logs()
        batch = largest_images(manifest["shm"]["max_batch_size"], manifest["shm"]["max_image_bytes"])
        client = grpcclient.InferenceServerClient(small.grpc_url)
        image = grpcclient.InferInput("IMAGE", [len(batch), 1], "BYTES")
        image.set_data_from_numpy(np.array([[d] for d, _ in batch], dtype=np.object_))
        with pytest.raises(InferenceServerException) as e:
            client.infer("captioner", [image], client_timeout=300)
        assert "shared memory" in e.value.message() and "--shm-size" in e.value.message()
        client.close()
        assert small.ready() and small.running()
        ((data, scene),) = _scenes(1, seed=21)
        with CaptionClient(small.grpc_url, timeout=60, retry=RetryPolicy(max_attempts=1)) as c:
            r = c.caption_one(data)
        assert r.ok and caption_is_correct(r.caption, scene)
    finally:
        small.remove()
