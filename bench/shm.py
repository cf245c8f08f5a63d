"""/dev/shm for full batches of the largest allowed images: what the Python backend's
shared-memory regions hold when every instance of the front model takes one at once.

    python -m bench.shm --repo model_repository [--out reports/shm.json]

Starts tritonserver on the repository with a shared-memory region prefix of its own,
sends one full batch (max_batch_size images of just under max_image_bytes, in one
request) to each instance of the front model at the same time, and samples the regions'
allocated bytes (tmpfs pages, what counts against a pod's memory) until the answers are
back. Prints the peak, what stays allocated afterwards, and builder.shm's size for the
repository, and fails when the measured peak exceeds it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from captioner.scenes import Scene


def largest_images(n: int, max_bytes: int, seed: int = 11) -> list[tuple[bytes, Scene]]:
    """n valid scenes, each a PNG as close under max_bytes as a square gets: the scene
    upscaled and stored without compression (the file is about its raw pixels), so the
    captions stay checkable while the bytes are the most a request may carry."""
    from PIL import Image

    from captioner.scenes import encoded_scenes

    distinct = encoded_scenes(min(n, 4), seed)
    side = math.isqrt(max_bytes // 3)
    out = []
    for data, scene in distinct:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        s = side
        while True:
            buf = io.BytesIO()
            img.resize((s, s), Image.Resampling.NEAREST).save(buf, "PNG", compress_level=0)
            if buf.tell() <= max_bytes:
                break
            s -= max(1, (buf.tell() - max_bytes) // (3 * s) + 1)
        out.append((buf.getvalue(), scene))
    return [out[i % len(out)] for i in range(n)]


def region_bytes(shm_dir: Path, prefix: str) -> tuple[int, int]:
    """(allocated, apparent) bytes of the regions whose names start with prefix."""
    alloc = size = 0
    for p in shm_dir.glob(prefix + "*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        alloc += st.st_blocks * 512
        size += st.st_size
    return alloc, size


class Sampler:
    """The peak of region_bytes, sampled on a thread."""

    def __init__(self, read, interval_s: float = 0.02):
        self.read, self.interval_s = read, interval_s
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            a, s = self.read()
            self.peak = (max(self.peak[0], a), max(self.peak[1], s))
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def send_full_batches(url: str, images: list[bytes], requests: int, timeout_s: float = 300.0) -> list[list[str] | Exception]:
    """`requests` requests of all `images` each, at once; each answer's captions or exception."""
    import tritonclient.grpc as grpcclient

    def one(_: int) -> list[str] | Exception:
        client = grpcclient.InferenceServerClient(url)
        try:
            inp = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
            inp.set_data_from_numpy(np.array([[d] for d in images], dtype=np.object_))
            res = client.infer("captioner", [inp], client_timeout=timeout_s)
            return [c.decode() for c in res.as_numpy("CAPTION").reshape(-1)]
        except Exception as e:  # noqa: BLE001 - reported, not raised: the measurement says what failed
            return e
        finally:
            client.close()

    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(one, range(requests)))


def measure(repo: Path) -> dict:
    from builder.shm import front_instances, repository_limits, required_bytes
    from captioner.scenes import caption_is_correct
    from launcher.tritonserver import TritonServer

    limits = repository_limits(repo)
    prefix = f"captioner_shm_{os.getpid()}_"
    shm_dir = Path("/dev/shm")
    imgs = largest_images(limits.max_batch_size, limits.max_image_bytes)
    with TritonServer(repo, extra_args=(f"--backend-config=python,shm-region-prefix-name={prefix}",)) as server:
        idle = region_bytes(shm_dir, prefix)
        t0 = time.monotonic()
        with Sampler(lambda: region_bytes(shm_dir, prefix)) as sampler:
            answers = send_full_batches(server.grpc_url, [d for d, _ in imgs], limits.front_instances)
        took = time.monotonic() - t0
        after = region_bytes(shm_dir, prefix)
    failed = [str(a) for a in answers if isinstance(a, Exception)]
    correct = sum(caption_is_correct(c, s) for a in answers if not isinstance(a, Exception) for c, (_, s) in zip(a, imgs))
    return {
        "repository": str(repo),
        "layout": limits.layout,
        "max_batch_size": limits.max_batch_size,
        "max_image_bytes": limits.max_image_bytes,
        "image_bytes": len(imgs[0][0]),
        "front_instances": front_instances(repo),
        "python_instances": limits.python_instances,
        "requests": limits.front_instances,
        "failed": failed,
        "captions_correct": correct,
        "captions": limits.max_batch_size * limits.front_instances,
        "seconds": round(took, 1),
        "idle_allocated": idle[0],
        "peak_allocated": sampler.peak[0],
        "peak_apparent": sampler.peak[1],
        "after_allocated": after[0],
        "sized": required_bytes(limits),
    }


class Container:
    """A serving container held to the pod's constraints (deploy.containers), with
    /dev/shm and the memory limit as given, read from the host: its /dev/shm through
    /proc/<pid>/root, its memory through its cgroup."""

    def __init__(self, repo: Path, image: str, shm: int | None, memory: str, name: str | None = None):
        from deploy.containers import pod_run_args, podman
        from launcher.tritonserver import free_ports

        self.podman = podman()
        self.name = name or f"captioner-shm-{os.getpid()}"
        self.ports = free_ports({"grpc": 0, "http": 0})
        self.args = (
            self.podman + ["run", "-d"] + pod_run_args(repo, name=self.name, publish=self.ports, shm=shm, memory=memory) + [image]
        )

    def __enter__(self):
        import subprocess
        import urllib.request

        subprocess.run(self.podman + ["rm", "-f", self.name], capture_output=True)
        subprocess.run(self.args, check=True, capture_output=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/v2/health/ready", timeout=2):
                    break
            except OSError:
                if not self.running():
                    raise RuntimeError(f"container {self.name} exited:\n{self.logs()[-3000:]}") from None
                time.sleep(0.5)
        else:
            raise RuntimeError(f"container {self.name} not ready after 180 s:\n{self.logs()[-3000:]}")
        self.pid = int(self.inspect("{{.State.Pid}}"))
        cg = next(
            line.split(":", 2)[2]
            for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines()
            if line.split(":")[1] in ("memory", "")
        )
        v1 = Path("/sys/fs/cgroup/memory") / cg.lstrip("/")
        self.cgroup = v1 if v1.is_dir() else Path("/sys/fs/cgroup") / cg.lstrip("/")
        return self

    def __exit__(self, *exc):
        import subprocess

        subprocess.run(self.podman + ["rm", "-f", "-t", "0", self.name], capture_output=True)

    def inspect(self, fmt: str) -> str:
        import subprocess

        return subprocess.run(
            self.podman + ["inspect", "--format", fmt, self.name], capture_output=True, text=True
        ).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        import subprocess

        out = subprocess.run(self.podman + ["logs", self.name], capture_output=True, text=True)
        return out.stdout + out.stderr

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def shm(self) -> tuple[int, int]:
        return region_bytes(Path(f"/proc/{self.pid}/root/dev/shm"), "")

    def _read(self, *names: str) -> str | None:
        for n in names:
            p = self.cgroup / n
            if p.is_file():
                return p.read_text()
        return None

    def memory_peak(self) -> int:
        return int(self._read("memory.max_usage_in_bytes", "memory.peak") or 0)

    def oom_kills(self) -> int:
        text = self._read("memory.oom_control", "memory.events") or ""
        return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill "))


def measure_container(repo: Path, image: str, shm: int | None, memory: str, requests: int | None = None) -> dict:
    """The same batches sent to a container from the host: shared memory, the container's
    memory peak and OOM kills, and each answer."""
    from builder.shm import repository_limits
    from captioner.scenes import caption_is_correct

    limits = repository_limits(repo)
    n = limits.front_instances if requests is None else requests
    imgs = largest_images(limits.max_batch_size, limits.max_image_bytes)
    with Container(repo, image, shm, memory) as c:
        idle_mem, idle_shm = c.memory_peak(), c.shm()
        t0 = time.monotonic()
        with Sampler(c.shm) as sampler:
            answers = send_full_batches(c.url, [d for d, _ in imgs], n)
        took = time.monotonic() - t0
        ok = [a for a in answers if not isinstance(a, Exception)]
        result = {
            "image": image,
            "shm_size": shm,
            "memory": memory,
            "layout": limits.layout,
            "requests": n,
            "max_batch_size": limits.max_batch_size,
            "image_bytes": len(imgs[0][0]),
            "seconds": round(took, 1),
            "failed": [str(a) for a in answers if isinstance(a, Exception)],
            "captions_correct": sum(caption_is_correct(cap, s) for a in ok for cap, (_, s) in zip(a, imgs)),
            "captions": limits.max_batch_size * n,
            "idle_allocated": idle_shm[0],
            "peak_allocated": sampler.peak[0],
            "after_allocated": c.shm()[0],
            "memory_idle": idle_mem,
            "memory_peak": c.memory_peak(),
            "oom_kills": c.oom_kills(),
            "still_running": c.running(),
            "log_tail": c.logs()[-4000:],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shm", description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--image",
        default=None,
        help="measure in a container of this image (make image), held to the pod's constraints, instead of a local tritonserver",
    )
    p.add_argument("--shm-size", type=int, default=None, help="container /dev/shm in bytes (default: the build's)")
    p.add_argument("--memory", default=None, help="container memory limit (default: the pod's)")
    p.add_argument("--requests", type=int, default=None, help="full batches at once (default: one per front instance)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here (e.g. reports/shm.json)")
    a = p.parse_args(argv)
    mib = 2**20
    if a.image:
        from builder.shm import repository_limits, required_bytes
        from deploy.containers import POD_MEMORY

        r = measure_container(a.repo, a.image, a.shm_size, a.memory or POD_MEMORY, a.requests)
        r["sized"] = required_bytes(repository_limits(a.repo))
        shm = "the build's" if a.shm_size is None else f"{a.shm_size / mib:.0f} MiB"
        print(
            f"container: /dev/shm {shm}, memory {r['memory']}; {r['layout']} layout, {r['requests']} request(s) "
            f"of {r['max_batch_size']} images of {r['image_bytes']} bytes in {r['seconds']} s: "
            f"{r['captions_correct']}/{r['captions']} captions correct, {len(r['failed'])} failed"
        )
        print(
            f"/dev/shm: idle {r['idle_allocated'] / mib:.0f} MiB, peak {r['peak_allocated'] / mib:.0f} MiB, after "
            f"{r['after_allocated'] / mib:.0f} MiB; container memory peak {r['memory_peak'] / mib:.0f} MiB "
            f"(idle {r['memory_idle'] / mib:.0f}); OOM kills {r['oom_kills']}; still running: {r['still_running']}"
        )
    else:
        r = measure(a.repo)
        print(
            f"{r['layout']} layout, {r['front_instances']} front instance(s), {r['python_instances']} Python-backend "
            f"instances; {r['requests']} request(s) of {r['max_batch_size']} images of {r['image_bytes']} bytes "
            f"(limit {r['max_image_bytes']}) in {r['seconds']} s: {r['captions_correct']}/{r['captions']} captions "
            f"correct, {len(r['failed'])} failed"
        )
        print(
            f"/dev/shm regions: idle {r['idle_allocated'] / mib:.0f} MiB, peak {r['peak_allocated'] / mib:.0f} MiB "
            f"allocated ({r['peak_apparent'] / mib:.0f} MiB apparent), after {r['after_allocated'] / mib:.0f} MiB; "
            f"builder.shm sizes it {r['sized'] / mib:.0f} MiB"
        )
    for f in r["failed"]:
        print("  failed: " + f[:300])
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if not r["failed"] and r["peak_allocated"] <= r["sized"] else 1


if __name__ == "__main__":
    sys.exit(main())
