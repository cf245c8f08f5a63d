"""`make faults`: production faults against a real, supervised server, measured.

    python -m bench.faults                 # the full report: reports/faults.md + faults.json
    python -m bench.faults --quick         # minutes; the test suite runs this mode
    python -m bench.faults --scenarios overload --models seed-inception

Every scenario starts the launcher the way `make serve` does (`python -m launcher
--no-build`, supervised, model control explicit) on free ports and talks to it over gRPC:

- overload: capacity at 8 clients, then N closed-loop clients with 2 s deadlines that
  back off when refused (bench/overload.py): goodput / capacity, refusal latency, and how
  long after the load stops a single client's latency is back to normal;
- stub-kill: SIGKILL of each Python model's stub in turn; hang: SIGSTOP of one while it
  is inside an execute (an execute that never returns); hang-idle: SIGSTOP of one between
  executes (a process frozen while idle); each while clients of the client
  library caption with retries: time until readiness says NOT ready and until it is
  ready again (repaired), time until captions come back, requests lost;
- server-kill: SIGKILL of tritonserver itself: time to captions again, orphaned stubs left;
- drain: SIGTERM to the launcher under load: accepted requests that failed (must be 0),
  what new requests got;
- soak: steady load: failures and the server's memory (RSS of tritonserver and its stubs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psutil
from tqdm import tqdm

from captioner.cli import env
from launcher.tritonserver import free_ports
from launcher.supervisor import stubs_of

from .loadgen import TritonClient, run_level
from .overload import run_overload

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("overload", "stub-kill", "hang", "hang-idle", "server-kill", "drain", "soak")
MODELS = ("default", "seed-inception")
SEED_PARAMS = {"max_length": 20}  # bench/run.py's SEED_MAX_LENGTH: random weights rarely emit END


@dataclass(frozen=True)
class Plan:
    """Sizes of each scenario: the full report, or the quick mode the test suite runs."""

    overload_clients: dict[str, int]
    overload_s: float
    capacity_s: float
    deadline_s: float
    fault_clients: int
    watch_s: float
    soak_s: float
    soak_clients: int
    # The quick mode checks the mechanism, not the tuning: a small queue budget makes
    # sure that 128 clients overflow the queues even of the fast default model.
    queue_budget_ms: int | None

    @staticmethod
    def make(quick: bool) -> "Plan":
        if quick:
            return Plan({"default": 128, "seed-inception": 64}, 6.0, 3.0, 2.0, 4, 30.0, 8.0, 8, 20)
        return Plan({"default": 512, "seed-inception": 128}, 30.0, 8.0, 2.0, 8, 40.0, 120.0, 16, None)


# --- the server under test ---------------------------------------------------------------


class Launcher:
    """`python -m launcher --no-build` on free ports, as an operator runs it."""

    def __init__(self, repo: Path, log_dir: Path, name: str, extra: tuple[str, ...] = ()):
        self.ports = free_ports({"grpc": 0, "http": 0, "metrics": 0})
        self.log = log_dir / f"faults-{name}-launcher.log"
        self.server_log = log_dir / f"faults-{name}-tritonserver.log"
        self.cmd = [sys.executable, "-m", "launcher", "--no-build", "--repo", str(repo), "--samples", "0",
                    "--grpc-port", str(self.ports["grpc"]), "--http-port", str(self.ports["http"]),
                    "--metrics-port", str(self.ports["metrics"]), "--log-file", str(self.server_log), *extra]
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def __enter__(self) -> "Launcher":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if "Serving;" in self.log.read_text():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"launcher not serving after 300 s: {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()

    def tritonserver(self) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children():
            if child.name() == "tritonserver":
                return child
        raise RuntimeError("no tritonserver under the launcher")

    def stub_models(self) -> list[str]:
        """The models on a caption's path that run in their own stub (the fused CPU
        layout has no encoder model: preprocess runs it)."""
        have = {s.model for s in stubs_of(self.tritonserver().pid)}
        return [m for m in ("preprocess", "encoder", "caption_generator") if m in have]

    def stop_stub(self, model: str, inside: bool = True, wait_s: float = 10.0) -> tuple[int, bool | None]:
        """SIGSTOP a stub of `model` while it is inside an execute (`inside`; its
        ExecuteClock file says so: an execute that never returns), or while it is between
        executes (a process frozen while idle: Triton finds it only when it next sends it
        work). After `wait_s` without such a moment the first stub is stopped as it is.
        Returns (pid, whether it was inside an execute; None: not known)."""
        from captioner.serving.triton import EXECUTING_DIR_ENV, executing_since

        ts = self.tritonserver()
        folder = ts.environ().get(EXECUTING_DIR_ENV)
        deadline = time.monotonic() + wait_s
        while folder and time.monotonic() < deadline:
            live = {s.instance: s.pid for s in stubs_of(ts.pid) if s.model == model}
            busy = {i for i, (pid, _) in executing_since(folder).items() if live.get(i) == pid}
            for instance, pid in live.items():
                if (instance in busy) != inside:
                    continue
                os.kill(pid, signal.SIGSTOP)
                # The execute may have ended (or begun) between the read and the stop: with
                # the default model's ms-long executes 6 of 200 stops "inside" landed just
                # after it. A stopped stub cannot touch its file, so this second read is certain.
                now = executing_since(folder).get(instance)
                if (now is not None and now[0] == pid) == inside:
                    return pid, inside
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
        pid = self.stub(model)
        os.kill(pid, signal.SIGSTOP)
        return pid, None

    def stub(self, model: str) -> int:
        pids = [s.pid for s in stubs_of(self.tritonserver().pid) if s.model == model]
        if not pids:
            raise RuntimeError(f"no stub for {model}")
        return pids[0]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def rss_mb(self) -> float:
        ts = self.tritonserver()
        return sum(p.memory_info().rss for p in [ts] + ts.children()) / 2**20

    def supervisor_events(self) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if "launcher.supervisor" in ln]


class ReadinessWatch:
    """Polls `ready()` (/v2/health/ready) every 50 ms in a thread: when did it first say
    NOT ready, and when ready again after that (the supervisor's repair done)."""

    def __init__(self, ready: Callable[[], bool]):
        self.ready, self.not_ready_at, self.ready_again_at = ready, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready = self.ready()
            if self.not_ready_at is None and not ready:
                self.not_ready_at = time.monotonic()
            elif self.not_ready_at is not None and self.ready_again_at is None and ready:
                self.ready_again_at = time.monotonic()
            time.sleep(0.05)

    def __enter__(self) -> "ReadinessWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --- clients -----------------------------------------------------------------------------


async def captions_with_retries(url: str, images: list[bytes], clients: int, stop: asyncio.Event,
                                params: dict | None, log: list) -> dict:
    """Clients of the client library (its retries and deadline) captioning until `stop`;
    each result is (t_sent, t_done, ok, error)."""
    from client.core import AsyncCaptionClient, RetryPolicy

    async with AsyncCaptionClient(url, concurrency=clients, timeout=30.0, retry=RetryPolicy(max_attempts=20, max_backoff=2.0)) as c:
        async def worker(k: int) -> None:
            i = k
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    await c.caption_one(images[i % len(images)], name=f"img{i}", **(params or {}))
                    log.append((t0, time.monotonic(), True, None))
                except Exception as e:  # noqa: BLE001 - a lost request is what we count
                    log.append((t0, time.monotonic(), False, str(e)[:200]))
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return {}


async def first_caption(client, tries: int = 20) -> None:
    """The first caption of a fresh server, retried: a cold machine can shed it."""
    for i in range(tries):
        try:
            await client(0)
            return
        except Exception:  # noqa: BLE001
            if i + 1 == tries:
                raise
            await asyncio.sleep(0.5)


async def liveness_during(url: str, done: asyncio.Event, every_s: float = 2.0) -> dict:
    """The Kubernetes liveness probe's check (`client.health --timeout 5 --overload-ok`) every
    `every_s` until `done`: would an orchestrator kill this overloaded replica?"""
    from client.health import check_async

    counts = {"probes": 0, "caption": 0, "overloaded": 0, "failed": 0, "failures": []}
    while not done.is_set():
        r = await check_async(url, timeout=5.0, overload_ok=True)
        counts["probes"] += 1
        kind = "failed" if not r.ok else "overloaded" if r.reason else "caption"
        counts[kind] += 1
        if kind == "failed" and len(counts["failures"]) < 3:
            counts["failures"].append(r.reason)
        try:
            await asyncio.wait_for(done.wait(), every_s)
        except asyncio.TimeoutError:
            pass
    return counts


def first_ok_after(log: list, t: float) -> float | None:
    times = [done for sent, done, ok, _ in log if ok and sent >= t]
    return min(times) - t if times else None


# --- scenarios ---------------------------------------------------------------------------


class Faults:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.plan = Plan.make(a.quick)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        from captioner.scenes import encoded_scenes

        self.images = [d for d, _ in encoded_scenes(32, 11)]
        self.results: dict = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "quick": a.quick, "plan": self.plan.__dict__, "scenarios": []}
        self._repos: dict[str, dict[str, Path]] = {}

    def repo(self, model: str, variant: str = "default") -> Path:
        """The CPU repository for `model`, built by the build's own entry point: "default"
        (its defaults, queues sized from rates measured on this machine), "unbounded"
        (`--max-queue-size 0`: no load shedding, the before of the overload comparison) or
        "tight" (the quick overload's small queue budget)."""
        if variant in self._repos.get(model, {}):
            return self._repos[model][variant]
        repo = Path(self.a.work) / model / f"repo-{variant}"
        cmd = [sys.executable, "-m", "builder.build_engines", "--model", "models/default" if model == "default" else model,
               "--target", "cpu", "--repo", str(repo), "--out", str(Path(self.a.work) / model / "out"),
               "--parity-scenes", "20"]
        cmd += {"default": [], "unbounded": ["--max-queue-size", "0"],
                "tight": ["--queue-budget-ms", str(self.plan.queue_budget_ms)]}[variant]
        cmd += self.a.build_args.split()
        with open(self.out / f"faults-build-{model}-{variant}.log", "wb") as f:
            subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
        self._repos.setdefault(model, {})[variant] = repo
        return repo

    def params(self, model: str) -> dict | None:
        return SEED_PARAMS if model == "seed-inception" else None

    def record(self, **r) -> dict:
        """Keep a result, and rewrite the report: a long run cut short still leaves one."""
        self.results["scenarios"].append(r)
        write(self.results, self.out)
        return r

    # overload ----------------------------------------------------------------------------
    def overload(self, model: str, launcher: Launcher, shedding: bool = True) -> dict:
        p, params = self.plan, self.params(model)

        async def go():
            async with TritonClient(launcher.grpc_url, self.images, parameters=params) as c:
                await first_caption(c)
                base = await run_level(c, 1, duration=2.0, warmup=0.5, min_completed=5)
                cap = await run_level(c, 8, duration=p.capacity_s, warmup=1.0, min_completed=16)
                before = await c.model_stats()
                done = asyncio.Event()
                probes = asyncio.ensure_future(liveness_during(launcher.grpc_url, done))
                try:
                    over = await run_overload(launcher.grpc_url, self.images, p.overload_clients[model],
                                              p.overload_s, p.deadline_s, parameters=params)
                finally:
                    done.set()
                liveness = await probes
                after = await c.model_stats()
                # After the load: sequential requests until 5 in a row are near the idle latency.
                t0, recent, recovered = time.monotonic(), [], None
                normal = base.p50_ms * 1.5 + 2.0
                while time.monotonic() - t0 < 30:
                    s = time.perf_counter()
                    try:
                        await c(0)
                    except Exception:  # noqa: BLE001 - refused while the queues drain: not normal yet
                        recent = []
                        await asyncio.sleep(0.05)
                        continue
                    recent = (recent + [(time.perf_counter() - s) * 1e3])[-5:]
                    if len(recent) == 5 and statistics.median(recent) <= normal:
                        recovered = time.monotonic() - t0
                        break
                return base, cap, over, before, after, recovered, liveness

        base, cap, over, before, after, recovered, liveness = asyncio.run(go())
        from .run import model_breakdown

        return self.record(
            scenario="overload", model=model, shedding=shedding, capacity_8=cap.throughput, idle_p50_ms=base.p50_ms,
            goodput=over.goodput, goodput_ratio=over.goodput / cap.throughput if cap.throughput else float("nan"),
            recovered_s=recovered, overload=over.to_dict(), inside_triton=model_breakdown(before, after),
            liveness=liveness,
        )

    # faults under load -----------------------------------------------------------------------
    def under_load(self, model: str, launcher: Launcher, fault, watch_s: float,
                   repaired=lambda: True) -> tuple[list, float, object]:
        """Client-library callers caption throughout; after 2 s `fault()` strikes (its
        return value is passed back); the load goes on until captions came back after it
        and `repaired()` (a model with two instances keeps captioning on the healthy one
        while the broken one waits for the supervisor), or watch_s, plus 2 s. Returns
        (log, time of the fault, fault's result)."""
        log: list = []

        async def go():
            stop = asyncio.Event()
            task = asyncio.create_task(captions_with_retries(launcher.grpc_url, self.images, self.plan.fault_clients,
                                                             stop, self.params(model), log))
            await asyncio.sleep(2.0)
            t_fault = time.monotonic()
            result = fault()
            while time.monotonic() - t_fault < watch_s:
                await asyncio.sleep(0.1)
                if first_ok_after(log, t_fault + 0.5) is not None and time.monotonic() - t_fault > 3 and repaired():
                    break
            await asyncio.sleep(2.0)
            stop.set()
            await task
            return t_fault, result

        t_fault, result = asyncio.run(go())
        return log, t_fault, result

    @staticmethod
    def outcome(log: list, t_fault: float) -> dict:
        restored = first_ok_after(log, t_fault)
        lost = [e for _, _, ok, e in log if not ok]
        return {"captions_again_after_s": None if restored is None else round(restored, 2),
                "requests": len(log), "lost": len(lost), "lost_samples": lost[:3]}

    # stub faults ---------------------------------------------------------------------------
    def stub_fault(self, model: str, launcher: Launcher, target: str, scenario: str) -> dict:
        if scenario == "stub-kill":
            sig, fault = signal.SIGKILL, lambda: os.kill(launcher.stub(target), signal.SIGKILL)
        else:
            sig, fault = signal.SIGSTOP, lambda: launcher.stop_stub(target, inside=scenario == "hang")
        with ReadinessWatch(launcher.ready) as watch:
            log, t_kill, stopped = self.under_load(model, launcher, fault, self.plan.watch_s,
                                                   repaired=lambda: watch.ready_again_at is not None)
        inside = stopped[1] if stopped else None  # stop_stub's (pid, inside); a kill returns nothing
        return self.record(
            scenario=scenario, model=model, target=target, signal=signal.Signals(sig).name,
            stopped={True: "inside an execute", False: "between executes", None: None}[inside],
            not_ready_after_s=None if watch.not_ready_at is None else round(watch.not_ready_at - t_kill, 2),
            repaired_after_s=None if watch.ready_again_at is None else round(watch.ready_again_at - t_kill, 2),
            **self.outcome(log, t_kill), supervisor=launcher.supervisor_events()[-3:],
        )

    def server_kill(self, model: str, launcher: Launcher) -> dict:
        ts = launcher.tritonserver()
        old_stubs = [s.pid for s in stubs_of(ts.pid)]
        log, t_kill, _ = self.under_load(model, launcher, ts.kill, self.plan.watch_s * 2)
        return self.record(
            scenario="server-kill", model=model, **self.outcome(log, t_kill),
            orphaned_stubs_left=sum(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in old_stubs),
            supervisor=launcher.supervisor_events()[-3:],
        )

    def drain(self, model: str, launcher: Launcher) -> dict:
        """SIGTERM under load. Plain tritonclient (no retries): what did each request get?"""
        import numpy as np
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        results: list = []  # (sent, done, status)

        async def go():
            c = grpcclient.InferenceServerClient(launcher.grpc_url)
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[self.images[0]]], dtype=np.object_))
            stop = asyncio.Event()

            async def worker():
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        await c.infer("captioner", [inp], parameters=self.params(model), client_timeout=60)
                        results.append((t0, time.monotonic(), "OK"))
                    except InferenceServerException as e:
                        results.append((t0, time.monotonic(), (e.status() or "?").removeprefix("StatusCode.") + ": " + (e.message() or "")[:80]))
                        await asyncio.sleep(0.05)

            tasks = [asyncio.create_task(worker()) for _ in range(self.plan.fault_clients * 2)]
            await asyncio.sleep(3.0)
            t_term = time.monotonic()
            launcher.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(launcher.proc.wait, 120)
            stop.set()
            await asyncio.gather(*tasks)
            await c.close()
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
        return self.record(
            scenario="drain", model=model, launcher_exit=launcher.proc.returncode,
            accepted=len(in_flight), in_flight_at_sigterm=len(in_flight),
            accepted_lost=sum(lost.values()), accepted_lost_by_status=lost, after_sigterm=after,
            stopped_after_s=round(max((r[1] for r in results), default=t_term) - t_term, 2),
        )

    def soak(self, model: str, launcher: Launcher) -> dict:
        """Steady load from clients of the client library (retries, backoff) for soak_s:
        requests lost after retries, and the server's memory before and after."""
        log: list = []

        async def go():
            stop = asyncio.Event()
            task = asyncio.create_task(captions_with_retries(launcher.grpc_url, self.images, self.plan.soak_clients,
                                                             stop, self.params(model), log))
            await asyncio.sleep(5.0)  # warm: allocators, caches
            rss0, t0 = launcher.rss_mb(), time.monotonic()
            await asyncio.sleep(self.plan.soak_s)
            rss1, t1 = launcher.rss_mb(), time.monotonic()
            stop.set()
            await task
            return rss0, rss1, t0, t1

        rss0, rss1, t0, t1 = asyncio.run(go())
        window = [r for r in log if t0 <= r[1] <= t1]
        lost = [e for _, done, ok, e in window if not ok]
        return self.record(scenario="soak", model=model, seconds=round(t1 - t0, 1), requests=len(window),
                           failed=len(lost), lost_samples=lost[:3], throughput=(len(window) - len(lost)) / (t1 - t0),
                           rss_start_mb=round(rss0, 1), rss_end_mb=round(rss1, 1), rss_growth=(rss1 - rss0) / rss0)

    # --------------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.a
        jobs = [(m, s) for m in a.models for s in a.scenarios]
        with tqdm(total=len(jobs), desc="faults", unit="scenario") as bar:
            for model in a.models:
                for scenario in a.scenarios:
                    bar.set_postfix_str(f"{model} {scenario}")
                    if scenario == "overload" and a.baseline:
                        with Launcher(self.repo(model, "unbounded"), self.out, f"{model}-overload-unbounded") as launcher:
                            self.overload(model, launcher, shedding=False)
                    variant = "tight" if scenario == "overload" and self.plan.queue_budget_ms else "default"
                    with Launcher(self.repo(model, variant), self.out, f"{model}-{scenario}") as launcher:
                        if scenario == "overload":
                            self.overload(model, launcher)
                        elif scenario == "stub-kill":
                            for target in launcher.stub_models():
                                self.stub_fault(model, launcher, target, scenario)
                        elif scenario in ("hang", "hang-idle"):
                            # the model that runs the encoder: its own, or the fused preprocess
                            self.stub_fault(model, launcher, launcher.stub_models()[-2], scenario)
                        elif scenario == "server-kill":
                            self.server_kill(model, launcher)
                        elif scenario == "drain":
                            self.drain(model, launcher)
                        elif scenario == "soak":
                            self.soak(model, launcher)
                    bar.update(1)
        self.results["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return self.results


def report(results: dict) -> str:
    lines = [f"# Fault scenarios ({'quick' if results['quick'] else 'full'}), {results['started']}", "",
             "Command: `python -m bench.faults" + (" --quick" if results["quick"] else "") + "` (`make faults`). "
             "Machine: " + f"{psutil.cpu_count()} cores; load average at the end "
             + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ".", ""]
    for r in results["scenarios"]:
        s = r["scenario"]
        if s == "overload":
            o = r["overload"]
            on = f"ON (queue budget {results['plan']['queue_budget_ms']} ms)" if results["plan"]["queue_budget_ms"] else "ON (the build default)"
            lines += [f"## overload: {r['model']}, load shedding {on if r['shedding'] else 'OFF (--max-queue-size 0)'}, "
                      f"{o['clients']} clients, {o['deadline_s']:g} s deadlines, {o['elapsed_s']:.0f} s",
                      f"- capacity at 8 clients: {r['capacity_8']:.1f} captions/s; goodput under overload {r['goodput']:.1f}/s "
                      f"= **{r['goodput_ratio']:.2f}x** capacity",
                      f"- good requests {o['good']}, late {o['late']}, refusals (UNAVAILABLE, each attempt) {o['refusals']}, "
                      f"other errors {o['other_errors']}",
                      f"- latency of good requests p50 {o['good_p50_ms']:.0f} ms, p99 {o['good_p99_ms']:.0f} ms; "
                      f"refusals answered in p50 **{o['refusal_p50_ms']:.1f} ms**, p99 {o['refusal_p99_ms']:.1f} ms",
                      f"- 1-client latency back to normal (median of 5 <= 1.5 x idle p50 {r['idle_p50_ms']:.1f} ms + 2 ms) "
                      f"**{r['recovered_s'] if r['recovered_s'] is None else round(r['recovered_s'], 2)} s** after the load stopped",
                      f"- liveness probe (`client.health --overload-ok`) every 2 s during the load: "
                      f"{r['liveness']['probes']} probes, {r['liveness']['caption']} captioned, "
                      f"{r['liveness']['overloaded']} shed as overloaded (pass), **{r['liveness']['failed']} failed** "
                      f"{r['liveness']['failures'] or ''}",
                      "- inside Triton during the overload: " + "; ".join(
                          f"{m} batch {v['batch']:.1f}, queue {v['queue_ms']:.0f} ms/request, compute {v['compute_ms']:.0f} ms/execution"
                          for m, v in r["inside_triton"].items()), ""]
            if o["error_samples"]:
                lines += [f"- error samples: {o['error_samples'][:2]}", ""]
        elif s in ("stub-kill", "hang", "hang-idle"):
            lines += [f"## {s}: {r['model']} `{r['target']}` stub ({r['signal']}"
                      + (f", {r['stopped'] or 'as it was: no such moment in 10 s'})" if r["signal"] == "SIGSTOP" else ")"),
                      f"- readiness NOT ready after {r['not_ready_after_s']} s, ready again (repaired) after "
                      f"{r.get('repaired_after_s')} s; captions again after "
                      f"**{r['captions_again_after_s']} s**; requests {r['requests']}, lost **{r['lost']}** {r['lost_samples'] or ''}",
                      "- supervisor: " + " / ".join(e.split("launcher.supervisor ", 1)[-1] for e in r["supervisor"]), ""]
        elif s == "server-kill":
            lines += [f"## server-kill: {r['model']} (SIGKILL tritonserver)",
                      f"- captions again after **{r['captions_again_after_s']} s**; orphaned stubs left {r['orphaned_stubs_left']}; "
                      f"requests {r['requests']}, lost **{r['lost']}** {r['lost_samples'] or ''}",
                      "- supervisor: " + " / ".join(e.split("launcher.supervisor ", 1)[-1] for e in r["supervisor"]), ""]
        elif s == "drain":
            lines += [f"## drain: {r['model']} (SIGTERM to the launcher, {results['plan']['fault_clients'] * 2} clients)",
                      f"- in flight at SIGTERM {r['in_flight_at_sigterm']}, lost **{r['accepted_lost']}** "
                      f"{r['accepted_lost_by_status'] or ''}; "
                      f"sent after SIGTERM: {r['after_sigterm']}; launcher exit {r['launcher_exit']}, "
                      f"stopped {r['stopped_after_s']} s after SIGTERM", ""]
        elif s == "soak":
            lines += [f"## soak: {r['model']}, {r['seconds']} s",
                      f"- {r['requests']} captions asked by {results['plan']['soak_clients']} clients of the client library, "
                      f"{r['failed']} lost after retries, {r['throughput']:.1f}/s; server RSS "
                      f"{r['rss_start_mb']} -> {r['rss_end_mb']} MB ({r['rss_growth'] * 100:+.1f} %)", ""]
    return "\n".join(lines)


def write(results: dict, out: Path) -> str:
    (out / "faults.json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results)
    (out / "faults.md").write_text(text + "\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short scenarios (the test suite's mode)")
    p.add_argument("--models", type=lambda s: [x for x in s.split(",") if x], default=env("FAULTS_MODELS", None),
                   help=f"of {','.join(MODELS)} (default: both; --quick: default only)")
    p.add_argument("--scenarios", type=lambda s: [x for x in s.split(",") if x], default=list(SCENARIOS),
                   help=",".join(SCENARIOS))
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="overload also a repository built without load shedding, in the same run "
                        "(default: on, off with --quick)")
    p.add_argument("--build-args", default=env("FAULTS_BUILD_ARGS", ""),
                   help="extra build_engines flags for every repository, e.g. '--layout fused'")
    p.add_argument("--out", default=env("FAULTS_OUT", str(ROOT / "reports")))
    p.add_argument("--work", default=env("FAULTS_WORK", str(ROOT / "artifacts" / "faults")))
    a = p.parse_args(argv)
    a.models = a.models or (["default"] if a.quick else list(MODELS))
    if a.baseline is None:
        a.baseline = not a.quick
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m}; choose from {MODELS}")
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s}; choose from {SCENARIOS}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    results = Faults(a).run()
    print(write(results, Path(a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
