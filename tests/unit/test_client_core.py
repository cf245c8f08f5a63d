"""client.core without a server: image loading, retry/backoff, ordering, concurrency bound,
error messages. The Triton aio client is replaced by a fake with its call signature."""

from __future__ import annotations

import asyncio
import io
import random
import time

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from client import core
from client.core import AsyncCaptionClient, Caption, CaptionClient, CaptionError, RetryPolicy

_real_sleep = asyncio.sleep  # the `sleeps` fixture patches asyncio.sleep; the fake server keeps the real one


class FakeResult:
    def __init__(self, caption: str, score: float, model_version: str = "3:0123abcd"):
        self._out = {
            "CAPTION": np.array([[caption.encode()]], dtype=np.object_),
            "SCORE": np.array([[score]], dtype=np.float32),
            "MODEL_VERSION": np.array([[model_version.encode()]], dtype=np.object_),
        }

    def as_numpy(self, name):
        return self._out.get(name)


class FakeTriton:
    """Answers `caption of <bytes>`; `plan` maps image bytes to a list of statuses to raise first."""

    def __init__(self, plan=None, delay=None):
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.delay = delay or (lambda data: 0.0)
        self.calls = []
        self.in_flight = self.max_in_flight = 0
        self.closed = False

    async def infer(self, model_name, inputs, outputs=None, client_timeout=None, timeout=None, parameters=None):
        (inp,) = inputs
        assert (inp.name(), inp.datatype(), inp.shape()) == ("IMAGE", "BYTES", [1, 1])
        data = deserialize_bytes_tensor(inp._raw_content)[0]
        self.calls.append(
            dict(
                model=model_name,
                data=data,
                timeout=client_timeout,
                server_timeout_us=timeout,
                parameters=parameters,
                outputs=[o.name() for o in outputs or []],
            )
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await _real_sleep(self.delay(data))
            pending = self.plan.get(data)
            if pending:
                status, msg = pending.pop(0)
                raise InferenceServerException(msg=msg, status=status)
            return FakeResult(f"caption of {data.decode(errors='replace')}", -float(len(data)))
        finally:
            self.in_flight -= 1

    async def is_model_ready(self, model, client_timeout=None):
        return True

    async def close(self):
        self.closed = True


@pytest.fixture
def sleeps(monkeypatch):
    """Record backoff sleeps instead of waiting them out."""
    recorded = []

    async def fake_sleep(seconds):
        recorded.append(seconds)
        await _real_sleep(0)

    monkeypatch.setattr(core.asyncio, "sleep", fake_sleep)
    return recorded


def run(coro):
    return asyncio.run(coro)


# --- image loading ---------------------------------------------------------------


def test_encode_image_reads_paths_and_passes_bytes(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"\x89PNG fake")
    assert core.encode_image(f) == b"\x89PNG fake"
    assert core.encode_image(str(f)) == b"\x89PNG fake"
    assert core.encode_image(bytearray(b"xyz")) == b"xyz"


def test_encode_image_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(CaptionError) as e:
        core.encode_image(missing)
    assert str(e.value).startswith(str(missing) + ":")
    assert e.value.status is None and e.value.attempts == 0 and e.value.endpoint is None


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_encode_pillow_image_roundtrips_pixels(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    back = Image.open(io.BytesIO(core.encode_image(img)))
    assert back.format == "PNG" and back.size == (30, 20)
    assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img.convert("RGB")))


def test_encode_image_rejects_other_types():
    with pytest.raises(CaptionError, match="unsupported image type int"):
        core.encode_image(42)


def test_image_names():
    assert core.image_name("x/y.png", 3) == "x/y.png"
    assert core.image_name(b"..", 3) == "<bytes #3>"
    assert core.image_name(Image.new("RGB", (2, 2)), 5) == "<image #5>"


def test_find_images_walks_dirs_sorted_and_keeps_explicit_files(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ["b.png", "a.JPG", "sub/c.jpeg", "notes.txt", "sub/z.bin"]:
        (d / name).write_bytes(b"x")
    explicit = tmp_path / "explicit.dat"
    explicit.write_bytes(b"x")
    missing = tmp_path / "missing.png"
    found = core.find_images([d, explicit, missing])
    assert found == [d / "a.JPG", d / "b.png", d / "sub" / "c.jpeg", explicit, missing]


# --- retry policy ------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    pol = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        draws = [pol.backoff(retry, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.8 * ceiling  # jitter spans the range, not a constant
        assert len(set(draws)) > 100


@pytest.mark.parametrize("kwargs", [dict(max_attempts=0), dict(initial_backoff=-1), dict(multiplier=0.5)])
def test_retry_policy_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_unavailable_is_retried_then_succeeds(sleeps):
    unavailable = ("StatusCode.UNAVAILABLE", "failed to connect to all addresses")
    fake = FakeTriton(plan={b"img": [unavailable, unavailable]})
    client = AsyncCaptionClient(triton_client=fake, retry=RetryPolicy(max_attempts=4, initial_backoff=0.5))
    res = run(client.caption_one(b"img", name="pic.png"))
    assert res == Caption(image="pic.png", caption="caption of img", score=-3.0, model_version="3:0123abcd")
    assert res.attempts == 3
    assert len(fake.calls) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


def test_unavailable_gives_up_after_max_attempts(sleeps):
    fake = FakeTriton(plan={b"img": [("StatusCode.UNAVAILABLE", "connection refused")] * 10})
    client = AsyncCaptionClient(triton_client=fake, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(CaptionError) as e:
        run(client.caption_one(b"img", name="pic.png"))
    assert len(fake.calls) == 3 and len(sleeps) == 2
    assert str(e.value) == "pic.png: server unavailable after 3 attempts: connection refused"
    assert e.value.status == "StatusCode.UNAVAILABLE"


@pytest.mark.parametrize(
    "status, message, expected",
    [
        (
            "StatusCode.INVALID_ARGUMENT",
            "bytes are not a decodable image",
            "rejected by the server: bytes are not a decodable image",
        ),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", "timed out after 2.5 s"),
        ("StatusCode.INTERNAL", "boom", "INTERNAL: boom"),
        ("StatusCode.NOT_FOUND", "no model", "NOT_FOUND: no model"),
    ],
)
def test_other_statuses_are_not_retried(sleeps, status, message, expected):
    fake = FakeTriton(plan={b"img": [(status, message)]})
    client = AsyncCaptionClient(triton_client=fake, timeout=2.5)
    with pytest.raises(CaptionError) as e:
        run(client.caption_one(b"img", name="bad.jpg"))
    assert len(fake.calls) == 1 and sleeps == []
    assert str(e.value).startswith("bad.jpg: " + expected)
    assert e.value.status == status


# --- requests ------------------------------------------------------------------------


def test_parameters_and_timeout_reach_the_request():
    fake = FakeTriton()
    client = AsyncCaptionClient(model="m2", triton_client=fake, timeout=7.0)
    run(client.caption_one(b"a", beam_size=3, max_length=20, temperature=0.5))
    run(client.caption_one(b"b", timeout=1.5))
    first, second = fake.calls
    assert first["model"] == "m2" and first["outputs"] == ["CAPTION", "SCORE", "MODEL_VERSION"]
    assert first["parameters"] == {"beam_size": 3, "max_length": 20, "temperature": 0.5}
    # The first attempt gets (almost) the whole deadline as the server's timeout; the gRPC
    # deadline is CANCEL_GRACE_S later (the caller stops waiting at the deadline itself).
    assert 6.9e6 < first["server_timeout_us"] <= 7.0e6
    assert first["timeout"] == pytest.approx(first["server_timeout_us"] / 1e6 + core.CANCEL_GRACE_S, abs=1e-5)
    assert second["parameters"] is None  # unset options stay the server's defaults
    assert 1.4e6 < second["server_timeout_us"] <= 1.5e6
    assert second["timeout"] == pytest.approx(second["server_timeout_us"] / 1e6 + core.CANCEL_GRACE_S, abs=1e-5)


def test_a_caller_past_its_deadline_is_answered_at_once_and_the_call_is_not_cancelled():
    """Triton 2.51 can crash when a cancellation races a response: a late call is left to
    finish in the background while the caller gets DEADLINE_EXCEEDED on time."""
    fake = FakeTriton(delay=lambda data: 0.3)
    client = AsyncCaptionClient(triton_client=fake, timeout=0.1, retry=RetryPolicy(max_attempts=1))

    async def go():
        t0 = time.monotonic()
        with pytest.raises(CaptionError) as e:
            await client.caption_one(b"slow")
        waited = time.monotonic() - t0
        assert fake.in_flight == 1  # still running on the server side: not cancelled
        await _real_sleep(0.4)
        return waited, e.value

    waited, err = run(go())
    assert waited < 0.25 and err.status == "StatusCode.DEADLINE_EXCEEDED"
    assert fake.in_flight == 0  # it finished on its own


def test_no_deadline_sends_no_timeouts():
    fake = FakeTriton()
    run(AsyncCaptionClient(triton_client=fake, timeout=None).caption_one(b"a"))
    assert fake.calls[0]["timeout"] is None and fake.calls[0]["server_timeout_us"] is None


def test_batch_keeps_input_order_and_returns_errors(tmp_path):
    paths = []
    for i in range(12):
        p = tmp_path / f"{i:02d}.png"
        p.write_bytes(f"img{i}".encode())
        paths.append(str(p))
    paths.insert(5, str(tmp_path / "missing.png"))
    rng = random.Random(1)
    delays = {f"img{i}".encode(): rng.uniform(0, 0.02) for i in range(12)}
    fake = FakeTriton(
        plan={b"img7": [("StatusCode.INVALID_ARGUMENT", "image is empty (0 bytes)")]},
        delay=lambda data: delays[data],
    )
    client = AsyncCaptionClient(triton_client=fake, concurrency=4)
    results = run(client.caption(paths))
    assert [r.image for r in results] == paths
    bad = {r.image: str(r.error) for r in results if not r.ok}
    assert bad == {
        paths[5]: f"{paths[5]}: cannot read file: No such file or directory",
        paths[8]: f"{paths[8]}: rejected by the server: image is empty (0 bytes)",
    }
    for r in results:
        if r.ok:
            assert r.caption == "caption of " + open(r.image).read()
            assert r.model_version == "3:0123abcd"  # which model answered, from MODEL_VERSION


def test_a_server_without_model_version_leaves_it_none():
    class Older(FakeResult):
        def as_numpy(self, name):
            return None if name == "MODEL_VERSION" else super().as_numpy(name)

    caption = core.parse_result(Older("a dog", -1.0), "x.png")
    assert (caption.caption, caption.score, caption.model_version) == ("a dog", -1.0, None)


def test_concurrency_is_bounded_and_used():
    fake = FakeTriton(delay=lambda data: 0.01)
    client = AsyncCaptionClient(triton_client=fake, concurrency=3)
    results = run(client.caption([f"x{i}".encode() for i in range(20)]))
    assert all(r.ok for r in results) and len(fake.calls) == 20
    assert fake.max_in_flight == 3


def test_mixed_input_kinds_in_one_batch(tmp_path):
    p = tmp_path / "f.png"
    p.write_bytes(b"from-file")
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    fake = FakeTriton()
    results = run(AsyncCaptionClient(triton_client=fake).caption([str(p), b"raw", img]))
    assert [r.image for r in results] == [str(p), "<bytes #1>", "<image #2>"]
    assert fake.calls[0]["data"] == b"from-file" and fake.calls[1]["data"] == b"raw"
    assert Image.open(io.BytesIO(fake.calls[2]["data"])).getpixel((0, 0)) == (1, 2, 3)


def test_sync_client_wraps_async_and_closes():
    fake = FakeTriton()
    with CaptionClient(triton_client=fake, concurrency=2) as c:
        assert c.is_ready()
        assert c.caption_one(b"q").caption == "caption of q"
        assert [r.caption for r in c.caption([b"1", b"2", b"3"], beam_size=2)] == ["caption of 1", "caption of 2", "caption of 3"]
    assert fake.closed
    assert fake.calls[-1]["parameters"] == {"beam_size": 2}
    with pytest.raises(RuntimeError, match="closed"):
        c.caption([b"x"])


@pytest.mark.parametrize("kwargs", [dict(concurrency=0), dict(timeout=0)])
def test_client_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AsyncCaptionClient(triton_client=FakeTriton(), **kwargs)


# --- call_without_cancel (the Locust users' raw gRPC calls) ---------------------------------


@pytest.fixture
def slow_grpc_server():
    """A real in-process gRPC server whose one method answers after `delay_s`, and records
    whether the call was still alive (not cancelled by the client) when it answered."""
    from concurrent import futures

    import grpc

    seen = {"delay_s": 0.0, "alive_at_end": []}

    def handle(request, context):
        time.sleep(seen["delay_s"])
        seen["alive_at_end"].append(context.is_active())
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(handle)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    method = channel.unary_unary("/test.Echo/Call")  # bytes in, bytes out
    yield method, seen
    channel.close()
    server.stop(None)


def test_call_without_cancel_answers_in_time_and_gives_up_without_cancelling(slow_grpc_server):
    method, seen = slow_grpc_server
    assert core.call_without_cancel(method, b"scene", 2.0) == b"scene"
    seen["delay_s"] = 0.6
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="Deadline Exceeded"):
        core.call_without_cancel(method, b"scene", 0.1)
    assert time.monotonic() - start < 0.5  # the caller is answered at its deadline
    time.sleep(0.8)
    # The server finished the abandoned call with it still open: no cancellation reached it
    # (a plain `method(request, timeout=0.1)` leaves False here).
    assert seen["alive_at_end"] == [True, True]
