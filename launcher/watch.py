"""What the supervisor (launcher/supervisor.py) judges a server by: Triton's metrics per
model, the hang rule over execution counts and execute clocks, and the deep probe run off
the supervision loop's thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{metric: {model: value}} from Prometheus text, for the given metric names."""
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for line in text.splitlines():
        name, brace, rest = line.partition("{")
        if not brace or name not in out:
            continue
        labels, _, value = rest.rpartition("}")
        model = next((kv.split("=", 1)[1].strip('"') for kv in labels.split(",") if kv.startswith("model=")), None)
        if model is not None:
            out[name][model] = out[name].get(model, 0.0) + float(value)
    return out


@dataclass
class HangWatch:
    """Per model: since when its execution count has not moved while requests were
    pending, and how much CPU its stubs used meanwhile.

    Stalled for `timeout_s` with idle stubs (a deadlock, a wait that never ends) is a
    hang. A stub that keeps computing is given `busy_factor` times longer: a heavy batch
    on a machine loaded far beyond what the build measured is slow, not hung, and killing
    it would turn overload into an outage."""

    timeout_s: float
    busy_factor: float = 4.0
    idle_cpu_share: float = 0.05  # of one core, over the stalled time
    _last: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # model -> (count, since, cpu then)
    _stamps: dict[tuple, tuple[float, float]] = field(default_factory=dict)  # (kind, instance, pid, stamp) -> (seen, cpu then)

    def update(
        self, pending: dict[str, float], executions: dict[str, float], now: float, cpu: dict[str, float] | None = None
    ) -> list[str]:
        cpu = cpu or {}
        hung = []
        for model, count in executions.items():
            prev = self._last.get(model)
            if prev is None or prev[0] != count or pending.get(model, 0) <= 0:
                self._last[model] = (count, now, cpu.get(model, 0.0))
                continue
            stalled = now - prev[1]
            busy = cpu.get(model, 0.0) - prev[2] > self.idle_cpu_share * stalled
            if stalled > self.timeout_s * (self.busy_factor if busy else 1.0):
                hung.append(model)
        return hung

    def instances(
        self,
        stamps: dict[str, tuple[int, float]],
        live: dict[str, int],
        now: float,
        cpu: dict[str, float] | None = None,
        kind: str = "execute",
    ) -> list[str]:
        """Per stub: an instance whose stamp is older than the bound, the same idle/busy
        rule. `kind` "execute": the stamp is when its current execute began (its own clock,
        captioner.serving.triton.ExecuteClock), which finds one hung instance of a model
        whose other instances keep its execution count moving; "heartbeat": its last
        heartbeat, which finds one frozen between executes. `live`: instance -> pid of the
        stubs alive now (a killed stub's stale stamp is ignored); `stamps`: instance ->
        (pid, monotonic time)."""
        cpu = cpu or {}
        hung = []
        seen = {k: v for k, v in self._stamps.items() if k[0] != kind}
        for instance, (pid, stamp) in stamps.items():
            if live.get(instance) != pid:
                continue
            key = (kind, instance, pid, stamp)
            first = self._stamps.get(key)
            if first is None:
                first = (now, cpu.get(instance, 0.0))
            seen[key] = first
            watched = now - first[0]
            busy = watched > 0 and cpu.get(instance, 0.0) - first[1] > self.idle_cpu_share * watched
            if now - stamp > self.timeout_s * (self.busy_factor if busy else 1.0):
                hung.append(instance)
        self._stamps = seen
        return hung

    def reset(self) -> None:
        self._last.clear()
        self._stamps.clear()


class BackgroundProbe:
    """Runs a blocking probe every `interval_s` in a daemon thread, so that a probe stuck
    behind a hung model never stalls the supervision loop. Results are tagged with a
    generation: those started before the last `reset()` (a restart, a reload) are dropped."""

    def __init__(self, fn: Callable[[], str | None], interval_s: float):
        self.fn, self.interval_s = fn, interval_s
        self._results: queue.Queue = queue.Queue()
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="captioner-probe", daemon=True)

    def start(self) -> BackgroundProbe:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            generation = self._generation
            try:
                result = self.fn()
            except Exception as e:  # noqa: BLE001 - a probe that raises has failed
                result = f"{type(e).__name__}: {e}"
            self._results.put((generation, result))
            self._stop.wait(self.interval_s)

    def reset(self) -> None:
        self._generation += 1

    def poll(self) -> list[str | None]:
        """Results finished since the last poll (None = a caption came back)."""
        out: list[str | None] = []
        while True:
            try:
                generation, result = self._results.get_nowait()
            except queue.Empty:
                return out
            if generation == self._generation:
                out.append(result)

    def stop(self) -> None:
        self._stop.set()
