"""Plain tritonclient calls to the `captioner` ensemble, as any user would make them."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException


@dataclass
class Answer:
    caption: str | None = None
    score: float | None = None
    status: str | None = None  # gRPC status name when refused, e.g. "StatusCode.INVALID_ARGUMENT"
    message: str | None = None


def image_input(grpcclient, data, dtype: str = "BYTES", shape=None):
    arr = data if isinstance(data, np.ndarray) else np.array([[data]], dtype=np.object_)
    inp = grpcclient.InferInput("IMAGE", list(shape or arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return inp


async def ask(client, grpcclient, data, parameters=None, dtype="BYTES") -> Answer:
    try:
        r = await client.infer("captioner", [image_input(grpcclient, data, dtype)], parameters=parameters)
    except InferenceServerException as e:
        return Answer(status=str(e.status()), message=e.message())
    return Answer(r.as_numpy("CAPTION")[0, 0].decode(), float(r.as_numpy("SCORE")[0, 0]))


async def _ask_all(url: str, jobs: list[tuple], concurrency: int) -> list[Answer]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    gate = asyncio.Semaphore(concurrency)

    async def one(job):
        async with gate:
            return await ask(client, grpcclient, *job)

    try:
        return list(await asyncio.gather(*(one(j) for j in jobs)))
    finally:
        await client.close()


def ask_all(url: str, jobs: list[tuple], concurrency: int = 32) -> list[Answer]:
    """jobs: (data, parameters[, dtype]) tuples, all in flight together (up to `concurrency`)."""
    return asyncio.run(_ask_all(url, jobs, concurrency))


def encode(img: Image.Image, fmt: str = "PNG", size: int | None = None, **kw) -> bytes:
    if size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
