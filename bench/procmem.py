"""Peak memory of a server's process tree while it is under load: a daemon thread samples
the resident set (RSS) and the proportional set (PSS: shared pages divided among the
processes that map them) of every process under the given pids, and keeps the peaks
since the last `reset()`.

Summed RSS counts a library mapped by five processes five times; PSS counts it once, so
PSS is the fairer figure for multi-process servers (Triton's Python-backend stubs, Ray's
workers, MLServer's pool) and RSS the one `ps` and most dashboards show. Both are kept."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import psutil

MIB = 2**20


def tree(pids: Sequence[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            out += [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    return out


def sample(pids: Sequence[int], pss: bool = True) -> tuple[float, float | None]:
    """(summed RSS, summed PSS or None where it cannot be read) in MiB, now."""
    rss, pss_total = 0, 0
    for p in tree(pids):
        try:
            if pss:
                info = p.memory_full_info()
                rss, pss_total = rss + info.rss, pss_total + info.pss
            else:
                rss += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            pss = False
            rss += p.memory_info().rss
    return rss / MIB, (pss_total / MIB if pss else None)


class PeakMemory:
    """Peak RSS and PSS (MiB) of the process trees of `pids`; a context manager that
    samples every `interval` seconds in a daemon thread."""

    def __init__(self, pids: Sequence[int], interval: float = 0.5):
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.pids, self.interval = list(pids), interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.rss_mib: float = 0.0
            self.pss_mib: float | None = 0.0

    def sample(self) -> None:
        rss, pss = sample(self.pids)
        with self._lock:
            self.rss_mib = max(self.rss_mib, rss)
            self.pss_mib = None if pss is None or self.pss_mib is None else max(self.pss_mib, pss)

    def peaks(self) -> dict[str, float | None]:
        self.sample()
        with self._lock:
            return {
                "peak_rss_mib": round(self.rss_mib, 1),
                "peak_pss_mib": None if self.pss_mib is None else round(self.pss_mib, 1),
            }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
