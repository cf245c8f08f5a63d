"""Triton's model-control HTTP API (load, unload, the repository index) for the
supervisor, on plain http.client: one connection per call, so any thread may call it
(tritonclient.http runs on gevent, whose hub belongs to one thread).

A call that waits for its answer asks `serving()` every `poll_s` and is abandoned with
ServerGone when it says no. A tritonserver that aborts inside its Python backend
(`boost::interprocess::lock_exception` when a stub died holding a shared-memory lock)
closes its endpoints at once, but its process can linger; a load sent just before would
otherwise wait out its whole timeout while every client is refused."""

from __future__ import annotations

import http.client
import json
import select
import time
import urllib.parse
from collections.abc import Callable


class ControlError(RuntimeError):
    """Triton answered a model-control call with an error status."""


class ServerGone(RuntimeError):
    """The server stopped serving while a call waited for its answer."""


class ModelControl:
    """The subset of tritonclient.http.InferenceServerClient the supervisor uses.

    url: host:port of Triton's HTTP endpoint. timeout_s: for connecting and for the
    answer. serving: None, or a callable asked while a call waits (False ends it)."""

    def __init__(self, url: str, timeout_s: float, *, serving: Callable[[], bool] | None = None, poll_s: float = 0.25):
        host, _, port = url.rpartition(":")
        self.host, self.port = host, int(port)
        self.timeout_s, self.serving, self.poll_s = timeout_s, serving, poll_s

    def load_model(self, name: str, headers: dict[str, str] | None = None) -> None:
        self._call(f"/v2/repository/models/{urllib.parse.quote(name)}/load", headers)

    def unload_model(self, name: str, headers: dict[str, str] | None = None) -> None:
        self._call(f"/v2/repository/models/{urllib.parse.quote(name)}/unload", headers)

    def get_model_repository_index(self, headers: dict[str, str] | None = None) -> list[dict]:
        return json.loads(self._call("/v2/repository/index", headers) or b"[]")

    def _call(self, path: str, headers: dict[str, str] | None) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json", **(headers or {})})
            self._wait_answer(conn, path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = body[:300].decode(errors="replace")
            raise ControlError(f"[{resp.status}] {message}")
        return body

    def _wait_answer(self, conn: http.client.HTTPConnection, path: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"POST {path}: no answer within {self.timeout_s:g} s")
            readable, _, _ = select.select([conn.sock], [], [], min(self.poll_s, left))
            if readable:
                return
            if self.serving is not None and not self.serving():
                raise ServerGone(f"tritonserver stopped serving while POST {path} waited")
