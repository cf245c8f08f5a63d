"""The retry and failover driver on its own (client.retry): a scripted attempt function, a
fake clock whose sleeps advance time, no gRPC. What it must decide: where each attempt
goes, when it waits, how long an attempt may take, when it gives up and why, and what
the endpoint pool learns."""

from __future__ import annotations

import asyncio
import random

import pytest

from client.endpoints import EndpointPool
from client.retry import (
    AttemptFailed,
    Retry,
    RetryPolicy,
    drive,
    drive_async,
    run_probe,
    run_probe_async,
)

REFUSED = AttemptFailed("StatusCode.UNAVAILABLE", "failed to connect to all addresses")
QUEUE_FULL = AttemptFailed("StatusCode.UNAVAILABLE", "Exceeds maximum queue size")
INVALID = AttemptFailed("StatusCode.INVALID_ARGUMENT", "IMAGE: bytes are not a decodable image")
DEADLINE = AttemptFailed("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded")


class Clock:
    """time.monotonic and a sleep that moves it, recording each sleep."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """An attempt function: per endpoint url, what each call does in turn (an AttemptFailed
    to raise, or a number of seconds it takes before answering "ok <url>"); once a list is
    used up, calls answer at once. Records (url, wait_s, capped) per attempt."""

    def __init__(self, clock: Clock, **plans):
        self.clock = clock
        self.plans = {url.replace("_", ":"): list(p) for url, p in plans.items()}
        self.calls: list[tuple[str, float | None, bool]] = []

    def __call__(self, a):
        url = a.endpoint.url
        self.calls.append((url, a.wait_s, a.capped))
        step = self.plans.get(url, [])
        step = step.pop(0) if step else 0.0
        if isinstance(step, BaseException):
            raise step
        self.clock.now += step
        return f"ok {url}"


def make(urls=("a:1",), policy=None, timeout=10.0, **kwargs):
    clock = Clock()
    pool = EndpointPool(urls, clock=clock)
    retry = Retry(pool, policy or RetryPolicy(), timeout=timeout, clock=clock, rng=random.Random(0), **kwargs)
    return clock, pool, retry


def test_an_answer_at_once_is_one_attempt_with_the_whole_deadline():
    clock, pool, retry = make(timeout=7.0)
    script = Script(clock)
    out = drive(retry, script, sleep=clock.sleep)
    assert out.ok and out.value == "ok a:1" and out.attempts == 1 and out.endpoint.url == "a:1"
    assert script.calls == [("a:1", 7.0, False)] and clock.sleeps == []
    assert out.last.server_timeout_us == 7_000_000
    assert pool.stats() == [{"url": "a:1", "sent": 1, "ok": 1, "failed": 0, "set_aside": 0, "up": True, "last_error": ""}]


def test_a_retry_goes_to_a_fresh_endpoint_at_once_and_back_to_a_tried_one_after_a_backoff():
    clock, pool, retry = make(("a:1", "b:1"), RetryPolicy(max_attempts=5, initial_backoff=0.4, max_backoff=10.0))
    script = Script(clock, a_1=[QUEUE_FULL], b_1=[QUEUE_FULL])
    out = drive(retry, script, sleep=clock.sleep)
    assert out.ok and out.attempts == 3
    assert [url for url, _, _ in script.calls[:2]] == ["a:1", "b:1"]
    # No wait before b (untried); one backoff before going back to a tried endpoint, for
    # retry 2 at most initial_backoff * 2.
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.8
    # Each attempt gets the time left, which the backoff used up.
    assert script.calls[2][1] == pytest.approx(10.0 - clock.sleeps[0])
    assert all(s["up"] for s in pool.stats())  # overloaded is not broken: nothing set aside


def test_an_answer_about_the_request_is_final_and_says_nothing_about_the_endpoint():
    clock, pool, retry = make(("a:1", "b:1"))
    out = drive(retry, Script(clock, a_1=[INVALID]), sleep=clock.sleep)
    assert not out.ok and not out.out_of_time and out.attempts == 1
    assert out.failure is INVALID and out.endpoint.url == "a:1"
    assert all(s["up"] for s in pool.stats()) and pool.stats()[0]["failed"] == 1


def test_a_broken_endpoint_is_set_aside_and_the_request_fails_over():
    clock, pool, retry = make(("a:1", "b:1"))
    out = drive(retry, Script(clock, a_1=[REFUSED]), sleep=clock.sleep)
    assert out.ok and out.value == "ok b:1" and out.attempts == 2 and clock.sleeps == []
    a, b = pool.stats()
    assert not a["up"] and a["set_aside"] == 1 and a["last_error"] == REFUSED.message
    assert b["ok"] == 1


def test_it_gives_up_after_max_attempts_with_the_last_failure():
    clock, pool, retry = make(policy=RetryPolicy(max_attempts=3))
    script = Script(clock, a_1=[REFUSED] * 5)
    out = drive(retry, script, sleep=clock.sleep)
    assert not out.ok and not out.out_of_time and out.attempts == 3 and out.failure is REFUSED
    assert len(script.calls) == 3 and len(clock.sleeps) == 2  # one lone endpoint: every retry backs off
    assert 0 <= clock.sleeps[0] <= 0.2 and 0 <= clock.sleeps[1] <= 0.4  # exponential ceilings


def test_backoff_never_runs_past_the_deadline_and_then_it_is_out_of_time():
    clock, pool, retry = make(policy=RetryPolicy(max_attempts=50, initial_backoff=5.0, max_backoff=5.0), timeout=1.0)
    script = Script(clock, a_1=[REFUSED] * 50)
    out = drive(retry, script, sleep=clock.sleep)
    assert not out.ok and out.out_of_time
    assert out.failure is REFUSED and out.attempts == len(script.calls) >= 1
    assert clock.now <= 1000.0 + 1.0 + 1e-9  # no sleep went past the deadline
    assert all(wait <= 1.0 for _, wait, _ in script.calls)


def test_attempt_timeout_caps_an_attempt_and_a_hang_counts_as_broken():
    clock, pool, retry = make(("a:1", "b:1"), timeout=5.0, attempt_timeout=0.5)
    script = Script(clock, a_1=[DEADLINE])
    out = drive(retry, script, sleep=clock.sleep)
    assert out.ok and out.value == "ok b:1"
    assert script.calls == [("a:1", 0.5, True), ("b:1", 0.5, True)]
    assert not pool.stats()[0]["up"]  # the hung replica is set aside


def test_attempt_timeout_longer_than_the_time_left_gives_the_time_left_and_its_deadline_is_final():
    clock, pool, retry = make(("a:1", "b:1"), timeout=0.5, attempt_timeout=2.0)
    script = Script(clock, a_1=[DEADLINE])
    out = drive(retry, script, sleep=clock.sleep)
    assert script.calls == [("a:1", 0.5, False)]
    assert not out.ok and out.failure is DEADLINE and out.attempts == 1 and pool.stats()[0]["up"]


def test_without_a_deadline_attempts_wait_without_limit():
    clock, pool, retry = make(timeout=None, policy=RetryPolicy(max_attempts=2))
    script = Script(clock, a_1=[REFUSED])
    out = drive(retry, script, sleep=clock.sleep)
    assert out.ok and script.calls == [("a:1", None, False)] * 2
    assert out.last.server_timeout_us is None


def test_a_local_fault_or_cancellation_leaves_no_verdict_on_the_endpoint():
    clock, pool, retry = make(("a:1", "b:1"))
    with pytest.raises(KeyboardInterrupt):
        drive(retry, Script(clock, a_1=[KeyboardInterrupt()]), sleep=clock.sleep)
    assert [(e.outstanding, e.sent, e.failed, e.up) for e in pool] == [(0, 0, 0, True)] * 2


def test_due_probes_are_handed_over_before_the_pick():
    clock = Clock()
    pool = EndpointPool(["a:1", "b:1"], clock=clock)
    pool.set_aside(pool.endpoints[0])
    clock.now += 60
    probed: list[str] = []
    retry = Retry(pool, RetryPolicy(), timeout=1.0, clock=clock, probe=lambda ep: probed.append(ep.url))
    out = drive(retry, Script(clock), sleep=clock.sleep)
    assert probed == ["a:1"] and out.value == "ok b:1"  # no traffic to a while it is probed


def test_without_a_probe_a_set_aside_lone_endpoint_comes_back_by_answering():
    clock, pool, retry = make()
    pool.set_aside(pool.endpoints[0])
    out = drive(retry, Script(clock), sleep=clock.sleep)
    assert out.ok and pool.stats()[0]["up"]


@pytest.mark.parametrize("bad", [dict(timeout=0), dict(timeout=-1), dict(attempt_timeout=0)])
def test_nonsense_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        Retry(EndpointPool(["a:1"]), RetryPolicy(), **{"timeout": 1.0, **bad})


def test_the_async_driver_decides_the_same():
    clock, _, retry = make(("a:1", "b:1"), RetryPolicy(max_attempts=4, initial_backoff=0.4))
    sync_script = Script(clock, a_1=[QUEUE_FULL, QUEUE_FULL], b_1=[REFUSED])
    sync_out = drive(retry, sync_script, sleep=clock.sleep)

    aclock, _, aretry = make(("a:1", "b:1"), RetryPolicy(max_attempts=4, initial_backoff=0.4))
    async_script = Script(aclock, a_1=[QUEUE_FULL, QUEUE_FULL], b_1=[REFUSED])

    async def attempt(a):
        return async_script(a)

    async def sleep(seconds):
        aclock.sleep(seconds)

    async_out = asyncio.run(drive_async(aretry, attempt, sleep=sleep))
    assert async_script.calls == sync_script.calls and aclock.sleeps == clock.sleeps
    assert (async_out.ok, async_out.attempts, async_out.value) == (sync_out.ok, sync_out.attempts, sync_out.value)


def test_the_async_driver_records_a_cancelled_attempt_as_abandoned():
    pool = EndpointPool(["a:1"])

    async def attempt(a):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(drive_async(Retry(pool, RetryPolicy(), timeout=1.0), attempt))
    assert (pool.endpoints[0].outstanding, pool.endpoints[0].sent) == (0, 0)


# --- probes ----------------------------------------------------------------------------


def probed_pool():
    clock = Clock()
    pool = EndpointPool(["a:1", "b:1"], clock=clock)
    a = pool.endpoints[0]
    pool.set_aside(a)
    clock.now += 60
    assert pool.due_for_probe() == [a]
    return pool, a


def test_a_probe_answered_well_brings_the_endpoint_back():
    pool, a = probed_pool()
    run_probe(pool, a, lambda: None)
    assert a.up and not a.probing


@pytest.mark.parametrize(
    "error, reason",
    [
        (REFUSED, REFUSED.message),
        (AttemptFailed("StatusCode.UNAVAILABLE", None), "UNAVAILABLE"),
        (RuntimeError("channel closed"), "probe failed: RuntimeError('channel closed')"),
    ],
)
def test_a_failed_probe_keeps_the_endpoint_aside_with_the_reason(error, reason):
    pool, a = probed_pool()

    def check():
        raise error

    run_probe(pool, a, check)
    assert not a.up and not a.probing and a.last_error == reason and a.set_aside_count == 2


def test_a_cancelled_probe_gives_no_verdict_and_can_run_again():
    pool, a = probed_pool()

    async def check():
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run_probe_async(pool, a, check))
    assert not a.up and not a.probing and a.set_aside_count == 1
    assert pool.due_for_probe() == [a]


# --- what a caller is told -------------------------------------------------------------


def test_a_deadline_the_server_ran_out_of_without_a_client_deadline_is_reported():
    from test_client_core import FakeTriton

    from client.core import AsyncCaptionClient, CaptionError

    fake = FakeTriton(plan={b"img": [("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded")]})
    with pytest.raises(CaptionError) as e:
        asyncio.run(AsyncCaptionClient(triton_client=fake, timeout=None).caption_one(b"img", name="p.png"))
    assert str(e.value) == "p.png: timed out (1 attempt): Deadline Exceeded"
    assert e.value.status == "StatusCode.DEADLINE_EXCEEDED" and e.value.attempts == 1
