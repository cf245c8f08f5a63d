"""The load generator counts every request once, times only successes, and computes
percentiles the textbook way; checked against a tiny local aiohttp server."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from aiohttp import web

from bench.loadgen import HttpClient, merge_levels, percentiles, run_level

DELAY_S = 0.02


def test_percentiles_match_linear_interpolation():
    lat = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p = percentiles(lat)
    assert p[50] == pytest.approx(50.5)
    assert p[95] == pytest.approx(95.05)
    assert p[99] == pytest.approx(99.01)
    assert percentiles([0.007])[99] == pytest.approx(7.0)


def test_percentiles_of_nothing_are_nan():
    assert all(math.isnan(v) for v in percentiles([]).values())


class _Server:
    """Answers a caption after DELAY_S, or 500 for a body of b'fail'; counts hits."""

    def __init__(self):
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(DELAY_S)
        finally:
            self.in_flight -= 1
        if body == b"fail":
            return web.json_response({"error": "asked to fail"}, status=500)
        return web.json_response({"caption": f"got {len(body)} bytes"})


async def _serve(state: _Server):
    app = web.Application()
    app.router.add_post("/caption", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/caption"


def test_fixed_count_counts_every_request_and_every_failure():
    async def go():
        state = _Server()
        runner, url = await _serve(state)
        try:
            # every 4th image fails: requests 3, 7, 11, 15, 19 of 0..21
            async with HttpClient(url, [b"a", b"bb", b"ccc", b"fail"]) as client:
                return state, await run_level(client, 3, requests=22)
        finally:
            await runner.cleanup()

    state, r = asyncio.run(go())
    assert state.hits == 22
    assert (r.completed, r.errors) == (17, 5)
    assert state.max_in_flight == 3  # the concurrency is what reaches the server
    assert r.throughput == pytest.approx(r.completed / r.elapsed_s)
    assert r.error_samples and "HTTP 500" in r.error_samples[0]
    # a reply cannot come back faster than the server sleeps
    assert r.p50_ms >= DELAY_S * 1e3 and r.p50_ms <= r.p95_ms <= r.p99_ms
    assert r.server_cpu is None and r.client_cpu >= 0


def test_duration_mode_counts_only_the_window_and_drains():
    async def go():
        state = _Server()
        runner, url = await _serve(state)
        try:
            async with HttpClient(url, [b"x"]) as client:
                r = await run_level(client, 4, duration=0.5, warmup=0.2)
            return state, r
        finally:
            await runner.cleanup()

    state, r = asyncio.run(go())
    assert r.errors == 0 and r.completed > 0
    assert state.in_flight == 0  # nothing left running after the level
    assert state.hits > r.completed  # warm-up and drained requests are not counted
    assert r.elapsed_s >= 0.5


def test_bad_arguments_are_refused():
    async def send(i):
        return None

    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(run_level(send, 0, requests=1))
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run_level(send, 1, requests=1, duration=1.0))
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run_level(send, 1))


def test_send_receives_consecutive_indices():
    seen = []

    async def send(i):
        seen.append(i)

    r = asyncio.run(run_level(send, 5, requests=37))
    assert sorted(seen) == list(range(37)) and r.completed == 37
    assert np.isfinite(r.p99_ms)


def test_a_slow_level_is_stretched_until_enough_replies_are_in():
    async def send(i):
        await asyncio.sleep(0.15)

    r = asyncio.run(run_level(send, 2, duration=0.1, warmup=0.0, min_completed=6, max_duration=5.0))
    assert r.completed >= 6 and r.elapsed_s < 5.0


def test_windows_merge_into_one_level_with_every_reply_counted_once():
    async def go():
        state = _Server()
        runner, url = await _serve(state)
        try:
            async with HttpClient(url, [b"x"]) as client:
                samples: list[float] = []
                windows = [await run_level(client, 2, duration=0.3, warmup=0.1, samples=samples) for _ in range(3)]
            return windows, samples
        finally:
            await runner.cleanup()

    windows, samples = asyncio.run(go())
    m = merge_levels(windows, samples)
    assert len(samples) == m.completed == sum(w.completed for w in windows)
    assert m.elapsed_s == pytest.approx(sum(w.elapsed_s for w in windows))
    assert m.throughput == pytest.approx(m.completed / m.elapsed_s)
    assert m.p99_ms == pytest.approx(percentiles(samples)[99]) and m.p50_ms >= DELAY_S * 1e3
    with pytest.raises(ValueError):
        merge_levels([], [])
