"""python -m bench.cpu_split: where a Triton stack's CPU goes under load, per process.

Serves a repository (free local ports), drives the `captioner` ensemble with closed-loop
clients of the bench's load driver, and reads each process's CPU time from /proc before
and after a window: tritonserver itself (gRPC front end, ensemble, dynamic batchers)
apart from each Python-backend stub (decode, encoder, caption loop). Prints cores and
CPU-ms per caption for each, to tell the server's own overhead from the models' work.

    python -m bench.cpu_split --repo artifacts/bench/seed-inception/repo-onnxruntime-fp32 --clients 16 \
        --max-length 20
    python -m bench.cpu_split --repo model_repository --clients 32 --workload 1024px-mix
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import psutil

from launcher.tritonserver import TritonServer

from .loadgen import TritonClient, run_level
from .photos import WORKLOADS, workload_images


def label(p: psutil.Process) -> str:
    """tritonserver, or `stub <model>` for a Python-backend stub (its model from the command line)."""
    cmd = p.cmdline()
    if p.name() == "triton_python_backend_stub" or (cmd and cmd[0].endswith("triton_python_backend_stub")):
        # The stub's first argument is the model's path: <repo>/<model>/<version>/model.py
        parts = Path(cmd[1]).parts if len(cmd) > 1 else ()
        return f"stub {parts[-3]}" if len(parts) >= 3 else "stub"
    return p.name()


def cpu_by_label(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the process tree under pid, summed per label."""
    root = psutil.Process(pid)
    out: dict[str, float] = {}
    for p in [root] + root.children(recursive=True):
        try:
            t, k = p.cpu_times(), label(p)
            out[k] = out.get(k, 0.0) + t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="measured window")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--workload", choices=WORKLOADS, default=WORKLOADS[0], help="the images sent (bench/photos.py)")
    p.add_argument("--max-length", type=int, default=None, help="request parameter (seed-inception: 20)")
    a = p.parse_args(argv)
    params = {"max_length": a.max_length} if a.max_length else None

    with TritonServer(a.repo, log_file=Path("logs") / "cpu_split-tritonserver.log") as server:
        assert server.process is not None
        pid = server.process.pid
        shares: dict[str, float] = {}

        def sample() -> None:
            time.sleep(a.warmup)
            before, t0 = cpu_by_label(pid), time.perf_counter()
            time.sleep(a.seconds)
            after, dt = cpu_by_label(pid), time.perf_counter() - t0
            shares.update({k: (v - before.get(k, 0.0)) / dt for k, v in after.items()})

        async def go():
            async with TritonClient(server.grpc_url, workload_images(a.workload), parameters=params) as client:
                await client(0)
                t = threading.Thread(target=sample)
                t.start()
                r = await run_level(client, a.clients, duration=a.seconds + 1.0, warmup=a.warmup - 0.5, server_pids=[pid])
                t.join()
                return r

        r = asyncio.run(go())
    print(f"{a.repo}: {a.workload}, {a.clients} clients, {r.throughput:.1f} captions/s, {r.errors} errors")
    print("| process | cores | CPU ms per caption |\n| --- | ---: | ---: |")
    for k, v in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {1000 * v / r.throughput:.1f} |")
    total = sum(shares.values())
    print(f"| all | {total:.2f} | {1000 * total / r.throughput:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
