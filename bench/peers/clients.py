"""The load driver's clients for the peers (bench/loadgen.py runs them like the Triton and
naive clients): each peer's own protocol, plus the batch sizes its batcher formed.

- Ray Serve: loadgen.HttpClient, raw image bytes, request parameters in the query string;
- LitServe: JsonImageClient, base64 image in JSON (LitServe parses the body as JSON);
- MLServer: loadgen.TritonClient, the V2 gRPC request the Triton stack gets, unchanged.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode

from ..loadgen import HttpClient, TritonClient
from .pipeline import read_batch_logs


class JsonImageClient(HttpClient):
    """POST {"image": base64, "parameters": {...}} to `url`; a reply counts when it is 200
    with a JSON `caption`. The bodies are built once per image (client CPU the server
    would otherwise not get)."""

    def __init__(self, url: str, images: Sequence[bytes], parameters: dict | None = None):
        super().__init__(url, images, content_type="application/json")
        self.images = [
            json.dumps({"image": base64.b64encode(b).decode(), "parameters": parameters or {}}).encode() for b in images
        ]


class BatchStats:
    """A client plus the peer's batch log as `model_stats` (the shape bench.stacks'
    run_levels reads from Triton's statistics): executions = batches, inferences =
    requests, compute = the pipeline's time per batch; the queue time is not known
    (NaN)."""

    def __init__(self, client, batch_log_dir: str | Path):
        self.client, self.dir = client, Path(batch_log_dir)

    async def __aenter__(self) -> BatchStats:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.__aexit__(*exc)

    async def __call__(self, i: int):
        return await self.client(i)

    async def model_stats(self) -> dict[str, dict[str, float]]:
        batches, rows, ns = read_batch_logs(self.dir)
        return {
            "peer": {
                "executions": float(batches),
                "inferences": float(rows),
                "requests": float(rows),
                "queue_ns": math.nan,
                "exec_compute_ns": float(ns),
                "request_compute_ns": float(ns),
            }
        }


def client(name: str, server, images: Sequence[bytes], parameters: dict | None, batch_log_dir: str | Path):
    """The load driver's client for peer `name` (a bench.peers.launch.PeerServer)."""
    inner: HttpClient | TritonClient
    if name == "ray":
        query = f"?{urlencode(parameters)}" if parameters else ""
        inner = HttpClient(f"{server.url}/caption{query}", images)
    elif name == "litserve":
        inner = JsonImageClient(f"{server.url}/predict", images, parameters)
    elif name == "mlserver":
        inner = TritonClient(server.grpc_url, images, parameters=parameters)
    else:
        raise ValueError(f"unknown peer {name!r}")
    return BatchStats(inner, batch_log_dir)
