"""The bench's runners: the in-process bound (batches through the runtime itself) and
the closed-loop load levels every server stack gets, here for the naive HTTP server
(bench/triton_stack.py runs the Triton stack through the same levels)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .inprocess import InProcessCaptioner, measure
from .loadgen import HttpClient, run_level
from .naive_server import NaiveServer
from .procmem import PeakMemory
from .variants import ModelSpec


@dataclass
class Session:
    """What every runner shares: the options, the images sent, where logs go, the results
    being collected (bench.json) and the progress bar."""

    a: argparse.Namespace
    images: list[bytes]
    out: Path
    work: Path
    results: dict
    bar: tqdm

    def at_levels(self, concurrency: list[int]) -> Session:
        """This session with --concurrency replaced (the peers and the naive server run
        at --peer-concurrency)."""
        return dataclasses.replace(self, a=argparse.Namespace(**{**vars(self.a), "concurrency": concurrency}))

    def note(self, line: str) -> None:
        self.results["notes"].append(line)


def model_breakdown(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per Triton model over one level (warm-up and drain included): executions, mean
    rows per execution (the dynamic batcher's work), queue ms per request and compute
    ms per execution."""
    out = {}
    for name, b in after.items():
        a = before.get(name, {})
        d = {k: v - a.get(k, 0.0) for k, v in b.items()}
        if d["executions"] <= 0:
            continue
        out[name] = {
            "executions": d["executions"],
            "batch": d["inferences"] / d["executions"],
            "queue_ms": d["queue_ns"] / max(d["requests"], 1) / 1e6,
            # an ensemble has no batch_stats: its time per request is the whole pipeline
            "compute_ms": (
                d["exec_compute_ns"] / d["executions"]
                if d["exec_compute_ns"]
                else d["request_compute_ns"] / max(d["requests"], 1)
            )
            / 1e6,
        }
    return out


def captioner(spec: ModelSpec, paths: dict, threads: int | None, spinning: bool = False) -> InProcessCaptioner:
    from captioner import checkpoint as ckpt_mod

    return InProcessCaptioner(
        ckpt_mod.load(spec.checkpoint),
        paths["encoder"],
        paths["decoder"],
        threads=threads,
        max_length=spec.max_length,
        spinning=spinning,
        runtime=paths["runtime"],
        step_runtime=paths["step_runtime"],
        inference_precision=paths["inference_precision"],
    )


def run_inprocess(s: Session, spec: ModelSpec, variant: str, paths: dict) -> None:
    """The bound: each batch size through the runtime in this process, no server."""
    cap = captioner(spec, paths, s.a.inproc_threads, s.a.inproc_spinning)
    for b in s.a.batches:
        s.bar.set_postfix_str(f"{spec.name} in-process {variant} batch {b}")
        r = measure(cap, s.images, b, s.a.inproc_duration)
        s.results["inprocess"].append({"model": spec.name, "variant": variant, **r.to_dict()})
        s.bar.update(1)


def run_naive(s: Session, spec: ModelSpec) -> None:
    """The naive server (bench/naive_server.py: FastAPI + uvicorn, eager torch at batch 1),
    at the peers' levels (--peer-concurrency)."""
    log = s.out / f"naive-{spec.name}.log"
    levels = s.at_levels(s.a.peer_concurrency)
    with NaiveServer(spec.checkpoint, threads=s.a.naive_threads, max_length=spec.max_length, log_path=log) as srv:
        assert srv.proc is not None  # started by `with`
        run_levels(levels, spec, "naive", "torch fp32", lambda: HttpClient(srv.url + "/caption", s.images), [srv.proc.pid])


def run_levels(s: Session, spec: ModelSpec, stack: str, variant: str, make_client: Callable, pids: list[int]) -> None:
    """Each concurrency of --concurrency against one server (its processes: `pids`), with
    Triton's per-model counters over the level when the client can read them."""
    a = s.a

    async def go():
        async with make_client() as client:
            await client(0)  # first request: connections, lazy initialisation
            stats = getattr(client, "model_stats", None)
            out = []
            for c in a.concurrency:
                s.bar.set_postfix_str(f"{spec.name} {stack} {variant} x{c}")
                before = await stats() if stats else None
                memory.reset()
                r = await run_level(
                    client,
                    c,
                    duration=a.duration,
                    warmup=a.warmup,
                    min_completed=2 * c,
                    max_duration=4 * a.duration,
                    server_pids=pids,
                )
                out.append((r, model_breakdown(before, await stats()) if stats else None, memory.peaks()))
                s.bar.update(1)
            return out

    # the server's peak RSS / PSS per level, its whole process tree (bench/procmem.py)
    with PeakMemory(pids) as memory:
        results = asyncio.run(go())
    for r, models, peaks in results:
        if r.errors:
            s.note(f"{spec.name} {stack} {variant} x{r.concurrency}: {r.errors} errors, e.g. {r.error_samples[:1]}")
        level = {"model": spec.name, "stack": stack, "variant": variant, **r.to_dict(), **peaks}
        if models:
            level["models"] = models
        s.results["levels"].append(level)
