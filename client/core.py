"""Caption images with the `captioner` Triton ensemble over gRPC.

One implementation, asyncio (`AsyncCaptionClient`); `CaptionClient` drives it from
synchronous code on a private event loop, so retry, concurrency and error handling
exist once.

Wire contract: input `IMAGE` (BYTES, [1] per item: encoded image file bytes), outputs
`CAPTION` (BYTES) and `SCORE` (FP32, total log-probability); decoding options travel as
request parameters `beam_size`, `max_length`, `temperature`.
"""
from __future__ import annotations

import asyncio
import io
import os
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = "captioner"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_UNAVAILABLE = "StatusCode.UNAVAILABLE"
_DEADLINE = "StatusCode.DEADLINE_EXCEEDED"


class CaptionError(Exception):
    """One image could not be captioned. `str()` starts with the image's name."""

    def __init__(self, image: str, message: str, status: str | None = None):
        super().__init__(f"{image}: {message}")
        self.image = image
        self.reason = message
        self.status = status  # gRPC status such as "StatusCode.INVALID_ARGUMENT", None for local errors


@dataclass(frozen=True)
class Caption:
    """The outcome for one input image: a caption and its score, or the error."""

    image: str
    caption: str | None = None
    score: float | None = None  # total log-probability of the caption
    error: CaptionError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for UNAVAILABLE only: the server is starting,
    restarting or briefly unreachable. Every other status is an answer, not a hiccup."""

    max_attempts: int = 4
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

    `concurrency` bounds the requests in flight per `caption()` call; `timeout` (seconds) is the
    default per-attempt deadline (tritonclient's client_timeout); `triton_client` lets a caller
    supply a ready `tritonclient.grpc.aio.InferenceServerClient`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        *,
        concurrency: int = 8,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        triton_client=None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.url, self.model = url, model
        self.concurrency, self.timeout = concurrency, timeout
        self.retry = retry or RetryPolicy()
        if triton_client is None:
            import tritonclient.grpc.aio as grpcclient

            triton_client = grpcclient.InferenceServerClient(url)
        self._client = triton_client
        self._rng = random.Random()

    async def __aenter__(self) -> "AsyncCaptionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        """True when the server answers and the model is loaded."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._client.is_model_ready(self.model))
        except InferenceServerException:
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
        deadline = self.timeout if timeout is None else timeout
        attempt = 1
        while True:
            try:
                result = await self._client.infer(
                    self.model,
                    [_image_input(data)],
                    outputs=_requested_outputs(),
                    client_timeout=deadline,
                    parameters=params or None,
                )
                return _parse_result(result, name)
            except InferenceServerException as e:
                status = e.status()
                if status == _UNAVAILABLE and attempt < self.retry.max_attempts:
                    await asyncio.sleep(self.retry.backoff(attempt, self._rng))
                    attempt += 1
                    continue
                raise _error_from(e, name, attempt, deadline) from None

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
                    return Caption(image=name, error=e)

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

    def __init__(self, url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, **kwargs):
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

    def caption_one(self, image: ImageLike, **kwargs) -> Caption:
        return self._run(self._async.caption_one(image, **kwargs))

    def caption(self, images: Sequence[ImageLike], **kwargs) -> list[Caption]:
        return self._run(self._async.caption(images, **kwargs))


def caption(
    images: Sequence[ImageLike],
    url: str = DEFAULT_URL,
    *,
    model: str = DEFAULT_MODEL,
    concurrency: int = 8,
    timeout: float | None = 30.0,
    retry: RetryPolicy | None = None,
    **decode,
) -> list[Caption]:
    """One-shot convenience: connect, caption `images` (decode options: beam_size,
    max_length, temperature), close."""
    with CaptionClient(url, model, concurrency=concurrency, timeout=timeout, retry=retry) as c:
        return c.caption(images, **decode)


def _image_input(data: bytes):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    return inp


def _requested_outputs():
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput("CAPTION"), grpcclient.InferRequestedOutput("SCORE")]


def _parse_result(result, name: str) -> Caption:
    caps, scores = result.as_numpy("CAPTION"), result.as_numpy("SCORE")
    if caps is None or scores is None or caps.size != 1 or scores.size != 1:
        raise CaptionError(name, "server response lacks a single CAPTION and SCORE")
    text = caps.reshape(-1)[0]
    text = text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else str(text)
    return Caption(image=name, caption=text, score=float(scores.reshape(-1)[0]))


def _error_from(e, name: str, attempts: int, deadline: float | None) -> CaptionError:
    status = e.status()
    detail = e.message() or "no details"
    if status == _DEADLINE:
        msg = f"timed out after {deadline:g} s (no answer within the deadline)"
    elif status == _UNAVAILABLE:
        msg = f"server unavailable after {attempts} attempt{'s' if attempts > 1 else ''}: {detail}"
    elif status == "StatusCode.INVALID_ARGUMENT":
        msg = f"rejected by the server: {detail}"
    else:
        msg = f"{_status_text(status)}: {detail}"
    return CaptionError(name, msg, status)
