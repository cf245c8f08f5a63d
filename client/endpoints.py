"""Several Triton endpoints behind one client: parsing, which errors mean what, and which
endpoint gets the next request.

No I/O here: the retry driver (client.retry), which the asyncio client (client.core), the
Locust user (loadtest/locustfile.py) and the overload bench (bench/overload.py) all run,
drives the same `EndpointPool` and `classify`, so failover behaves the same in each.

What the statuses mean was seen against tritonserver 2.51 (see README, Client library):
- UNAVAILABLE: connection refused or lost ("Socket closed"), server shutting down: this
  replica is gone for now. UNAVAILABLE "Exceeds maximum queue size" / "Request timeout
  expired": the replica is alive but overloaded.
- INTERNAL "Stub process '<instance>' is not healthy": a Python-backend stub died; the
  model stays broken on that replica until it is reloaded.
- NOT_FOUND "... has no available versions": a model of the ensemble is being unloaded or
  reloaded on that replica. (NOT_FOUND "... is not found" is a wrong model name: final.)
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_endpoints(url: str | Iterable[str]) -> list[str]:
    """`host:port[,host:port...]` (or a list of them) -> distinct `host:port` strings, in order.

    A `grpc://` prefix is tolerated; anything else that is not host:port is a ValueError."""
    items = url.split(",") if isinstance(url, str) else [part for u in url for part in str(u).split(",")]
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        if item.startswith("grpc://"):
            item = item[len("grpc://") :]
        if not item:
            raise ValueError(f"empty endpoint in {url!r} (want host:port[,host:port...])")
        m = _HOST_PORT.match(item)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"endpoint {raw.strip()!r} is not host:port (e.g. localhost:8001)")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError("no endpoint given (want host:port[,host:port...])")
    return out


class Failure(enum.Enum):
    BROKEN = "broken"  # this replica cannot serve now: retry elsewhere, set it aside
    OVERLOADED = "overloaded"  # alive but full: retry with backoff, preferably elsewhere
    FINAL = "final"  # an answer about the request itself: never retried


_OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")
_STUB_DEAD = re.compile(r"Stub process '[^']*' is not healthy")


def classify(status: str | None, message: str | None) -> Failure:
    """What a failed call tells us. `status` is gRPC's "StatusCode.NAME" (tritonclient's
    InferenceServerException.status() and str(grpc.StatusCode.X) both read that way)."""
    status = status or ""
    message = message or ""
    if status == "StatusCode.UNAVAILABLE":
        if any(m in message for m in _OVERLOAD_MESSAGES):
            return Failure.OVERLOADED
        return Failure.BROKEN
    if status == "StatusCode.INTERNAL" and _STUB_DEAD.search(message):
        return Failure.BROKEN
    if status == "StatusCode.NOT_FOUND" and "has no available versions" in message:
        return Failure.BROKEN
    return Failure.FINAL


def status_text(status: str | None) -> str:
    """A gRPC status for people: "StatusCode.UNAVAILABLE" -> "UNAVAILABLE"."""
    return (status or "unknown status").removeprefix("StatusCode.")


@dataclass
class Endpoint:
    url: str
    client: Any = None  # the transport the driver attached (a tritonclient, a gRPC stub, ...)
    outstanding: int = 0
    up: bool = True
    set_aside_until: float = 0.0
    probing: bool = False
    strikes: int = 0  # consecutive set-asides without a successful probe or request
    generation: int = 0  # bumped by each set-aside: tells answers to older attempts apart
    # counters for reports
    sent: int = 0
    ok: int = 0
    failed: int = 0
    set_aside_count: int = 0
    last_error: str = field(default="", repr=False)

    def stats(self) -> dict:
        return {
            "url": self.url,
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "set_aside": self.set_aside_count,
            "up": self.up,
            "last_error": self.last_error,
        }


class EndpointPool:
    """Least-outstanding spreading with round-robin among ties; a broken endpoint is set
    aside for `set_aside_s` (doubling per repeated failure up to `max_set_aside_s`) and is
    probed before it gets traffic again.

    Drivers call `pick()` before each attempt, `started`/`finished` around it, `due_for_probe()`
    to learn which set-aside endpoints to probe now, and `probe_result()` with the outcome.
    When every endpoint is set aside, `pick()` returns the one whose time is up first: with
    nothing else to try, a real request is the probe (and a single endpoint keeps working
    like a plain client with retries)."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        set_aside_s: float = 1.0,
        max_set_aside_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if set_aside_s < 0 or max_set_aside_s < set_aside_s:
            raise ValueError("need 0 <= set_aside_s <= max_set_aside_s")
        self.endpoints = [Endpoint(u) for u in urls]
        if not self.endpoints:
            raise ValueError("an EndpointPool needs at least one endpoint")
        self.set_aside_s, self.max_set_aside_s = set_aside_s, max_set_aside_s
        self.clock = clock
        self._next = 0  # round-robin start among equally loaded endpoints

    def __iter__(self):
        return iter(self.endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)

    def pick(self, avoid: Iterable[Endpoint] = ()) -> Endpoint:
        avoided = {id(e) for e in avoid}
        up = [e for e in self.endpoints if e.up]
        candidates = [e for e in up if id(e) not in avoided] or up
        if not candidates:
            # Everything is set aside: the request itself goes to the one due first.
            return min(self.endpoints, key=lambda e: (e.set_aside_until, e.outstanding))
        n = len(self.endpoints)
        order = {id(e): (self.endpoints.index(e) - self._next) % n for e in candidates}
        chosen = min(candidates, key=lambda e: (e.outstanding, order[id(e)]))
        self._next = (self.endpoints.index(chosen) + 1) % n
        return chosen

    def started(self, ep: Endpoint) -> int:
        """An attempt goes out; pass what this returns to `finished`."""
        ep.outstanding += 1
        ep.sent += 1
        return ep.generation

    def finished(self, ep: Endpoint, failure: Failure | None, message: str = "", since: int | None = None) -> None:
        """Record an attempt's outcome: None for success. `since` is what `started` returned."""
        ep.outstanding -= 1
        if failure is None:
            ep.ok += 1
            # An answer to a request sent before the endpoint was set aside proves nothing
            # (after a stub dies, requests past that model still finish): only the probe, or
            # a request sent to it while set aside, brings it back.
            if since is None or since == ep.generation:
                self._bring_up(ep)
            return
        ep.failed += 1
        ep.last_error = message
        # A failure of a request sent before the last set-aside belongs to that outage.
        if failure is Failure.BROKEN and (since is None or since == ep.generation):
            self.set_aside(ep)

    def abandoned(self, ep: Endpoint) -> None:
        """An attempt that ended without an answer either way (cancelled by the caller)."""
        ep.outstanding -= 1
        ep.sent -= 1

    def set_aside(self, ep: Endpoint) -> None:
        now = self.clock()
        if not ep.up and ep.set_aside_until > now:
            return  # already set aside: in-flight failures of the same outage count once
        ep.strikes += 1
        ep.set_aside_count += 1
        ep.generation += 1
        ep.up = False
        ep.set_aside_until = now + min(self.max_set_aside_s, self.set_aside_s * 2 ** (ep.strikes - 1))

    def due_for_probe(self) -> list[Endpoint]:
        """Set-aside endpoints whose time is up and that nobody probes yet; marks them probing."""
        now = self.clock()
        due = [e for e in self.endpoints if not e.up and not e.probing and e.set_aside_until <= now]
        for e in due:
            e.probing = True
        return due

    def probe_result(self, ep: Endpoint, healthy: bool, message: str = "") -> None:
        ep.probing = False
        if healthy:
            self._bring_up(ep)
        else:
            ep.last_error = message or ep.last_error
            ep.up = True  # so that set_aside() starts a fresh, longer period
            self.set_aside(ep)

    def _bring_up(self, ep: Endpoint) -> None:
        ep.up, ep.strikes, ep.set_aside_until = True, 0, 0.0

    def stats(self) -> list[dict]:
        return [e.stats() for e in self.endpoints]
