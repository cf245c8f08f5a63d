"""Readiness as a load balancer sees it: Triton's `/v2/health/ready` over HTTP, asked once
(`http_ready`) or watched in a thread (`ReadinessWatch`) to time an outage: when it first
said NOT ready, and when it was ready again after that.

Shared by the fault harness (bench/faults) and the pod emulator (deploy/k8s), so neither
imports the other. Standard library only: it runs wherever the client does."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable

READY_PATH = "/v2/health/ready"


def http_ready(http_url: str, path: str = READY_PATH, timeout_s: float = 1.0) -> bool:
    """Whether `http://<http_url><path>` answers 200 within `timeout_s` (a refused or
    timed-out connection is NOT ready, not an error)."""
    try:
        with urllib.request.urlopen(f"http://{http_url}{path}", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


class ReadinessWatch:
    """Polls `ready()` every `interval_s` in a thread while the `with` block runs:
    `not_ready_at` is the first time it said NOT ready, `ready_again_at` the first time it
    said ready after that (for a supervised server: the repair done). Both are
    time.monotonic() values, or None when it never happened."""

    def __init__(self, ready: Callable[[], bool], interval_s: float = 0.05):
        self.ready, self.interval_s = ready, interval_s
        self.not_ready_at: float | None = None
        self.ready_again_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="readiness-watch", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready = self.ready()
            if self.not_ready_at is None and not ready:
                self.not_ready_at = time.monotonic()
            elif self.not_ready_at is not None and self.ready_again_at is None and ready:
                self.ready_again_at = time.monotonic()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ReadinessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
