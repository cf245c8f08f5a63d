"""Closed-loop asyncio load generator: `concurrency` workers, each sending its next
request as soon as the previous one is answered.

Two ways to bound a level: a fixed number of requests (every one counted), or a
warm-up followed by a measured window (only requests that complete inside the window
count, so neither start-up nor the drain at the end dilutes the steady state).
The client's own CPU use is measured over the same window: client and server share
the machine's cores, so a heavy client steals from the server it is measuring.

Clients: `TritonClient` (tritonclient.grpc.aio, the `captioner` ensemble) and
`HttpClient` (aiohttp, raw image bytes POSTed to a URL that answers JSON).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import psutil

if TYPE_CHECKING:
    import aiohttp
    import tritonclient.grpc.aio as grpcclient_t

Send = Callable[[int], Awaitable[object]]

PERCENTILES = (50, 95, 99)
MAX_ERROR_SAMPLES = 5


def percentiles(latencies_s: Sequence[float], qs: Iterable[float] = PERCENTILES) -> dict[int | float, float]:
    """Latency percentiles in milliseconds (linear interpolation between order statistics,
    numpy's default); NaN for every q when there are no samples."""
    qs = list(qs)
    if len(latencies_s) == 0:
        return {q: float("nan") for q in qs}
    values = np.percentile(np.asarray(latencies_s, np.float64) * 1e3, qs)
    return {q: float(v) for q, v in zip(qs, values)}


@dataclass
class LevelResult:
    concurrency: int
    completed: int  # successful requests counted in the measurement
    errors: int  # failed requests counted in the measurement
    elapsed_s: float  # measured wall time
    throughput: float  # successful requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu: float  # client process CPU / (elapsed x cores): its share of the machine
    server_cpu: float | None  # the same for the server processes, when their pids are known
    other_cpu: float  # the rest of the machine's busy time: other work competing with the measurement
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _CpuMeter:
    """CPU seconds of this process and of the given server processes (children included),
    turned into shares of the whole machine over a wall-clock interval."""

    def __init__(self, server_pids: Sequence[int] = ()):
        self.me = psutil.Process()
        self.server_pids = list(server_pids)
        self.cores = psutil.cpu_count() or 1

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _server(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in self.server_pids:
            try:
                root = psutil.Process(pid)
                for p in [root] + root.children(recursive=True):
                    out[p.pid] = self._cpu(p)
            except psutil.NoSuchProcess:
                continue
        return out

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def snapshot(self) -> tuple[float, float, dict[int, float], float]:
        return time.perf_counter(), self._cpu(self.me), self._server(), self._busy()

    def shares(self, a, b) -> tuple[float, float | None, float]:
        """(client, server or None, everything else) as shares of the machine."""
        capacity = max(b[0] - a[0], 1e-9) * self.cores
        client = (b[1] - a[1]) / capacity
        # A process born inside the window counts from zero.
        server = sum(v - a[2].get(pid, 0.0) for pid, v in b[2].items()) / capacity if self.server_pids else None
        other = (b[3] - a[3]) / capacity - client - (server or 0.0)
        return client, server, max(other, 0.0)


async def run_level(
    send: Send,
    concurrency: int,
    *,
    requests: int | None = None,
    duration: float | None = None,
    warmup: float = 1.0,
    min_completed: int = 0,
    max_duration: float | None = None,
    server_pids: Sequence[int] = (),
    samples: list[float] | None = None,
) -> LevelResult:
    """Drive `send(i)` (i = request index, 0, 1, 2, ...) from `concurrency` workers.

    Exactly one of `requests` (a fixed count, all counted, `warmup` ignored) or `duration`
    (seconds measured after `warmup` seconds) bounds the level. In duration mode the
    window is stretched, up to `max_duration`, until `min_completed` replies fell in it:
    a slow stack must not be summarised from a handful of replies. A request fails when
    `send` raises; failures are counted, never timed. `samples`, when given, receives the
    latency (seconds) of every counted reply, for merging windows (merge_levels)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if (requests is None) == (duration is None):
        raise ValueError("give exactly one of requests= or duration=")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")

    meter = _CpuMeter(server_pids)
    counter = iter(range(requests if requests is not None else 1 << 62))
    latencies: list[float] = []
    errors: list[str] = []
    n_errors = 0
    window: list[float | None] = [None, None]  # perf_counter bounds of the measurement; None until set
    stop = asyncio.Event()

    def counted(t_end: float) -> bool:
        if requests is not None:
            return True
        return window[0] is not None and window[0] <= t_end and (window[1] is None or t_end <= window[1])

    async def worker() -> None:
        nonlocal n_errors
        while not stop.is_set():
            i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                await send(i)
            except Exception as e:  # a failed request is a data point, not a crash
                t1 = time.perf_counter()
                if counted(t1):
                    n_errors += 1
                    if len(errors) < MAX_ERROR_SAMPLES:
                        errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            t1 = time.perf_counter()
            if counted(t1):
                latencies.append(t1 - t0)

    if requests is not None:
        start = meter.snapshot()
        window[0] = start[0]
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        end = meter.snapshot()
    else:
        assert duration is not None  # checked above: exactly one of requests/duration is given
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            await asyncio.sleep(warmup)
            start = meter.snapshot()
            window[0] = start[0]
            await asyncio.sleep(duration)
            limit = start[0] + max(duration, max_duration or duration)
            while len(latencies) + n_errors < min_completed and time.perf_counter() < limit:
                await asyncio.sleep(0.05)
            end = meter.snapshot()
            window[1] = end[0]
            stop.set()
            await asyncio.gather(*tasks)  # drain: replies after the window are not counted
        finally:
            for t in tasks:
                t.cancel()
    elapsed = end[0] - start[0]
    client_cpu, server_cpu, other_cpu = meter.shares(start, end)
    if samples is not None:
        samples.extend(latencies)
    p = percentiles(latencies)
    return LevelResult(
        concurrency=concurrency,
        completed=len(latencies),
        errors=n_errors,
        elapsed_s=elapsed,
        throughput=len(latencies) / elapsed if elapsed > 0 else float("nan"),
        p50_ms=p[50],
        p95_ms=p[95],
        p99_ms=p[99],
        mean_ms=float(np.mean(latencies) * 1e3) if latencies else float("nan"),
        client_cpu=client_cpu,
        server_cpu=server_cpu,
        other_cpu=other_cpu,
        error_samples=errors,
    )


def merge_levels(levels: Sequence[LevelResult], samples: Sequence[float]) -> LevelResult:
    """Several windows of one level (the same concurrency), measured apart, as one: replies
    and seconds summed, CPU shares weighted by seconds, percentiles of all the windows'
    `samples` (run_level's)."""
    if not levels:
        raise ValueError("nothing to merge")
    elapsed = sum(r.elapsed_s for r in levels)
    completed = sum(r.completed for r in levels)

    def weighted(get: Callable[[LevelResult], float | None]) -> float | None:
        total = 0.0
        for r in levels:
            v = get(r)
            if v is None:
                return None
            total += v * r.elapsed_s
        return total / elapsed if elapsed > 0 else float("nan")

    p = percentiles(samples)
    return LevelResult(
        concurrency=levels[0].concurrency,
        completed=completed,
        errors=sum(r.errors for r in levels),
        elapsed_s=elapsed,
        throughput=completed / elapsed if elapsed > 0 else float("nan"),
        p50_ms=p[50],
        p95_ms=p[95],
        p99_ms=p[99],
        mean_ms=float(np.mean(samples) * 1e3) if len(samples) else float("nan"),
        client_cpu=weighted(lambda r: r.client_cpu) or 0.0,
        server_cpu=weighted(lambda r: r.server_cpu),
        other_cpu=weighted(lambda r: r.other_cpu) or 0.0,
        error_samples=[e for r in levels for e in r.error_samples][:MAX_ERROR_SAMPLES],
    )


class HttpClient:
    """POST raw image bytes to `url`; a reply counts when it is 200 with a JSON `caption`."""

    def __init__(self, url: str, images: Sequence[bytes], content_type: str = "image/png"):
        if not images:
            raise ValueError("need at least one image")
        self.url, self.images, self.content_type = url, list(images), content_type
        self.session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("HttpClient used outside `async with`")
        return self.session

    async def __aenter__(self) -> HttpClient:
        import aiohttp

        # No connection cap below the concurrency: the client must never be the queue.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._open().close()

    async def __call__(self, i: int) -> str:
        data = self.images[i % len(self.images)]
        async with self._open().post(self.url, data=data, headers={"Content-Type": self.content_type}) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body}")
        caption = body.get("caption") if isinstance(body, dict) else None
        if not isinstance(caption, str):
            raise RuntimeError(f"reply has no caption: {body}")
        return caption


class TritonClient:
    """One `captioner` ensemble request per image over gRPC (tritonclient.grpc.aio).

    The request tensors are built once per image: rebuilding them per request is client
    CPU that the server then does not get."""

    def __init__(
        self,
        url: str,
        images: Sequence[bytes],
        model: str = "captioner",
        input_name: str = "IMAGE",
        output_name: str = "CAPTION",
        parameters: dict | None = None,
    ):
        if not images:
            raise ValueError("need at least one image")
        import tritonclient.grpc.aio as grpcclient

        from client.wire import image_input

        self._mod = grpcclient
        self.url, self.model, self.output_name = url, model, output_name
        self.parameters = parameters or None
        self.inputs = [[image_input(data, grpcclient, name=input_name)] for data in images]
        self.outputs = [grpcclient.InferRequestedOutput(output_name)]
        self.client: grpcclient_t.InferenceServerClient | None = None

    def _open(self) -> grpcclient_t.InferenceServerClient:
        if self.client is None:
            raise RuntimeError("TritonClient used outside `async with`")
        return self.client

    async def __aenter__(self) -> TritonClient:
        self.client = self._mod.InferenceServerClient(self.url)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._open().close()

    async def model_stats(self) -> dict[str, dict[str, float]]:
        """Cumulative per-model counters from Triton's statistics extension: executions,
        inferences (rows), and nanoseconds queued and computing."""
        stats = await self._open().get_inference_statistics(as_json=True)
        phases = ("compute_input", "compute_infer", "compute_output")
        out = {}
        for m in stats.get("model_stats", []):
            inf = m.get("inference_stats", {})
            # inference_stats charge a batch's compute time to every request in it;
            # batch_stats count each execution once.
            batches = m.get("batch_stats", [])
            out[m["name"]] = {
                "executions": float(m.get("execution_count", 0)),
                "inferences": float(m.get("inference_count", 0)),
                "queue_ns": float(inf.get("queue", {}).get("ns", 0)),
                "requests": float(inf.get("success", {}).get("count", 0)),
                "exec_compute_ns": sum(float(b.get(k, {}).get("ns", 0)) for b in batches for k in phases),
                "request_compute_ns": sum(float(inf.get(k, {}).get("ns", 0)) for k in phases),
            }
        return out

    async def __call__(self, i: int) -> str:
        result = await self._open().infer(
            self.model, self.inputs[i % len(self.inputs)], outputs=self.outputs, parameters=self.parameters
        )
        out = result.as_numpy(self.output_name)
        if out is None or out.size != 1:
            raise RuntimeError(f"expected one caption, got {None if out is None else out.shape}")
        v = out.reshape(-1)[0]
        return v.decode() if isinstance(v, bytes) else str(v)
