"""Overload with deadlines: closed-loop clients that give up after a deadline and back off
when the server refuses them, as production callers do.

Each client sends one caption request at a time. A request has `deadline_s` from its
first send and retries as the client library's callers do (client.retry, the one driver):
the wait and the server-side `timeout` of every attempt are the time left, a refusal
(`UNAVAILABLE`) is retried after a jittered exponential backoff while time and attempts
are left, and the request is *good* only when its caption arrives inside the deadline.
Goodput is good requests per second of the measured window; the refusal latency (send to
`UNAVAILABLE`) says whether the server sheds load fast.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from client.endpoints import EndpointPool
from client.retry import DEADLINE_EXCEEDED, Retry, RetryPolicy, drive_async
from client.wire import attempt_failed, image_input, infer_without_cancel

from .loadgen import percentiles

MAX_ERROR_SAMPLES = 5


@dataclass
class OverloadResult:
    clients: int
    deadline_s: float
    elapsed_s: float
    good: int  # captions returned inside their deadline, in the window
    late: int  # requests that ran out of time (deadline exceeded, or refused until it passed)
    refusals: int  # UNAVAILABLE answers (each attempt counts)
    gave_up: int  # requests refused RetryPolicy.max_attempts times before their deadline
    other_errors: int
    goodput: float  # good / elapsed
    good_p50_ms: float
    good_p99_ms: float
    refusal_p50_ms: float
    refusal_p99_ms: float
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Tally:
    """What the callers saw inside the measured window (perf_counter seconds)."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.start = self.end = math.inf
        self.good_lat: list[float] = []
        self.refusal_lat: list[float] = []
        self.counts = {"late": 0, "gave_up": 0, "other": 0}
        self.errors: list[str] = []

    def inside(self, t: float) -> bool:
        return self.start <= t <= self.end

    def refused(self, t0: float, t1: float) -> None:
        if self.inside(t1):
            self.refusal_lat.append(t1 - t0)

    def request(self, outcome, start: float, t1: float) -> None:
        """One request that ended at `t1`, sent at `start`, as the retry driver left it."""
        if not self.inside(t1):
            return
        failure = outcome.failure
        status = failure.status if failure else None
        if outcome.ok and t1 - start <= self.deadline_s:
            self.good_lat.append(t1 - start)
        elif outcome.ok or outcome.out_of_time or status == DEADLINE_EXCEEDED:
            self.counts["late"] += 1
        elif (status or "").endswith("UNAVAILABLE"):
            self.counts["gave_up"] += 1
        else:
            self.counts["other"] += 1
            if len(self.errors) < MAX_ERROR_SAMPLES:
                self.errors.append(f"{status}: {failure.message if failure else ''}"[:300])

    def result(self, clients: int) -> OverloadResult:
        elapsed = self.end - self.start
        gp, rp = percentiles(self.good_lat), percentiles(self.refusal_lat)
        return OverloadResult(
            clients=clients,
            deadline_s=self.deadline_s,
            elapsed_s=elapsed,
            good=len(self.good_lat),
            late=self.counts["late"],
            refusals=len(self.refusal_lat),
            gave_up=self.counts["gave_up"],
            other_errors=self.counts["other"],
            goodput=len(self.good_lat) / elapsed,
            good_p50_ms=gp[50],
            good_p99_ms=gp[99],
            refusal_p50_ms=rp[50],
            refusal_p99_ms=rp[99],
            error_samples=self.errors,
        )


async def run_overload(
    url: str,
    images: Sequence[bytes],
    clients: int,
    duration_s: float,
    deadline_s: float,
    *,
    warmup_s: float = 1.0,
    parameters: dict | None = None,
    model: str = "captioner",
    retry: RetryPolicy | None = None,
) -> OverloadResult:
    """`retry`: the client library's RetryPolicy (its default when None): refused callers
    back off exactly as the library's callers do."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    retry = retry or RetryPolicy()
    rng = random.Random(0)
    endpoints = EndpointPool([url])  # one server; the driver only needs its bookkeeping
    inputs = [[image_input(data, grpcclient)] for data in images]
    outputs = [grpcclient.InferRequestedOutput("CAPTION")]
    tally = _Tally(deadline_s)
    stop = asyncio.Event()

    async def one(client, i: int) -> None:
        start = time.perf_counter()

        async def attempt(a):
            t0 = time.perf_counter()
            try:
                # as the client library waits: given up at the deadline, not cancelled
                return await infer_without_cancel(
                    client,
                    a.wait_s,
                    model,
                    inputs[i % len(inputs)],
                    outputs=outputs,
                    parameters=parameters,
                    timeout=a.server_timeout_us,
                )
            except InferenceServerException as e:
                if (e.status() or "").endswith("UNAVAILABLE"):
                    tally.refused(t0, time.perf_counter())
                raise attempt_failed(e) from None

        outcome = await drive_async(Retry(endpoints, retry, timeout=deadline_s, clock=time.perf_counter, rng=rng), attempt)
        tally.request(outcome, start, time.perf_counter())

    async def worker(client, k: int) -> None:
        i = k
        while not stop.is_set():
            await one(client, i)
            i += clients

    # A few channels, as a fleet of callers would have; one HTTP/2 connection for 512
    # clients would itself be the bottleneck.
    pool = [grpcclient.InferenceServerClient(url) for _ in range(min(8, clients))]
    try:
        tasks = [asyncio.create_task(worker(pool[k % len(pool)], k)) for k in range(clients)]
        await asyncio.sleep(warmup_s)
        tally.start = time.perf_counter()
        await asyncio.sleep(duration_s)
        tally.end = time.perf_counter()
        stop.set()
        await asyncio.wait(tasks, timeout=deadline_s + 5)
        for t in tasks:
            t.cancel()
    finally:
        for c in pool:
            await c.close()
    return tally.result(clients)
