"""python -m bench.queue_time: the autoscaler's signal, measured on a local server.

Serves a repository (free local ports), loads it with the asyncio client at several
concurrencies, and reads Triton's counters before and after each level. Prints, per
level, the throughput and two ways to turn nv_inference_queue_duration_us into one number:

- per caption request (the rule in deploy/k8s/prometheus-adapter/values.yaml): the queue
  time of every model the ensemble is made of, over the ensemble's successful requests;
- Triton's Helm chart (deploy/k8s-onprem): each model's queue time per its own success,
  averaged over the models, which the ensemble (no queue of its own) and an idle
  decoder_step pull down.

    python -m bench.queue_time --repo model_repository --clients 1 4 16 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request

from builder.repository import ENSEMBLE
from captioner.scenes import encoded_scenes
from client import AsyncCaptionClient
from launcher.tritonserver import TritonServer

_LINE = re.compile(r'^nv_inference_(queue_duration_us|request_success)\{model="([^"]+)"[^}]*\} (\S+)$')


def counters(metrics_text: str) -> dict[tuple[str, str], float]:
    """{(counter, model): value} for the two counters the autoscaler rule reads."""
    out: dict[tuple[str, str], float] = {}
    for line in metrics_text.splitlines():
        m = _LINE.match(line)
        if m:
            out[(m[1], m[2])] = out.get((m[1], m[2]), 0.0) + float(m[3])
    return out


def per_request_us(before: dict, after: dict) -> float:
    """The adapter rule: composing models' queue time / ensemble successes (1 + as in the rule)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    queued = sum(v for (name, model), v in d.items() if name == "queue_duration_us" and model != ENSEMBLE)
    return queued / (1 + d.get(("request_success", ENSEMBLE), 0.0))


def helm_chart_us(before: dict, after: dict) -> float:
    """Triton's chart: avg over models of queue time / (1 + that model's successes)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    models = {model for _, model in d}
    return sum(d.get(("queue_duration_us", m), 0.0) / (1 + d.get(("request_success", m), 0.0)) for m in models) / len(models)


def _read(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return counters(r.read().decode())


async def _load(url: str, images: list[bytes], clients: int) -> int:
    async with AsyncCaptionClient(url, concurrency=clients) as c:
        results = await c.caption(images)
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0].error}")
    return len(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue_time", description=__doc__.splitlines()[0])
    p.add_argument("--repo", default="model_repository")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    p.add_argument("--requests-per-client", type=int, default=16)
    p.add_argument("--min-requests", type=int, default=512, help="per level, so that start-up costs do not count")
    a = p.parse_args(argv)
    images = [data for data, _ in encoded_scenes(64, 1)]
    with TritonServer(a.repo) as server:
        asyncio.run(_load(server.grpc_url, images[:16], 4))  # warm-up
        print("| clients | captions/s | queue per caption request (ms) | Helm chart's average (ms) |")
        print("| ---: | ---: | ---: | ---: |")
        for n in a.clients:
            count = max(a.min_requests, n * a.requests_per_client)
            batch = (images * (1 + count // len(images)))[:count]
            before, t = _read(server.metrics_url), time.monotonic()
            ok = asyncio.run(_load(server.grpc_url, batch, n))
            elapsed, after = time.monotonic() - t, _read(server.metrics_url)
            per_request, chart = per_request_us(before, after) / 1000, helm_chart_us(before, after) / 1000
            print(f"| {n} | {ok / elapsed:.0f} | {per_request:.2f} | {chart:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
