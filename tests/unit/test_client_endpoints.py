"""Several endpoints, failover, deadlines, TLS and the health check, without a server:
every endpoint is a FakeTriton (test_client_core) whose failures are scripted."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image
from test_client_core import FakeTriton, run, sleeps  # noqa: F401  (sleeps is a fixture)

from client import core, health
from client.core import AsyncCaptionClient, CaptionClient, RetryPolicy, TLSConfig
from client.endpoints import EndpointPool, Failure, classify, parse_endpoints

UNAVAILABLE = (
    "StatusCode.UNAVAILABLE",
    "failed to connect to all addresses; last error: UNKNOWN: "
    "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
)
SOCKET_CLOSED = ("StatusCode.UNAVAILABLE", "Stream removed (Socket closed)")
STUB_DEAD = ("StatusCode.INTERNAL", "in ensemble 'captioner', Stub process 'encoder_0_0' is not healthy.")
RELOADING = ("StatusCode.NOT_FOUND", "Request for unknown model: 'captioner' has no available versions")
QUEUE_FULL = ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size")
INVALID = ("StatusCode.INVALID_ARGUMENT", "in ensemble 'captioner', IMAGE: bytes are not a decodable image")


class Fleet:
    """A client_factory: one FakeTriton per endpoint. `down[url]` makes every call to it fail
    with that (status, message) until cleared."""

    def __init__(self, delay=0.0):
        self.fakes: dict[str, FakeTriton] = {}
        self.down: dict[str, tuple[str, str]] = {}
        self.tls: dict[str, object] = {}
        self.delay = delay

    def __call__(self, url, tls):
        fleet = self

        class Endpoint(FakeTriton):
            async def infer(self, *args, **kwargs):
                if url in fleet.down:
                    self.plan.setdefault(_data(args[1]), []).insert(0, fleet.down[url])
                return await super().infer(*args, **kwargs)

        self.tls[url] = tls
        self.fakes[url] = Endpoint(delay=lambda data: self.delay)
        return self.fakes[url]

    def calls(self, url, probes=False):
        probe = core.probe_image()
        return [c for c in self.fakes[url].calls if (c["data"] == probe) == probes]


def _data(inputs):
    from tritonclient.utils import deserialize_bytes_tensor

    return deserialize_bytes_tensor(inputs[0]._raw_content)[0]


# --- endpoints -------------------------------------------------------------------------


def test_parse_endpoints():
    assert parse_endpoints("localhost:8001") == ["localhost:8001"]
    assert parse_endpoints(" h1:8001 , grpc://h2:9001,h1:8001") == ["h1:8001", "h2:9001"]
    assert parse_endpoints(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert parse_endpoints("[::1]:8001,10.0.0.2:8001") == ["[::1]:8001", "10.0.0.2:8001"]


@pytest.mark.parametrize("bad", ["", "h1:8001,,h2:8001", "h1", "h1:0", "h1:70000", "http://h1:8001", "h 1:80", []])
def test_parse_endpoints_rejects(bad):
    with pytest.raises(ValueError):
        parse_endpoints(bad)


@pytest.mark.parametrize(
    "error, expected",
    [
        (UNAVAILABLE, Failure.BROKEN),
        (SOCKET_CLOSED, Failure.BROKEN),
        (STUB_DEAD, Failure.BROKEN),
        (RELOADING, Failure.BROKEN),
        (QUEUE_FULL, Failure.OVERLOADED),
        (("StatusCode.UNAVAILABLE", "Request timeout expired"), Failure.OVERLOADED),
        (INVALID, Failure.FINAL),
        (("StatusCode.NOT_FOUND", "Request for unknown model: 'captioner2' is not found"), Failure.FINAL),
        (("StatusCode.INTERNAL", "onnxruntime exploded"), Failure.FINAL),
        (("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"), Failure.FINAL),
    ],
)
def test_classify(error, expected):
    assert classify(*error) is expected


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_pool_spreads_by_outstanding_then_round_robin():
    pool = EndpointPool(["a:1", "b:1", "c:1"], clock=Clock())
    picks = []
    for _ in range(6):  # all idle: round robin
        ep = pool.pick()
        picks.append(ep.url)
    assert picks == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]
    a, b, c = pool.endpoints
    pool.started(a), pool.started(a), pool.started(b)
    assert pool.pick() is c  # least outstanding wins
    pool.started(c)
    assert pool.pick() is b  # b and c tie at 1: the one after the last pick
    assert pool.pick(avoid=[b, c]) is a  # avoided endpoints only when nothing else is up


def test_pool_sets_aside_doubling_and_probes_before_traffic():
    clock = Clock()
    pool = EndpointPool(["a:1", "b:1"], set_aside_s=1.0, max_set_aside_s=3.0, clock=clock)
    a, b = pool.endpoints
    pool.started(a)
    pool.finished(a, Failure.BROKEN, "refused")
    assert not a.up and [pool.pick().url for _ in range(3)] == ["b:1"] * 3
    assert pool.due_for_probe() == []
    clock.now += 1.0
    assert pool.due_for_probe() == [a] and pool.due_for_probe() == []  # probed once at a time
    assert pool.pick() is b  # no traffic while the probe runs
    pool.probe_result(a, False, "still refused")
    assert not a.up and a.set_aside_until == clock.now + 2.0  # doubled
    clock.now += 2.0
    assert pool.due_for_probe() == [a]
    pool.probe_result(a, False)
    assert a.set_aside_until == clock.now + 3.0  # capped
    clock.now += 3.0
    assert pool.due_for_probe() == [a]
    pool.probe_result(a, True)
    assert a.up and a.strikes == 0
    assert {pool.pick().url for _ in range(2)} == {"a:1", "b:1"}
    assert a.stats() == {"url": "a:1", "sent": 1, "ok": 0, "failed": 1, "set_aside": 3, "up": True, "last_error": "still refused"}


def test_pool_in_flight_failures_of_one_outage_count_once():
    clock = Clock()
    pool = EndpointPool(["a:1", "b:1"], clock=clock)
    a = pool.endpoints[0]
    tokens = [pool.started(a) for _ in range(5)]
    pool.finished(a, Failure.BROKEN, since=tokens[0])
    clock.now += 5  # past the set-aside: the others fail late (a dead stub takes 1-2 s to say so)
    for t in tokens[1:]:
        pool.finished(a, Failure.BROKEN, since=t)
    assert a.set_aside_count == 1 and a.strikes == 1 and a.outstanding == 0 and a.failed == 5


def test_pool_all_set_aside_sends_to_the_one_due_first():
    clock = Clock()
    pool = EndpointPool(["a:1", "b:1"], clock=clock)
    a, b = pool.endpoints
    pool.set_aside(a)
    clock.now += 0.5
    pool.set_aside(b)
    assert pool.pick() is a
    pool.started(a)
    pool.finished(a, None)
    assert a.up


def test_late_answers_from_before_the_set_aside_do_not_bring_it_back():
    pool = EndpointPool(["a:1", "b:1"], clock=Clock())
    a = pool.endpoints[0]
    early = pool.started(a)
    failing = pool.started(a)
    pool.finished(a, Failure.BROKEN, "Stub process 'encoder_0_0' is not healthy", failing)
    pool.finished(a, None, since=early)  # that request was already past the dead model
    assert not a.up and a.ok == 1
    pool.set_aside(pool.endpoints[1])  # everything aside: the next request goes to a itself
    assert pool.pick() is a
    while_aside = pool.started(a)
    pool.finished(a, None, since=while_aside)  # an answer to a request sent while set aside
    assert a.up


def test_overloaded_endpoint_is_not_set_aside():
    pool = EndpointPool(["a:1", "b:1"], clock=Clock())
    a = pool.endpoints[0]
    pool.started(a)
    pool.finished(a, Failure.OVERLOADED)
    assert a.up and a.failed == 1


# --- the client over several endpoints -------------------------------------------------


def test_requests_are_spread_over_endpoints():
    fleet = Fleet(delay=0.005)
    client = AsyncCaptionClient("a:1,b:2", client_factory=fleet, concurrency=4)
    results = run(client.caption([f"img{i}".encode() for i in range(40)]))
    assert all(r.ok and r.attempts == 1 for r in results)
    assert len(fleet.calls("a:1")) == len(fleet.calls("b:2")) == 20
    assert {r.endpoint for r in results} == {"a:1", "b:2"}
    assert [s["ok"] for s in client.stats()] == [20, 20]


@pytest.mark.parametrize(
    "error",
    [UNAVAILABLE, SOCKET_CLOSED, STUB_DEAD, RELOADING],
    ids=["refused", "connection-lost", "stub-crash", "model-reloading"],
)
def test_broken_endpoint_fails_over_without_losing_images(sleeps, error):
    fleet = Fleet()
    client = AsyncCaptionClient("a:1,b:2", client_factory=fleet, concurrency=4, retry=RetryPolicy(max_attempts=2))
    fleet.down["a:1"] = error
    images = [f"img{i}".encode() for i in range(30)]
    results = run(client.caption(images))
    assert [r.caption for r in results] == [f"caption of img{i}" for i in range(30)]
    assert {r.endpoint for r in results} == {"b:2"}
    a, b = client.stats()
    # Only the requests already on their way when it broke went to a: it was set aside at once.
    assert 1 <= a["failed"] == a["sent"] <= 4 and a["set_aside"] == 1 and not a["up"]
    assert b["ok"] == 30
    assert sleeps == []  # a retry on a fresh endpoint goes out at once


def test_stub_crash_on_the_only_endpoint_is_retried_with_backoff(sleeps):
    fake = FakeTriton(plan={b"img": [STUB_DEAD, STUB_DEAD]})
    client = AsyncCaptionClient(triton_client=fake, retry=RetryPolicy(max_attempts=4, initial_backoff=0.1))
    res = run(client.caption_one(b"img"))
    assert res.caption == "caption of img" and res.attempts == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("error", [INVALID, ("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found")])
def test_answers_about_the_request_are_never_retried(sleeps, error):
    fleet = Fleet()
    client = AsyncCaptionClient("a:1,b:2", client_factory=fleet)
    fleet.fakes["a:1"].plan[b"img"] = [error]
    fleet.fakes["b:2"].plan[b"img"] = [error]
    with pytest.raises(core.CaptionError) as e:
        run(client.caption_one(b"img", name="x.png"))
    assert e.value.status == error[0] and e.value.attempts == 1
    assert len(fleet.fakes["a:1"].calls) + len(fleet.fakes["b:2"].calls) == 1 and sleeps == []
    assert all(s["up"] for s in client.stats())  # a bad image says nothing about the endpoint


def test_overloaded_endpoint_retries_elsewhere_at_once(sleeps):
    fleet = Fleet()
    client = AsyncCaptionClient("a:1,b:2", client_factory=fleet)
    fleet.fakes["a:1"].plan[b"img"] = [QUEUE_FULL]
    res = run(client.caption_one(b"img"))
    assert res.endpoint == "b:2" and res.attempts == 2 and sleeps == []
    assert all(s["up"] for s in client.stats())


def test_set_aside_endpoint_is_probed_then_gets_traffic_again():
    async def go():
        fleet = Fleet(delay=0.002)
        async with AsyncCaptionClient("a:1,b:2", client_factory=fleet, concurrency=2, set_aside_s=0.2) as c:
            fleet.down["a:1"] = UNAVAILABLE
            first = await c.caption([f"x{i}".encode() for i in range(10)])
            assert not c.stats()[0]["up"]
            a_calls = len(fleet.fakes["a:1"].calls)
            await asyncio.sleep(0.25)
            # Still down when the probe comes: set aside again (longer), no image sent there.
            await c.caption([b"y0"])
            await asyncio.sleep(0.05)
            assert len(fleet.calls("a:1", probes=True)) == 1
            assert len(fleet.fakes["a:1"].calls) == a_calls + 1
            del fleet.down["a:1"]
            await asyncio.sleep(0.45)  # the failed probe set it aside for twice as long
            await c.caption([b"z0"])  # starts the probe, which passes
            await asyncio.sleep(0.05)
            assert c.stats()[0]["up"] and len(fleet.calls("a:1", probes=True)) == 2
            later = await c.caption([f"w{i}".encode() for i in range(10)])
            return first, later, fleet

    first, later, fleet = run(go())
    assert all(r.ok for r in first + later)
    assert {r.endpoint for r in later} == {"a:1", "b:2"}


def test_all_endpoints_down_gives_up_after_max_attempts(sleeps):
    fleet = Fleet()
    client = AsyncCaptionClient("a:1,b:2", client_factory=fleet, retry=RetryPolicy(max_attempts=4))
    fleet.down["a:1"] = fleet.down["b:2"] = UNAVAILABLE
    with pytest.raises(core.CaptionError) as e:
        run(client.caption_one(b"img", name="p.png"))
    assert e.value.attempts == 4 and str(e.value).startswith("p.png: server unavailable after 4 attempts")
    assert len(fleet.fakes["a:1"].calls) + len(fleet.fakes["b:2"].calls) == 4
    assert len(sleeps) == 2  # the first retry went to the other endpoint at once


# --- deadlines -------------------------------------------------------------------------


def test_a_retry_sends_the_time_left():
    fake = FakeTriton(plan={b"img": [UNAVAILABLE]}, delay=lambda data: 0.2)
    client = AsyncCaptionClient(triton_client=fake, timeout=2.0, retry=RetryPolicy(initial_backoff=0.0))
    res = run(client.caption_one(b"img"))
    assert res.ok and res.attempts == 2
    first, second = fake.calls
    assert 1.95e6 < first["server_timeout_us"] <= 2.0e6
    assert 1.5e6 < second["server_timeout_us"] <= first["server_timeout_us"] - 0.2e6  # the first attempt's 0.2 s are spent
    for call in (first, second):
        # the gRPC deadline is the time left plus the grace before an abandoned call is cancelled
        assert call["timeout"] == pytest.approx(call["server_timeout_us"] / 1e6 + core.CANCEL_GRACE_S, abs=1e-5)


def test_retries_stay_within_the_images_deadline():
    fake = FakeTriton(plan={b"img": [UNAVAILABLE] * 100})
    client = AsyncCaptionClient(
        triton_client=fake, timeout=0.3, retry=RetryPolicy(max_attempts=100, initial_backoff=0.1, max_backoff=0.1)
    )
    t0 = time.monotonic()
    with pytest.raises(core.CaptionError) as e:
        run(client.caption_one(b"img", name="slow.png"))
    elapsed = time.monotonic() - t0
    assert 0.29 < elapsed < 0.6
    assert e.value.status == "StatusCode.DEADLINE_EXCEEDED"
    assert str(e.value).startswith("slow.png: timed out after 0.3 s (")
    assert "last: UNAVAILABLE: failed to connect" in str(e.value)
    assert all(c["server_timeout_us"] <= 0.3e6 for c in fake.calls) and len(fake.calls) >= 2


def test_attempt_timeout_moves_a_hung_replicas_images_elsewhere():
    fleet = Fleet()
    client = AsyncCaptionClient("a:1,b:2", client_factory=fleet, concurrency=4, timeout=5.0, attempt_timeout=0.1)

    async def hang(*args, **kwargs):  # a stopped process: the connection stays, no answer comes
        from tritonclient.utils import InferenceServerException

        await asyncio.sleep(kwargs["client_timeout"])
        raise InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")

    fleet.fakes["a:1"].infer = hang
    t0 = time.monotonic()
    results = run(client.caption([f"img{i}".encode() for i in range(12)]))
    assert all(r.ok and r.endpoint == "b:2" for r in results)
    assert time.monotonic() - t0 < 1.5  # one attempt timeout lost, not the 5 s deadline
    a, _ = client.stats()
    assert a["failed"] >= 1 and not a["up"]
    calls = fleet.calls("b:2")
    assert all(c["server_timeout_us"] == 100_000 for c in calls)


def test_attempt_timeout_never_exceeds_the_time_left():
    fake = FakeTriton()
    run(AsyncCaptionClient(triton_client=fake, timeout=0.5, attempt_timeout=2.0).caption_one(b"a"))
    assert fake.calls[0]["server_timeout_us"] <= 0.5e6


def test_without_attempt_timeout_a_deadline_is_final(sleeps):
    fake = FakeTriton(plan={b"img": [("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded")]})
    client = AsyncCaptionClient(triton_client=fake, timeout=2.0)
    with pytest.raises(core.CaptionError, match="timed out after 2 s"):
        run(client.caption_one(b"img"))
    assert len(fake.calls) == 1


# --- TLS -------------------------------------------------------------------------------


@pytest.fixture
def pems(tmp_path):
    paths = {}
    for name in ("ca.pem", "client.pem", "client.key"):
        paths[name] = tmp_path / name
        paths[name].write_text(f"-----BEGIN {name}-----\n")
    return paths


def test_tls_files_reach_tritonclient(monkeypatch, pems):
    import tritonclient.grpc.aio as aio

    made = []

    class Recorder:
        def __init__(self, url, **kwargs):
            made.append((url, kwargs))

        async def close(self):
            pass

    monkeypatch.setattr(aio, "InferenceServerClient", Recorder)
    tls = TLSConfig(pems["ca.pem"], pems["client.pem"], pems["client.key"])
    with CaptionClient("a:1,b:2", tls=tls):
        pass
    want = dict(
        ssl=True,
        root_certificates=str(pems["ca.pem"]),
        private_key=str(pems["client.key"]),
        certificate_chain=str(pems["client.pem"]),
    )
    assert made == [("a:1", want), ("b:2", want)]
    made.clear()
    with CaptionClient("a:1"):
        pass
    assert made == [("a:1", {})]  # plaintext unless asked
    made.clear()
    with CaptionClient("a:1", tls=TLSConfig()):
        pass
    assert made == [("a:1", dict(ssl=True, root_certificates=None, private_key=None, certificate_chain=None))]


def test_tls_config_rejects_half_pairs_and_missing_files(pems, tmp_path):
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        TLSConfig(client_cert=pems["client.pem"])
    with pytest.raises(ValueError, match="root certificate .*nope.pem.* not a readable file"):
        TLSConfig(root_cert=tmp_path / "nope.pem")


# --- health ------------------------------------------------------------------------------


def health_main(argv, fleet):
    out = io.StringIO()
    code = health.main(argv, out=out, client_factory=fleet)
    return code, out.getvalue()


def test_health_ok_sends_a_real_image_and_exits_0():
    fleet = Fleet()
    code, out = health_main(["--url", "a:1", "--timeout", "2"], fleet)
    assert code == 0
    assert out.startswith("ok a:1 ") and " ms caption=" in out and "caption of" in out and out.count("\n") == 1
    (call,) = fleet.fakes["a:1"].calls
    assert Image.open(io.BytesIO(call["data"])).format == "PNG"  # a valid image through the whole ensemble
    assert (
        call["model"] == "captioner" and 1.99 <= call["timeout"] <= 2.0 and call["server_timeout_us"] == 1_600_000
    )  # Triton gives up first: no cancellation
    assert fleet.fakes["a:1"].closed


@pytest.mark.parametrize(
    "error, reason",
    [
        (UNAVAILABLE, "UNAVAILABLE: failed to connect"),
        (STUB_DEAD, "INTERNAL: in ensemble 'captioner', Stub process 'encoder_0_0' is not healthy."),
        (RELOADING, "NOT_FOUND: Request for unknown model"),
    ],
)
def test_health_failure_exits_1_with_the_reason(error, reason):
    fleet = Fleet()
    fleet.down["a:1"] = error
    code, out = health_main(["--url", "a:1"], fleet)
    assert code == 1 and out.startswith("FAIL a:1 after ") and reason in out and out.count("\n") == 1


@pytest.mark.parametrize("error", [QUEUE_FULL, ("StatusCode.UNAVAILABLE", "Request timeout expired")])
def test_health_overload_fails_unless_overload_ok(error, monkeypatch):
    fleet = Fleet()
    fleet.down["a:1"] = error
    code, out = health_main(["--url", "a:1"], fleet)
    assert code == 1 and out.startswith("FAIL a:1 ")
    code, out = health_main(["--url", "a:1", "--overload-ok"], fleet)
    assert code == 0 and out.startswith("ok (overloaded) a:1 ") and error[1] in out
    monkeypatch.setenv("CAPTIONER_HEALTH_OVERLOAD_OK", "true")
    assert health_main(["--url", "a:1"], fleet)[0] == 0


@pytest.mark.parametrize("error", [UNAVAILABLE, STUB_DEAD, RELOADING])
def test_health_overload_ok_still_fails_a_broken_replica(error):
    fleet = Fleet()
    fleet.down["a:1"] = error
    code, out = health_main(["--url", "a:1", "--overload-ok"], fleet)
    assert code == 1 and out.startswith("FAIL a:1 ")


def test_health_checks_every_endpoint_and_needs_all():
    fleet = Fleet()
    fleet.down["b:2"] = UNAVAILABLE
    code, out = health_main(["--url", "a:1,b:2"], fleet)
    lines = out.splitlines()
    assert code == 1 and lines[0].startswith("ok a:1") and lines[1].startswith("FAIL b:2")


@pytest.mark.parametrize("argv", [["--timeout", "0"], ["--url", "nohostport"], ["--tls-client-cert", "x.pem"]])
def test_health_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as e:
        health.main(argv, out=io.StringIO(), client_factory=Fleet())
    assert e.value.code == 2


def test_health_tls_flags_and_environment(monkeypatch, pems):
    fleet = Fleet()
    monkeypatch.setenv("CAPTIONER_TLS_ROOT_CERT", str(pems["ca.pem"]))
    code, _ = health_main(
        ["--url", "a:1", "--tls-client-cert", str(pems["client.pem"]), "--tls-client-key", str(pems["client.key"])], fleet
    )
    assert code == 0
    assert fleet.tls["a:1"] == TLSConfig(str(pems["ca.pem"]), str(pems["client.pem"]), str(pems["client.key"]))


def test_cancelled_requests_leave_no_trace_on_the_endpoint():
    async def go():
        fleet = Fleet(delay=10.0)
        c = AsyncCaptionClient("a:1,b:2", client_factory=fleet, concurrency=4)
        task = asyncio.ensure_future(c.caption([b"1", b"2", b"3", b"4"]))
        await asyncio.sleep(0.05)
        assert [e["sent"] for e in c.stats()] == [2, 2]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return c

    c = run(go())
    assert [(e.outstanding, e.ok, e.failed, e.up) for e in c.pool] == [(0, 0, 0, True)] * 2


def test_a_probe_that_crashes_does_not_keep_the_endpoint_out_for_good():
    async def go():
        fleet = Fleet()
        async with AsyncCaptionClient("a:1,b:2", client_factory=fleet, set_aside_s=0.0) as c:
            a = c.pool.endpoints[0]
            c.pool.set_aside(a)

            async def crash(*args, **kwargs):
                raise RuntimeError("channel closed")

            fleet.fakes["a:1"].infer = crash
            c._start_due_probes()
            await asyncio.sleep(0.01)
            return a

    a = run(go())
    assert not a.probing and not a.up and "channel closed" in a.last_error
