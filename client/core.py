"""Caption images with the `captioner` Triton ensemble over gRPC.

One implementation, asyncio (`AsyncCaptionClient`); `CaptionClient` drives it from
synchronous code on a private event loop, so retry, failover, concurrency and error
handling exist once.

Deadlines: `timeout` is the whole time an image may take, retries and backoff included.
Each attempt waits for the time left, and carries it as Triton's request timeout
(`timeout`, microseconds) so that a server whose queue policy allows the override drops a
request nobody waits for any more. An attempt given up is not cancelled at once
(`infer_without_cancel`: Triton 2.51 can crash on a cancellation racing a response).

Wire contract: input `IMAGE` (BYTES, [1] per item: encoded image file bytes), outputs
`CAPTION` (BYTES) and `SCORE` (FP32, total log-probability); decoding options travel as
request parameters `beam_size`, `max_length`, `temperature`.
"""
from __future__ import annotations

import asyncio
import io
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from client.endpoints import EndpointPool, Failure, classify, parse_endpoints

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "captioner"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_UNAVAILABLE = "StatusCode.UNAVAILABLE"
_DEADLINE = "StatusCode.DEADLINE_EXCEEDED"
# How much longer than the caller waits an abandoned call may run before gRPC cancels it.
CANCEL_GRACE_S = 5.0


async def infer_without_cancel(client, wait_s: float | None, model: str, inputs, **kwargs):
    """`client.infer(model, inputs, **kwargs)`, given up after `wait_s` (DEADLINE_EXCEEDED to the caller)
    without cancelling the call: it runs on in the background, its gRPC deadline
    `CANCEL_GRACE_S` later, while Triton's own `timeout` (the caller's time left, in
    kwargs) drops it if it is still queued. Why: Triton 2.51 can crash (SIGSEGV in its
    gRPC handler) when a cancellation races a response being completed (upstream issues
    7368 and 8034, fixed in 24.12); seen here twice in one 128-client overload run, where
    every late caller cancelled. A server that answers late is then only answered into
    the void; a hung one is still cancelled once the grace is over."""
    if wait_s is None:
        return await client.infer(model, inputs, client_timeout=None, **kwargs)
    call = asyncio.ensure_future(client.infer(model, inputs, client_timeout=wait_s + CANCEL_GRACE_S, **kwargs))
    try:
        return await asyncio.wait_for(asyncio.shield(call), wait_s)
    except asyncio.TimeoutError:
        _abandon(call)  # the event loop holds tasks only weakly
        from tritonclient.utils import InferenceServerException

        raise InferenceServerException("Deadline Exceeded", status=_DEADLINE) from None


def call_without_cancel(method, request, wait_s: float):
    """The synchronous counterpart of `infer_without_cancel` for a raw gRPC stub method
    (`GRPCInferenceServiceStub(...).ModelInfer`, the Locust users): its answer if it comes
    within `wait_s` seconds, else TimeoutError while the call runs on, its gRPC deadline
    CANCEL_GRACE_S later. RpcError as gRPC raises it."""
    import grpc

    call = method.future(request, timeout=wait_s + CANCEL_GRACE_S)
    try:
        return call.result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        _abandon(call)  # a gRPC future that is garbage collected cancels its call
        raise TimeoutError("Deadline Exceeded (the call was left to run out, not cancelled)") from None


_abandoned: set = set()  # calls given up on but left to run: referenced until they end


def _abandon(call) -> None:
    """Keep a call given up on (an asyncio task or a gRPC future) referenced until it ends."""
    _abandoned.add(call)
    call.add_done_callback(_forget)


def _forget(call) -> None:
    _abandoned.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved: no "exception was never retrieved" warning


class CaptionError(Exception):
    """One image could not be captioned. `str()` starts with the image's name."""

    def __init__(self, image: str, message: str, status: str | None = None, *, attempts: int = 0,
                 endpoint: str | None = None):
        super().__init__(f"{image}: {message}")
        self.image = image
        self.reason = message
        self.status = status  # gRPC status such as "StatusCode.INVALID_ARGUMENT", None for local errors
        self.attempts = attempts  # requests sent for this image; 0 for local errors (unreadable file, ...)
        self.endpoint = endpoint  # where the last attempt went, None when nothing was sent


@dataclass(frozen=True)
class Caption:
    """The outcome for one input image: a caption and its score, or the error."""

    image: str
    caption: str | None = None
    score: float | None = None  # total log-probability of the caption
    error: CaptionError | None = None
    # How it went; not part of the outcome, so not compared.
    attempts: int = field(default=1, compare=False)
    endpoint: str | None = field(default=None, compare=False)  # the one that answered (or failed last)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter, for failures that say
    "this replica cannot serve right now" (client.endpoints.classify): UNAVAILABLE
    (unreachable, restarting, overloaded), a dead Python-backend stub, a model being
    reloaded. Every other status is an answer about the request, never retried.

    A retry on another endpoint that this image has not tried yet goes out at once;
    backoff applies when the retry goes back to an endpoint already tried. All of it stays
    within the image's deadline. Eight attempts: the backoff ceilings (0.2 ... 5 s) then
    add up past the ~2 s a model reload takes on a lone endpoint; with four, a reload lost
    17 and 21 of 1,000 images in two runs here, with eight none."""

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


@dataclass(frozen=True)
class TLSConfig:
    """gRPC over TLS. `root_cert`: PEM file of the CA that signed the server's certificate
    (None: the system's roots). `client_cert` + `client_key`: PEM files for mutual TLS."""

    root_cert: str | os.PathLike | None = None
    client_cert: str | os.PathLike | None = None
    client_key: str | os.PathLike | None = None

    def __post_init__(self):
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        for what, path in (("root certificate", self.root_cert), ("client certificate", self.client_cert),
                           ("client key", self.client_key)):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"TLS {what} {os.fspath(path)!r} is not a readable file")

    def client_kwargs(self) -> dict:
        """tritonclient.grpc(.aio).InferenceServerClient's TLS arguments (it reads the files)."""
        return {
            "ssl": True,
            "root_certificates": _path_or_none(self.root_cert),
            "private_key": _path_or_none(self.client_key),
            "certificate_chain": _path_or_none(self.client_cert),
        }


def _path_or_none(p) -> str | None:
    return os.fspath(p) if p else None


def make_triton_client(url: str, tls: TLSConfig | None = None):
    """A tritonclient.grpc.aio client for one endpoint (lazy: connects on first use)."""
    import tritonclient.grpc.aio as grpcclient

    return grpcclient.InferenceServerClient(url, **(tls.client_kwargs() if tls else {}))


def probe_image() -> bytes:
    """A small valid image (a red square on white, 32 px PNG) made in memory, for health
    checks and endpoint probes: one real pass through the whole ensemble, cheaply."""
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste((220, 30, 30), (10, 10, 22, 22))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_name(image: ImageLike, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return getattr(image, "filename", None) or f"<image #{index}>"
    return f"<bytes #{index}>"


def encode_image(image: ImageLike, name: str | None = None) -> bytes:
    """Encoded image file bytes for the wire. Paths are read as they are, bytes pass through
    (the server decodes and validates both), Pillow images are written as PNG."""
    name = name or image_name(image, 0)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise CaptionError(name, f"cannot read file: {e.strerror or e}") from None
    if isinstance(image, Image.Image):
        # PNG keeps every mode the server accepts losslessly; others (CMYK, I;16, ...) go through RGB.
        img = image if image.mode in ("RGB", "RGBA", "L", "LA", "P", "1") else image.convert("RGB")
        buf = io.BytesIO()
        try:
            img.save(buf, format="PNG")
        except (OSError, ValueError) as e:
            raise CaptionError(name, f"cannot encode Pillow image as PNG: {e}") from None
        return buf.getvalue()
    raise CaptionError(name, f"unsupported image type {type(image).__name__} (want a path, bytes or a Pillow image)")


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories walked recursively for image extensions, sorted."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(p)  # a missing file becomes that image's error, not a crash
    return found


def decode_parameters(beam_size: int | None, max_length: int | None, temperature: float | None) -> dict:
    params = {}
    if beam_size is not None:
        params["beam_size"] = int(beam_size)
    if max_length is not None:
        params["max_length"] = int(max_length)
    if temperature is not None:
        params["temperature"] = float(temperature)
    return params


def _status_text(status: str | None) -> str:
    return (status or "unknown status").removeprefix("StatusCode.")


class AsyncCaptionClient:
    """asyncio client. Use as `async with AsyncCaptionClient(url) as c: await c.caption(paths)`.

    `url`: one endpoint `host:port`, or several (`"h1:8001,h2:8001"` or a list): requests go to
    the endpoint with the fewest in flight (round-robin among ties); a broken endpoint is set
    aside (`set_aside_s`, doubling per repeated failure up to 30 s) and probed with one real
    tiny inference before it gets traffic again.
    `concurrency` bounds the requests in flight per `caption()` call. `timeout` (seconds, None
    for none) is the default deadline of each image, retries included. `attempt_timeout`
    (seconds, None: the time left) caps one attempt, so that a replica that hangs without
    closing its connection (stopped process, lost host) costs that much, not the whole
    deadline: an attempt that runs out of it counts as a broken endpoint. `tls`: a TLSConfig.
    `triton_client` lets a caller supply a ready `tritonclient.grpc.aio.InferenceServerClient`
    (single endpoint); `client_factory(url, tls)` makes one per endpoint.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        *,
        concurrency: int = 8,
        timeout: float | None = 30.0,
        attempt_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        tls: TLSConfig | None = None,
        set_aside_s: float = 1.0,
        probe_timeout: float = 5.0,
        triton_client=None,
        client_factory=None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if attempt_timeout is not None and attempt_timeout <= 0:
            raise ValueError(f"attempt_timeout must be > 0 seconds, got {attempt_timeout}")
        urls = parse_endpoints(url)
        if triton_client is not None and len(urls) > 1:
            raise ValueError("triton_client serves one endpoint; use client_factory for several")
        self.urls, self.model = urls, model
        self.url = ",".join(urls)
        self.concurrency, self.timeout, self.attempt_timeout = concurrency, timeout, attempt_timeout
        self.retry = retry or RetryPolicy()
        self.tls, self.probe_timeout = tls, probe_timeout
        self.pool = EndpointPool(urls, set_aside_s=set_aside_s)
        factory = client_factory or make_triton_client
        for ep in self.pool:
            ep.client = triton_client if triton_client is not None else factory(ep.url, tls)
        self._rng = random.Random()
        self._probes: set[asyncio.Task] = set()
        self._probe_data: bytes | None = None

    async def __aenter__(self) -> "AsyncCaptionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for t in list(self._probes):
            t.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        for ep in self.pool:
            await ep.client.close()

    def stats(self) -> list[dict]:
        """Per endpoint: attempts sent, ok, failed, times set aside, up now."""
        return self.pool.stats()

    async def is_ready(self) -> bool:
        """True when some endpoint answers and has the model loaded (a shallow check: a dead
        Python stub still reads ready; client.health does a real inference)."""
        from tritonclient.utils import InferenceServerException

        for ep in self.pool:
            try:
                if await ep.client.is_model_ready(self.model, client_timeout=self.probe_timeout):
                    return True
            except InferenceServerException:
                continue
        return False

    async def caption_one(
        self,
        image: ImageLike,
        *,
        beam_size: int | None = None,
        max_length: int | None = None,
        temperature: float | None = None,
        timeout: float | None = None,
        name: str | None = None,
    ) -> Caption:
        """Caption one image; raises CaptionError (naming the image) on failure."""
        from tritonclient.utils import InferenceServerException

        name = name or image_name(image, 0)
        data = encode_image(image, name)
        params = decode_parameters(beam_size, max_length, temperature)
        budget = self.timeout if timeout is None else timeout
        if budget is not None and budget <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {budget}")
        deadline = None if budget is None else time.monotonic() + budget
        tried: list = []
        attempt = 0
        last = None
        while True:
            attempt += 1
            self._start_due_probes()
            ep = self.pool.pick(avoid=tried)
            if attempt > 1 and any(ep is t for t in tried):
                # Back to an endpoint this image already failed on: give it time.
                pause = self.retry.backoff(attempt - 1, self._rng)
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(pause)
                self._start_due_probes()
                ep = self.pool.pick(avoid=tried)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _deadline_error(name, budget, attempt - 1, last, tried) from None
            capped = self.attempt_timeout is not None and (left is None or self.attempt_timeout < left)
            this = self.attempt_timeout if capped else left
            tried.append(ep)
            since = self.pool.started(ep)
            try:
                result = await infer_without_cancel(
                    ep.client, this, self.model, [_image_input(data)],
                    outputs=_requested_outputs(),
                    timeout=None if this is None else max(1, int(this * 1e6)),
                    parameters=params or None,
                )
            except InferenceServerException as e:
                failure = classify(e.status(), e.message())
                if capped and e.status() == _DEADLINE:
                    failure = Failure.BROKEN  # no answer within attempt_timeout: try another replica
                self.pool.finished(ep, failure, e.message() or "", since)
                last = e
                if failure is Failure.FINAL or attempt >= self.retry.max_attempts:
                    raise _error_from(e, name, attempt, this if capped else budget, ep.url) from None
                continue
            except BaseException:
                self.pool.abandoned(ep)  # cancelled or a local fault: no verdict on the endpoint
                raise
            self.pool.finished(ep, None, since=since)
            try:
                return _parse_result(result, name, attempt, ep.url)
            except CaptionError as e:
                e.attempts, e.endpoint = attempt, ep.url
                raise

    def _start_due_probes(self) -> None:
        for ep in self.pool.due_for_probe():
            task = asyncio.ensure_future(self._probe(ep))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, ep) -> None:
        """One tiny real inference: readiness alone would pass a replica whose stub is dead."""
        from tritonclient.utils import InferenceServerException

        if self._probe_data is None:
            self._probe_data = probe_image()
        try:
            result = await ep.client.infer(
                self.model, [_image_input(self._probe_data)], outputs=_requested_outputs(),
                client_timeout=self.probe_timeout, timeout=int(self.probe_timeout * 1e6),
            )
            _parse_result(result, "probe")
        except InferenceServerException as e:
            self.pool.probe_result(ep, False, e.message() or _status_text(e.status()))
            return
        except CaptionError as e:
            self.pool.probe_result(ep, False, e.reason)
            return
        except asyncio.CancelledError:
            ep.probing = False
            raise
        except Exception as e:  # whatever it was, the endpoint must not stay "being probed" forever
            self.pool.probe_result(ep, False, f"probe failed: {e!r}")
            return
        self.pool.probe_result(ep, True)

    async def caption_iter(
        self,
        images: Sequence[ImageLike],
        *,
        beam_size: int | None = None,
        max_length: int | None = None,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Caption]:
        """Caption many images, at most `concurrency` in flight; yields in input order as soon
        as each is done. Failures are yielded as Captions with `.error`, never raised."""
        sem = asyncio.Semaphore(self.concurrency)

        async def one(i: int, image: ImageLike) -> Caption:
            name = image_name(image, i)
            async with sem:
                try:
                    return await self.caption_one(
                        image, beam_size=beam_size, max_length=max_length, temperature=temperature,
                        timeout=timeout, name=name,
                    )
                except CaptionError as e:
                    return Caption(image=name, error=e, attempts=e.attempts, endpoint=e.endpoint)

        tasks = [asyncio.ensure_future(one(i, img)) for i, img in enumerate(images)]
        try:
            for t in tasks:
                yield await t
        finally:
            for t in tasks:
                t.cancel()

    async def caption(self, images: Sequence[ImageLike], **kwargs) -> list[Caption]:
        """All results, in input order; per-image errors are in `Caption.error`."""
        return [c async for c in self.caption_iter(images, **kwargs)]


class CaptionClient:
    """Synchronous client: `AsyncCaptionClient` on a private event loop.

    Not for use inside a running event loop: use AsyncCaptionClient there.
    """

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, model: str = DEFAULT_MODEL, **kwargs):
        self._loop = asyncio.new_event_loop()

        async def make() -> AsyncCaptionClient:
            # grpc.aio binds its channel to the loop it is created on.
            return AsyncCaptionClient(url, model, **kwargs)

        try:
            self._async = self._loop.run_until_complete(make())
        except BaseException:
            self._loop.close()
            raise

    def __enter__(self) -> "CaptionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._async.close())
            self._loop.close()

    def _run(self, coro):
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("CaptionClient is closed")
        return self._loop.run_until_complete(coro)

    def is_ready(self) -> bool:
        return self._run(self._async.is_ready())

    def stats(self) -> list[dict]:
        return self._async.stats()

    def caption_one(self, image: ImageLike, **kwargs) -> Caption:
        return self._run(self._async.caption_one(image, **kwargs))

    def caption(self, images: Sequence[ImageLike], **kwargs) -> list[Caption]:
        return self._run(self._async.caption(images, **kwargs))


def caption(
    images: Sequence[ImageLike],
    url: str | Sequence[str] = DEFAULT_URL,
    *,
    model: str = DEFAULT_MODEL,
    concurrency: int = 8,
    timeout: float | None = 30.0,
    attempt_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    tls: TLSConfig | None = None,
    **decode,
) -> list[Caption]:
    """One-shot convenience: connect, caption `images` (decode options: beam_size,
    max_length, temperature), close."""
    with CaptionClient(url, model, concurrency=concurrency, timeout=timeout, attempt_timeout=attempt_timeout,
                       retry=retry, tls=tls) as c:
        return c.caption(images, **decode)


def _image_input(data: bytes):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    return inp


def _requested_outputs():
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput("CAPTION"), grpcclient.InferRequestedOutput("SCORE")]


def _parse_result(result, name: str, attempts: int = 1, endpoint: str | None = None) -> Caption:
    caps, scores = result.as_numpy("CAPTION"), result.as_numpy("SCORE")
    if caps is None or scores is None or caps.size != 1 or scores.size != 1:
        raise CaptionError(name, "server response lacks a single CAPTION and SCORE")
    text = caps.reshape(-1)[0]
    text = text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else str(text)
    return Caption(image=name, caption=text, score=float(scores.reshape(-1)[0]), attempts=attempts, endpoint=endpoint)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _error_from(e, name: str, attempts: int, budget: float | None, endpoint: str) -> CaptionError:
    status = e.status()
    detail = e.message() or "no details"
    if status == _DEADLINE and attempts > 1:
        msg = f"timed out ({_plural(attempts, 'attempt')}, the last given {budget:g} s)"
    elif status == _DEADLINE:
        msg = f"timed out after {budget:g} s (no answer within the deadline)"
    elif status == _UNAVAILABLE:
        msg = f"server unavailable after {_plural(attempts, 'attempt')}: {detail}"
    elif status == "StatusCode.INVALID_ARGUMENT":
        msg = f"rejected by the server: {detail}"
    elif attempts > 1:
        msg = f"{_status_text(status)} after {_plural(attempts, 'attempt')}: {detail}"
    else:
        msg = f"{_status_text(status)}: {detail}"
    return CaptionError(name, msg, status, attempts=attempts, endpoint=endpoint)


def _deadline_error(name: str, budget: float, attempts: int, last, tried) -> CaptionError:
    """The image's deadline ran out between attempts (while backing off from failures)."""
    msg = f"timed out after {budget:g} s ({_plural(attempts, 'attempt')}"
    if last is not None:
        msg += f", last: {_status_text(last.status())}: {last.message() or 'no details'}"
    return CaptionError(name, msg + ")", _DEADLINE, attempts=attempts, endpoint=tried[-1].url if tried else None)
