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

import numpy as np


def largest_images(n: int, max_bytes: int, seed: int = 11) -> list[tuple[bytes, object]]:
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
            img.resize((s, s), Image.NEAREST).save(buf, "PNG", compress_level=0)
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


def send_full_batches(url: str, images: list[bytes], requests: int, timeout_s: float = 300.0) -> list[object]:
    """`requests` requests of all `images` each, at once; each answer's captions or exception."""
    import tritonclient.grpc as grpcclient

    def one(_):
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
    from builder.shm import front_instances, required_bytes, repository_limits
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
    correct = sum(caption_is_correct(c, s) for a in answers if not isinstance(a, Exception)
                  for c, (_, s) in zip(a, imgs))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shm", description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here (e.g. reports/shm.json)")
    a = p.parse_args(argv)
    r = measure(a.repo)
    mib = 2 ** 20
    print(f"{r['layout']} layout, {r['front_instances']} front instance(s), {r['python_instances']} Python-backend "
          f"instances; {r['requests']} request(s) of {r['max_batch_size']} images of {r['image_bytes']} bytes "
          f"(limit {r['max_image_bytes']}) in {r['seconds']} s: {r['captions_correct']}/{r['captions']} captions "
          f"correct, {len(r['failed'])} failed")
    print(f"/dev/shm regions: idle {r['idle_allocated'] / mib:.0f} MiB, peak {r['peak_allocated'] / mib:.0f} MiB "
          f"allocated ({r['peak_apparent'] / mib:.0f} MiB apparent), after {r['after_allocated'] / mib:.0f} MiB; "
          f"builder.shm sizes it {r['sized'] / mib:.0f} MiB")
    for f in r["failed"]:
        print("  failed: " + f[:300])
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if not r["failed"] and r["peak_allocated"] <= r["sized"] else 1


if __name__ == "__main__":
    sys.exit(main())
