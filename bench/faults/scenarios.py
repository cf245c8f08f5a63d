"""The fault scenarios, registered by name in SCENARIOS (in the order a run takes them).

A scenario is called as SCENARIOS[name](run, model) with the FaultRun (plan, images,
repositories, record) and a model name, and records one result per fault with
run.record(...). Most get a launcher on the model's default repository from the
@scenario decorator; one that needs other repositories starts its own (launched=False).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from client.readiness import ReadinessWatch
from launcher.supervisor import stubs_of

from ..loadgen import TritonClient, run_level
from ..overload import run_overload
from ..stacks import model_breakdown
from .harness import Launcher
from .load import back_to_normal, captions_with_retries, first_caption, liveness_during, outcome, plain_callers, under_load

if TYPE_CHECKING:
    from .runner import FaultRun

Scenario = Callable[["FaultRun", str], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, launched: bool = True):
    """Register the decorated function as scenario `name`. launched: it is called as
    fn(run, model, launcher) inside `with` a launcher on the model's default repository;
    otherwise as fn(run, model), and starts what it needs itself."""

    def register(fn):
        if launched:

            def start(run: FaultRun, model: str) -> None:
                with run.launch(model, name) as launcher:
                    fn(run, model, launcher)

            SCENARIOS[name] = start
        else:
            SCENARIOS[name] = fn
        return fn

    return register


@scenario("overload", launched=False)
def overload(run: FaultRun, model: str) -> None:
    """Capacity at 8 clients, then the plan's overload clients with deadlines (before:
    a repository without load shedding, when --baseline)."""
    if run.a.baseline:
        with run.launch(model, "overload-unbounded", "unbounded") as launcher:
            measure_overload(run, model, launcher, shedding=False)
    with run.launch(model, "overload", "tight" if run.plan.queue_budget_ms else "default") as launcher:
        measure_overload(run, model, launcher)


def measure_overload(run: FaultRun, model: str, launcher: Launcher, shedding: bool = True) -> None:
    p, params = run.plan, run.params(model)

    async def go():
        async with TritonClient(launcher.grpc_url, run.images, parameters=params) as c:
            await first_caption(c)
            base = await run_level(c, 1, duration=2.0, warmup=0.5, min_completed=5)
            cap = await run_level(c, 8, duration=p.capacity_s, warmup=1.0, min_completed=16)
            before = await c.model_stats()
            done = asyncio.Event()
            probes = asyncio.ensure_future(liveness_during(launcher.grpc_url, done))
            try:
                over = await run_overload(
                    launcher.grpc_url, run.images, p.overload_clients[model], p.overload_s, p.deadline_s, parameters=params
                )
            finally:
                done.set()
            liveness = await probes
            after = await c.model_stats()
            recovered = await back_to_normal(c, base.p50_ms * 1.5 + 2.0)
            return base, cap, over, before, after, recovered, liveness

    base, cap, over, before, after, recovered, liveness = asyncio.run(go())
    run.record(
        scenario="overload",
        model=model,
        shedding=shedding,
        capacity_8=cap.throughput,
        idle_p50_ms=base.p50_ms,
        goodput=over.goodput,
        goodput_ratio=over.goodput / cap.throughput if cap.throughput else float("nan"),
        recovered_s=recovered,
        overload=over.to_dict(),
        inside_triton=model_breakdown(before, after),
        liveness=liveness,
    )


@scenario("stub-kill")
def stub_kill(run: FaultRun, model: str, launcher: Launcher) -> None:
    """SIGKILL of each Python model's stub on a caption's path, in turn."""
    for target in launcher.stub_models():
        stub_fault(run, model, launcher, target, "stub-kill")


@scenario("hang")
def hang(run: FaultRun, model: str, launcher: Launcher) -> None:
    """SIGSTOP of the encoder's stub inside an execute: an execute that never returns."""
    stub_fault(run, model, launcher, launcher.encoder_model(), "hang")


@scenario("hang-idle")
def hang_idle(run: FaultRun, model: str, launcher: Launcher) -> None:
    """SIGSTOP of the encoder's stub between executes: a process frozen while idle."""
    stub_fault(run, model, launcher, launcher.encoder_model(), "hang-idle")


def faulted_load(
    run: FaultRun, model: str, launcher: Launcher, fault: Callable[[], object], repaired: Callable[[], bool], watch_s: float = 0.0
) -> tuple[list, float, object]:
    """load.under_load with the run's images, clients and the model's parameters, against
    `launcher`, watching for up to watch_s (default: the plan's)."""
    return under_load(
        launcher.grpc_url, run.images, run.plan.fault_clients, run.params(model), fault, watch_s or run.plan.watch_s, repaired
    )


def stub_fault(run: FaultRun, model: str, launcher: Launcher, target: str, name: str) -> None:
    """One stub fault under client-library load, timed by readiness: NOT ready, and
    ready again (the supervisor's repair)."""
    fault: Callable[[], object]
    if name == "stub-kill":
        sig, fault = signal.SIGKILL, lambda: os.kill(launcher.stub(target), signal.SIGKILL)
    else:
        sig, fault = signal.SIGSTOP, lambda: launcher.stop_stub(target, inside=name == "hang")
    with ReadinessWatch(launcher.ready) as watch:
        log, t_fault, stopped = faulted_load(run, model, launcher, fault, lambda: watch.ready_again_at is not None)
    inside = stopped[1] if isinstance(stopped, tuple) else None  # stop_stub's (pid, inside); a kill returns None

    def after(t: float | None) -> float | None:
        return None if t is None else round(t - t_fault, 2)

    run.record(
        scenario=name,
        model=model,
        target=target,
        signal=signal.Signals(sig).name,
        stopped={True: "inside an execute", False: "between executes", None: None}[inside],
        not_ready_after_s=after(watch.not_ready_at),
        repaired_after_s=after(watch.ready_again_at),
        **outcome(log, t_fault),
        supervisor=launcher.supervisor_events()[-6:],
    )


@scenario("server-kill")
def server_kill(run: FaultRun, model: str, launcher: Launcher) -> None:
    """SIGKILL of tritonserver itself: captions again, and no stub of it left behind."""
    ts = launcher.tritonserver()
    old_stubs = [s.pid for s in stubs_of(ts.pid)]
    log, t_kill, _ = faulted_load(run, model, launcher, ts.kill, lambda: True, run.plan.watch_s * 2)
    run.record(
        scenario="server-kill",
        model=model,
        **outcome(log, t_kill),
        orphaned_stubs_left=sum(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in old_stubs),
        supervisor=launcher.supervisor_events()[-6:],
    )


@scenario("abort-in-repair")
def abort_in_repair(run: FaultRun, model: str, launcher: Launcher) -> None:
    """SIGKILL of the first stub model's stub, then SIGABRT of tritonserver once the
    supervisor repairs it: what the Python backend does when the stub died holding its
    shared-memory lock (boost::interprocess::lock_exception while the model reloads). The
    endpoints close at once but the process may linger: the reload must be given up and
    the server restarted, not waited out while every client is refused. Now and then the
    kill alone makes tritonserver abort before the repair begins; that is recorded as
    such (`abort`: "by itself")."""
    target = launcher.stub_models()[0]
    server = launcher.tritonserver()
    seen = len(launcher.supervisor_events())
    aborted: list[tuple[str, float]] = []  # (how, when)

    def abort_once_repairing() -> None:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            events = launcher.supervisor_events()[seen:]
            if any("server_exited" in e for e in events):
                aborted.append(("by itself", time.monotonic()))
                return
            if any("model_broken" in e for e in events):
                time.sleep(0.05)  # the unload is done and the reload sent (it takes ~2 s)
                server.send_signal(signal.SIGABRT)
                aborted.append(("SIGABRT during the repair", time.monotonic()))
                return
            time.sleep(0.005)

    def fault() -> None:
        os.kill(launcher.stub(target), signal.SIGKILL)
        threading.Thread(target=abort_once_repairing, name="abort", daemon=True).start()

    def ready_after_abort() -> float | None:
        t = watch.ready_again_at
        return t - aborted[0][1] if aborted and t is not None and t > aborted[0][1] else None

    with ReadinessWatch(launcher.ready) as watch:
        log, t_fault, _ = faulted_load(run, model, launcher, fault, lambda: ready_after_abort() is not None)
    after_abort = ready_after_abort()
    run.record(
        scenario="abort-in-repair",
        model=model,
        target=target,
        abort=aborted[0][0] if aborted else None,
        aborted_after_s=round(aborted[0][1] - t_fault, 2) if aborted else None,
        ready_again_after_abort_s=None if after_abort is None else round(after_abort, 2),
        **outcome(log, t_fault),
        supervisor=launcher.supervisor_events()[seen:][-6:],
    )


@scenario("drain")
def drain(run: FaultRun, model: str, launcher: Launcher) -> None:
    """SIGTERM to the launcher under load. Plain tritonclient (no retries): what did each
    request get?"""
    results: list = []  # (sent, done, status)

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(
            plain_callers(launcher.grpc_url, run.images[0], run.plan.fault_clients * 2, run.params(model), stop, results)
        )
        await asyncio.sleep(3.0)
        t_term = time.monotonic()
        launcher.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(launcher.proc.wait, 120)
        stop.set()
        await task
        return t_term

    t_term = asyncio.run(go())
    # In flight at SIGTERM: sent before it, answered after it. These were accepted and
    # must all be captioned; what was answered before SIGTERM is not the drain's doing.
    in_flight = [r for r in results if r[0] < t_term <= r[1]]
    after: dict[str, int] = {}
    for r in results:
        if r[0] >= t_term:
            after[r[2]] = after.get(r[2], 0) + 1
    lost: dict[str, int] = {}
    for r in in_flight:
        if r[2] != "OK":
            lost[r[2]] = lost.get(r[2], 0) + 1
    run.record(
        scenario="drain",
        model=model,
        launcher_exit=launcher.proc.returncode,
        accepted=len(in_flight),
        in_flight_at_sigterm=len(in_flight),
        accepted_lost=sum(lost.values()),
        accepted_lost_by_status=lost,
        after_sigterm=after,
        stopped_after_s=round(max((r[1] for r in results), default=t_term) - t_term, 2),
    )


@scenario("soak")
def soak(run: FaultRun, model: str, launcher: Launcher) -> None:
    """Steady load from clients of the client library (retries, backoff) for soak_s:
    requests lost after retries, and the server's memory before and after."""
    log: list = []

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(
            captions_with_retries(launcher.grpc_url, run.images, run.plan.soak_clients, stop, run.params(model), log)
        )
        await asyncio.sleep(5.0)  # warm: allocators, caches
        rss0, t0 = launcher.rss_mb(), time.monotonic()
        await asyncio.sleep(run.plan.soak_s)
        rss1, t1 = launcher.rss_mb(), time.monotonic()
        stop.set()
        await task
        return rss0, rss1, t0, t1

    rss0, rss1, t0, t1 = asyncio.run(go())
    window = [r for r in log if t0 <= r[1] <= t1]
    lost = [e for _, done, ok, e in window if not ok]
    run.record(
        scenario="soak",
        model=model,
        seconds=round(t1 - t0, 1),
        requests=len(window),
        failed=len(lost),
        lost_samples=lost[:3],
        throughput=(len(window) - len(lost)) / (t1 - t0),
        rss_start_mb=round(rss0, 1),
        rss_end_mb=round(rss1, 1),
        rss_growth=(rss1 - rss0) / rss0,
    )
