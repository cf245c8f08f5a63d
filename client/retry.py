"""The one retry and failover driver: the client library (client.core), the Locust users
(loadtest/locustfile.py) and the overload bench (bench/overload.py) all run it.

It decides; the caller does the I/O. The caller hands over `attempt(Attempt)`, which sends
one request to `Attempt.endpoint` (waiting at most `Attempt.wait_s`) and returns the answer
or raises `AttemptFailed` with the gRPC status it got, plus a sleep and a clock. `drive`
(blocking, also under gevent) and `drive_async` (asyncio) run the same `Retry` state
machine, which holds every decision:

- which endpoint: the pool's pick (client.endpoints.EndpointPool), avoiding the endpoints
  this request already tried while others are up;
- whether to retry: only when client.endpoints.classify puts the fault on the replica
  (BROKEN or OVERLOADED), never for an answer about the request (FINAL), and only while
  RetryPolicy.max_attempts is not reached. An attempt that ran out of `attempt_timeout`
  (shorter than the time left) counts as BROKEN: the replica hangs, try another;
- when: a retry on an endpoint this request has not tried goes out at once; going back to
  one already tried waits RetryPolicy.backoff first, never past the deadline;
- how long: each attempt may take the time left, or `attempt_timeout` when that is shorter;
  when the deadline passes between attempts the request ends `out_of_time`;
- what the pool learns: every attempt's outcome (so a broken endpoint is set aside), and
  set-aside endpoints that are due for a probe are handed to the caller's `probe(endpoint)`
  before each pick. `run_probe`/`run_probe_async` turn the probe's answer into the verdict.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from client.endpoints import Endpoint, EndpointPool, Failure, classify, status_text

DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter, for failures that say
    "this replica cannot serve right now" (client.endpoints.classify): UNAVAILABLE
    (unreachable, restarting, overloaded), a dead Python-backend stub, a model being
    reloaded. Every other status is an answer about the request, never retried.

    A retry on another endpoint that this image has not tried yet goes out at once;
    backoff applies when the retry goes back to an endpoint already tried. All of it stays
    within the image's deadline. Eight attempts, so that the backoff ceilings (0.2 ... 5 s)
    add up past the time a model reload takes on a lone endpoint (about 2 s): a reload
    must not lose images."""

    max_attempts: int = 8
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return (rng or random).uniform(0.0, ceiling)


class AttemptFailed(Exception):
    """Raised by an attempt (or probe) function: the call failed with gRPC `status`
    ("StatusCode.NAME", None when it never reached gRPC) and `message`. `error` is the
    transport's own exception, kept for the caller's report."""

    def __init__(self, status: str | None, message: str | None, error: BaseException | None = None):
        super().__init__(f"{status_text(status)}: {message or 'no details'}")
        self.status = status
        self.message = message or ""
        self.error = error


@dataclass(frozen=True)
class Attempt:
    """One request sent: where, how long it may take, and the pool's token for it."""

    number: int  # 1-based
    endpoint: Endpoint
    wait_s: float | None  # how long this attempt may take; None: no deadline
    capped: bool  # wait_s is the attempt timeout, shorter than the time left
    token: int  # what EndpointPool.started returned

    @property
    def server_timeout_us(self) -> int | None:
        """Triton's request `timeout` (microseconds) for this attempt: the server then drops
        a request nobody waits for any more. None without a deadline."""
        return None if self.wait_s is None else max(1, int(self.wait_s * 1e6))


@dataclass(frozen=True)
class Outcome:
    """How a request ended."""

    ok: bool
    value: Any = None  # the answer of the attempt that succeeded
    attempts: int = 0  # requests sent
    last: Attempt | None = None  # the last attempt sent, None when none was
    failure: AttemptFailed | None = None  # why the last failed attempt failed
    out_of_time: bool = False  # the deadline passed before the next attempt could go out

    @property
    def endpoint(self) -> Endpoint | None:
        """Where the last attempt went: the endpoint that answered, or that failed last."""
        return self.last.endpoint if self.last else None


def start_due_probes(pool: EndpointPool, probe: Callable[[Endpoint], Any] | None) -> None:
    """Hand every set-aside endpoint whose time is up to `probe` (which must not block)."""
    if probe is not None:
        for ep in pool.due_for_probe():
            probe(ep)


class Retry:
    """The attempts of one request, as a state machine without I/O. The loop that runs it
    (`drive`, `drive_async`):

        pause = r.next_pause()        # None: send at once; else sleep that long first
        a = r.begin()                 # None: out of time (r.outcome says so)
        ... send to a.endpoint ...  then one of
        r.succeeded(a, answer) | r.failed(a, AttemptFailed) -> retry? | r.abandoned(a)

    `timeout`: seconds for the whole request, retries and backoff included (None: no
    deadline). `attempt_timeout`: seconds one attempt may take (None: the time left).
    `probe(endpoint)`: starts a probe of a set-aside endpoint (None: no probes; a set-aside
    endpoint then comes back only when a request to it succeeds)."""

    def __init__(
        self,
        pool: EndpointPool,
        policy: RetryPolicy,
        *,
        timeout: float | None,
        attempt_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        probe: Callable[[Endpoint], Any] | None = None,
    ):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if attempt_timeout is not None and attempt_timeout <= 0:
            raise ValueError(f"attempt_timeout must be > 0 seconds, got {attempt_timeout}")
        self.pool, self.policy = pool, policy
        self.attempt_timeout = attempt_timeout
        self.clock, self.rng, self.probe = clock, rng, probe
        self.deadline = None if timeout is None else clock() + timeout
        self.tried: list[Endpoint] = []
        self.last: Attempt | None = None
        self.failure: AttemptFailed | None = None
        self._outcome: Outcome | None = None
        self._next: Endpoint | None = None
        self._paused = False

    @property
    def outcome(self) -> Outcome:
        """How the request ended (RuntimeError while it has not)."""
        if self._outcome is None:
            raise RuntimeError("the request has not ended")
        return self._outcome

    def left(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - self.clock()

    def next_pause(self) -> float | None:
        """Choose the next attempt's endpoint. None: send at once; else the backoff to wait
        first (the retry goes back to an endpoint this request already tried)."""
        start_due_probes(self.pool, self.probe)
        self._next = self.pool.pick(avoid=self.tried)
        self._paused = any(self._next is t for t in self.tried)
        if not self._paused:
            return None
        pause = self.policy.backoff(len(self.tried), self.rng)
        left = self.left()
        return pause if left is None else min(pause, max(0.0, left))

    def begin(self) -> Attempt | None:
        """The attempt to send now, or None when the deadline has passed (then `outcome`
        is set, `out_of_time`). After a pause the endpoint is chosen again: the pool may
        have learned something meanwhile."""
        if self._next is None:
            raise RuntimeError("begin() before next_pause()")
        if self._paused:
            start_due_probes(self.pool, self.probe)
            self._next = self.pool.pick(avoid=self.tried)
        ep, self._next = self._next, None
        left = self.left()
        if left is not None and left <= 0:
            self._outcome = Outcome(ok=False, attempts=len(self.tried), last=self.last, failure=self.failure, out_of_time=True)
            return None
        capped = self.attempt_timeout is not None and (left is None or self.attempt_timeout < left)
        self.tried.append(ep)
        self.last = Attempt(len(self.tried), ep, self.attempt_timeout if capped else left, capped, self.pool.started(ep))
        return self.last

    def succeeded(self, attempt: Attempt, value: Any = None) -> Outcome:
        self.pool.finished(attempt.endpoint, None, since=attempt.token)
        self._outcome = Outcome(ok=True, value=value, attempts=attempt.number, last=attempt)
        return self._outcome

    def failed(self, attempt: Attempt, failure: AttemptFailed) -> bool:
        """Record a failed attempt; True when the request is to be retried (else `outcome`
        is set)."""
        verdict = classify(failure.status, failure.message)
        if attempt.capped and failure.status == DEADLINE_EXCEEDED:
            verdict = Failure.BROKEN  # no answer within attempt_timeout: try another replica
        self.pool.finished(attempt.endpoint, verdict, failure.message, attempt.token)
        self.failure = failure
        if verdict is Failure.FINAL or attempt.number >= self.policy.max_attempts:
            self._outcome = Outcome(ok=False, attempts=attempt.number, last=attempt, failure=failure)
            return False
        return True

    def abandoned(self, attempt: Attempt) -> None:
        """The attempt ended without an answer either way (cancelled, a local fault): no
        verdict on the endpoint."""
        self.pool.abandoned(attempt.endpoint)


def drive(retry: Retry, attempt: Callable[[Attempt], Any], sleep: Callable[[float], Any] = time.sleep) -> Outcome:
    """Run `retry` to its end with a blocking `attempt` (under gevent, pass gevent.sleep)."""
    while True:
        pause = retry.next_pause()
        if pause is not None:
            sleep(pause)
        a = retry.begin()
        if a is None:
            return retry.outcome
        try:
            value = attempt(a)
        except AttemptFailed as f:
            if retry.failed(a, f):
                continue
            return retry.outcome
        except BaseException:
            retry.abandoned(a)
            raise
        return retry.succeeded(a, value)


async def drive_async(
    retry: Retry, attempt: Callable[[Attempt], Awaitable[Any]], sleep: Callable[[float], Awaitable[Any]] | None = None
) -> Outcome:
    """`drive` for asyncio: `attempt` is a coroutine function; `sleep` defaults to
    asyncio.sleep (looked up when it is needed)."""
    while True:
        pause = retry.next_pause()
        if pause is not None:
            await (sleep or asyncio.sleep)(pause)
        a = retry.begin()
        if a is None:
            return retry.outcome
        try:
            value = await attempt(a)
        except AttemptFailed as f:
            if retry.failed(a, f):
                continue
            return retry.outcome
        except BaseException:
            retry.abandoned(a)
            raise
        return retry.succeeded(a, value)


def _probe_failed(pool: EndpointPool, ep: Endpoint, e: Exception) -> None:
    if isinstance(e, AttemptFailed):
        pool.probe_result(ep, False, e.message or status_text(e.status))
    else:  # whatever it was, the endpoint must not stay "being probed" forever
        pool.probe_result(ep, False, f"probe failed: {e!r}")


def run_probe(pool: EndpointPool, ep: Endpoint, check: Callable[[], Any]) -> None:
    """Probe a set-aside endpoint: `check()` sends one tiny real request (readiness alone
    passes a replica whose stub is dead) and returns when it was answered well; any
    exception is a failed probe. Cancelled (BaseException): no verdict, probed again later."""
    try:
        check()
    except Exception as e:
        _probe_failed(pool, ep, e)
    except BaseException:
        ep.probing = False
        raise
    else:
        pool.probe_result(ep, True)


async def run_probe_async(pool: EndpointPool, ep: Endpoint, check: Callable[[], Awaitable[Any]]) -> None:
    """`run_probe` for asyncio: `check` is a coroutine function."""
    try:
        await check()
    except Exception as e:
        _probe_failed(pool, ep, e)
    except BaseException:
        ep.probing = False
        raise
    else:
        pool.probe_result(ep, True)
