"""Stopping on SIGTERM/SIGINT without deadlocking the process that stops.

A Python signal handler runs in the main thread between any two bytecodes, also while
that thread holds the lock inside a threading.Event it is waiting on: `Event.set()` from
a handler then blocks on that lock for good, and the process ignores every later signal.
StopFlag's handler only sets plain attributes; its wait() (called by the main thread)
turns them into the event that other threads may wait on.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Self


class StopFlag:
    """`flag.install()` routes SIGTERM and SIGINT to it; the main thread loops on
    `flag.wait(0.5)`; other threads read `flag.is_set()` or call `flag.set()`."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.signalled = False

    def __call__(self, signum: int | None = None, frame: object = None) -> None:
        # the signal handler: attributes only, no lock
        self.reason = self.reason or (signal.Signals(signum).name if signum else "stop")
        self.signalled = True

    def install(self, *signums: int) -> Self:
        """Handle `signums` (default SIGTERM and SIGINT: a shell starts background jobs
        with SIGINT ignored, and Ctrl-C must still stop in order). Main thread only."""
        for s in signums or (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self)
        return self

    def set(self, reason: str = "stop") -> None:
        """Stop from a thread (never from a signal handler)."""
        self.reason = self.reason or reason
        self.event.set()

    def is_set(self) -> bool:
        return self.signalled or self.event.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until stopped or `timeout_s` passed (None: until stopped); True once
        stopped. Waits in short steps: a signal delivered to another thread does not
        interrupt the main thread's wait."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.signalled and not self.event.is_set():
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                break
            self.event.wait(left)
        if self.signalled:
            self.event.set()
        return self.event.is_set()
