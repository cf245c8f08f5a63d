"""bench/overload.py against a fake server: each request is counted once, in the right
column, and refused callers retry as the client library's do (client.retry)."""

from __future__ import annotations

import asyncio

import tritonclient.grpc.aio as aio
from tritonclient.utils import InferenceServerException

from bench.overload import run_overload
from client.core import RetryPolicy

QUEUE_FULL = ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size")
INVALID = ("StatusCode.INVALID_ARGUMENT", "IMAGE: bytes are not a decodable image")


def fake_server(monkeypatch, answer):
    """Replace tritonclient's aio client: `answer(n)`, n counting the calls on that client
    (the bench gives each of its four callers its own), is None (a caption after 5 ms) or
    the (status, message) to refuse with at once."""
    calls = []

    class Client:
        def __init__(self, url):
            self.url, self.calls = url, 0

        async def infer(self, model, inputs, outputs=None, client_timeout=None, parameters=None, timeout=None):
            calls.append(timeout)
            self.calls += 1
            refusal = answer(self.calls)
            if refusal is not None:
                await asyncio.sleep(0)
                raise InferenceServerException(msg=refusal[1], status=refusal[0])
            await asyncio.sleep(0.005)
            return object()

        async def close(self):
            pass

    monkeypatch.setattr(aio, "InferenceServerClient", Client)
    return calls


def overload(retry=None):
    return asyncio.run(run_overload("fake:1", [b"png"], clients=4, duration_s=0.3, deadline_s=1.0, warmup_s=0.05, retry=retry))


def test_answered_requests_are_good(monkeypatch):
    calls = fake_server(monkeypatch, lambda n: None)
    r = overload()
    assert r.good > 0 and (r.late, r.refusals, r.gave_up, r.other_errors) == (0, 0, 0, 0)
    assert all(0 < t <= 1_000_000 for t in calls)  # every attempt carries the time left


def test_refused_requests_back_off_and_give_up_after_the_policys_attempts(monkeypatch):
    calls = fake_server(monkeypatch, lambda n: QUEUE_FULL)
    r = overload(RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001))
    assert r.good == 0 and r.gave_up > 0 and r.late == 0 and r.other_errors == 0
    # three refusals per request given up; up to two more or fewer for each of the four
    # callers whose request straddles an end of the measured window
    assert 3 * r.gave_up - 8 <= r.refusals <= 3 * r.gave_up + 8
    assert r.refusals <= len(calls)


def test_refusals_then_an_answer_is_good(monkeypatch):
    fake_server(monkeypatch, lambda n: QUEUE_FULL if n % 2 else None)  # each request: refused once, then answered
    r = overload(RetryPolicy(initial_backoff=0.001, max_backoff=0.001))
    assert r.good > 0 and r.refusals > 0 and r.gave_up == 0 and r.other_errors == 0
    assert abs(r.refusals - r.good) <= 4  # one refusal per answered request, give or take the window's ends


def test_a_rejected_request_is_another_error_with_a_sample(monkeypatch):
    fake_server(monkeypatch, lambda n: INVALID)
    r = overload()
    assert r.other_errors > 0 and r.good == 0 and r.refusals == 0 and r.gave_up == 0
    assert r.error_samples and "INVALID_ARGUMENT" in r.error_samples[0] and "decodable" in r.error_samples[0]
