"""The load the fault scenarios put on a server while they break it: clients of the client
library (its retries and deadline), plain tritonclient callers (no retries: what each
request got), and the Kubernetes liveness probe's check. Overload's own driver is
bench/overload.py.

A request log is a list of (t_sent, t_done, ok, error) tuples, time.monotonic() seconds."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

RETRY_ATTEMPTS = 20
RETRY_MAX_BACKOFF_S = 2.0


async def captions_with_retries(
    url: str, images: list[bytes], clients: int, stop: asyncio.Event, params: dict | None, log: list
) -> None:
    """`clients` callers of the client library captioning until `stop`, each result
    appended to `log`."""
    from client.core import AsyncCaptionClient, RetryPolicy

    retry = RetryPolicy(max_attempts=RETRY_ATTEMPTS, max_backoff=RETRY_MAX_BACKOFF_S)
    async with AsyncCaptionClient(url, concurrency=clients, timeout=30.0, retry=retry) as c:

        async def worker(k: int) -> None:
            i = k
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    await c.caption_one(images[i % len(images)], name=f"img{i}", **(params or {}))
                    log.append((t0, time.monotonic(), True, None))
                except Exception as e:  # noqa: BLE001 - a lost request is what we count
                    log.append((t0, time.monotonic(), False, str(e)[:200]))
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))


def first_ok_after(log: list, t: float) -> float | None:
    """Seconds from `t` until the first caption of a request sent at or after `t`."""
    times = [done for sent, done, ok, _ in log if ok and sent >= t]
    return min(times) - t if times else None


def under_load(
    url: str,
    images: list[bytes],
    clients: int,
    params: dict | None,
    fault: Callable[[], object],
    watch_s: float,
    repaired: Callable[[], bool] = lambda: True,
) -> tuple[list, float, object]:
    """Client-library callers caption throughout; after 2 s `fault()` strikes (its
    return value is passed back); the load goes on until captions came back after it
    and `repaired()` (a model with two instances keeps captioning on the healthy one
    while the broken one waits for the supervisor), or watch_s, plus 2 s. Returns
    (log, time of the fault, fault's result)."""
    log: list = []

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(captions_with_retries(url, images, clients, stop, params, log))
        await asyncio.sleep(2.0)
        t_fault = time.monotonic()
        result = fault()
        while time.monotonic() - t_fault < watch_s:
            await asyncio.sleep(0.1)
            if first_ok_after(log, t_fault + 0.5) is not None and time.monotonic() - t_fault > 3 and repaired():
                break
        await asyncio.sleep(2.0)
        stop.set()
        await task
        return t_fault, result

    t_fault, result = asyncio.run(go())
    return log, t_fault, result


def outcome(log: list, t_fault: float) -> dict:
    """What the callers saw of a fault at `t_fault`."""
    restored = first_ok_after(log, t_fault)
    lost = [e for _, _, ok, e in log if not ok]
    return {
        "captions_again_after_s": None if restored is None else round(restored, 2),
        "requests": len(log),
        "lost": len(lost),
        "lost_samples": lost[:3],
    }


async def plain_callers(url: str, image: bytes, clients: int, params: dict | None, stop: asyncio.Event, results: list) -> None:
    """`clients` plain tritonclient callers (no retries) until `stop`: each request's
    (t_sent, t_done, "OK" or "<gRPC status>: <message>") appended to `results`."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    from client.wire import image_input

    c = grpcclient.InferenceServerClient(url)
    inp = image_input(image, grpcclient)

    async def worker():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                await c.infer("captioner", [inp], parameters=params, client_timeout=60)
                results.append((t0, time.monotonic(), "OK"))
            except InferenceServerException as e:
                status = (e.status() or "?").removeprefix("StatusCode.")
                results.append((t0, time.monotonic(), status + ": " + (e.message() or "")[:80]))
                await asyncio.sleep(0.05)

    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await c.close()


async def first_caption(client, tries: int = 20) -> None:
    """The first caption of a fresh server, retried: a cold machine can shed it."""
    for i in range(tries):
        try:
            await client(0)
            return
        except Exception:  # noqa: BLE001
            if i + 1 == tries:
                raise
            await asyncio.sleep(0.5)


async def liveness_during(url: str, done: asyncio.Event, every_s: float = 2.0) -> dict:
    """The Kubernetes liveness probe's check (`client.health --timeout 5 --overload-ok`) every
    `every_s` until `done`: would an orchestrator kill this overloaded replica?"""
    from client.health import check_async

    counts: dict = {"probes": 0, "caption": 0, "overloaded": 0, "failed": 0, "failures": []}
    while not done.is_set():
        r = await check_async(url, timeout=5.0, overload_ok=True)
        counts["probes"] += 1
        kind = "failed" if not r.ok else "overloaded" if r.reason else "caption"
        counts[kind] += 1
        if kind == "failed" and len(counts["failures"]) < 3:
            counts["failures"].append(r.reason)
        try:
            await asyncio.wait_for(done.wait(), every_s)
        except TimeoutError:
            pass
    return counts


async def back_to_normal(client, normal_ms: float, limit_s: float = 30.0) -> float | None:
    """After an overload: one request at a time until 5 in a row have a median latency
    of at most `normal_ms`. Seconds that took, or None within `limit_s`."""
    t0 = time.monotonic()
    recent: list[float] = []
    while time.monotonic() - t0 < limit_s:
        s = time.perf_counter()
        try:
            await client(0)
        except Exception:  # noqa: BLE001 - refused while the queues drain: not normal yet
            recent = []
            await asyncio.sleep(0.05)
            continue
        recent = (recent + [(time.perf_counter() - s) * 1e3])[-5:]
        if len(recent) == 5 and statistics.median(recent) <= normal_ms:
            return time.monotonic() - t0
    return None
