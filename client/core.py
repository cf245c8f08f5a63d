"""Caption images with the `captioner` Triton ensemble over gRPC.

One implementation, asyncio (`AsyncCaptionClient`); `CaptionClient` drives it from
synchronous code on a private event loop, so retry, failover, concurrency and error
handling exist once. Retries and failover are the shared driver's (client.retry); the
wire contract is client.wire's.

Deadlines: `timeout` is the whole time an image may take, retries and backoff included.
Each attempt waits for the time left, and carries it as Triton's request timeout
(`timeout`, microseconds) so that a server whose queue policy allows the override drops a
request nobody waits for any more. An attempt given up is not cancelled at once
(`infer_without_cancel`: Triton 2.51 can crash on a cancellation racing a response).

The names this module has always offered are imported here from where they now live, so
`from client.core import ...` keeps working.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

from client.endpoints import Endpoint, EndpointPool, parse_endpoints
from client.images import IMAGE_EXTENSIONS, ImageLike, encode_image, find_images, image_name, probe_image
from client.results import Caption, CaptionError, failure_error, parse_result
from client.retry import AttemptFailed, Retry, RetryPolicy, drive_async, run_probe_async, start_due_probes
from client.tls import TLSConfig, make_triton_client
from client.wire import (
    CANCEL_GRACE_S,
    attempt_failed,
    call_without_cancel,
    image_input,
    infer_without_cancel,
    requested_outputs,
)

__all__ = [
    "CANCEL_GRACE_S",
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "IMAGE_EXTENSIONS",
    "AsyncCaptionClient",
    "Caption",
    "CaptionClient",
    "CaptionError",
    "ImageLike",
    "RetryPolicy",
    "TLSConfig",
    "call_without_cancel",
    "caption",
    "decode_parameters",
    "encode_image",
    "find_images",
    "image_input",
    "image_name",
    "infer_without_cancel",
    "make_triton_client",
    "probe_image",
]

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "captioner"


def decode_parameters(beam_size: int | None, max_length: int | None, temperature: float | None) -> dict:
    params: dict[str, int | float] = {}
    if beam_size is not None:
        params["beam_size"] = int(beam_size)
    if max_length is not None:
        params["max_length"] = int(max_length)
    if temperature is not None:
        params["temperature"] = float(temperature)
    return params


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

    async def __aenter__(self) -> AsyncCaptionClient:
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
        inputs = [image_input(encode_image(image, name))]
        params = decode_parameters(beam_size, max_length, temperature) or None
        budget = self.timeout if timeout is None else timeout
        retry = Retry(
            self.pool, self.retry, timeout=budget, attempt_timeout=self.attempt_timeout, rng=self._rng, probe=self._spawn_probe
        )

        async def attempt(a):
            try:
                return await infer_without_cancel(
                    a.endpoint.client,
                    a.wait_s,
                    self.model,
                    inputs,
                    outputs=requested_outputs(),
                    timeout=a.server_timeout_us,
                    parameters=params,
                )
            except InferenceServerException as e:
                raise attempt_failed(e) from None

        outcome = await drive_async(retry, attempt)
        if not outcome.ok:
            raise failure_error(name, outcome, budget)
        return parse_result(outcome.value, name, outcome.attempts, outcome.endpoint.url if outcome.endpoint else None)

    def _start_due_probes(self) -> None:
        start_due_probes(self.pool, self._spawn_probe)

    def _spawn_probe(self, ep: Endpoint) -> None:
        task = asyncio.ensure_future(self._probe(ep))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, ep: Endpoint) -> None:
        """One tiny real inference: readiness alone would pass a replica whose stub is dead."""
        from tritonclient.utils import InferenceServerException

        data = self._probe_data = self._probe_data or probe_image()

        async def check() -> None:
            try:
                result = await ep.client.infer(
                    self.model,
                    [image_input(data)],
                    outputs=requested_outputs(),
                    client_timeout=self.probe_timeout,
                    timeout=int(self.probe_timeout * 1e6),
                )
                parse_result(result, "probe")
            except InferenceServerException as e:
                raise attempt_failed(e) from None
            except CaptionError as e:
                raise AttemptFailed(None, e.reason) from None

        await run_probe_async(self.pool, ep, check)

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
                        image,
                        beam_size=beam_size,
                        max_length=max_length,
                        temperature=temperature,
                        timeout=timeout,
                        name=name,
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

    def __enter__(self) -> CaptionClient:
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
    with CaptionClient(
        url, model, concurrency=concurrency, timeout=timeout, attempt_timeout=attempt_timeout, retry=retry, tls=tls
    ) as c:
        return c.caption(images, **decode)
