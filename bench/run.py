"""`make bench`: the in-process bound, the Triton stack over gRPC and a naive HTTP server,
measured one after the other on the same machine with the same images and the same
model, then compared. Writes reports/bench.md, reports/bench.json and PNG plots, and
prints the configuration and the ratio table.

    python -m bench.run                       # everything (~10-15 min on 2 cores)
    python -m bench.run --quick               # short levels, for a smoke run
    python -m bench.run --models default --stacks inprocess,naive

Models: `default` (the shipped checkpoint, else the best-so-far of a running training)
and `seed-inception` (InceptionV3 at 299 px with random weights, speed only; it
decodes a fixed 20 tokens). Precisions: fp32, plus int8 where the build provides a
reduced-precision CPU encoder. The naive server runs eager torch (fp32) only.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from captioner import checkpoint as ckpt_mod

from . import plots, report
from .inprocess import InProcessCaptioner, measure
from .loadgen import HttpClient, run_level
from .naive_server import NaiveServer

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("default", "seed-inception")
STACKS = ("inprocess", "triton", "naive")
SEED_MAX_LENGTH = 20  # random weights rarely emit END: every caption costs the full 20 steps
N_IMAGES = 64


def _csv(cast):
    def parse(s: str):
        return [cast(x) for x in s.split(",") if x.strip()]

    return parse


def default_checkpoint() -> Path:
    """The shipped model, else the best-so-far of the running training, else the weak
    2-epoch model: the bench runs before the default model is final."""
    for d in (ROOT / "models" / "default", ROOT / "runs" / "default", Path("/tmp/run0")):
        if (d / ckpt_mod.FILENAME).is_file():
            return d
    raise FileNotFoundError("no default model: models/default, runs/default and /tmp/run0 are all empty")


def bench_images(n: int = N_IMAGES, seed: int = 7) -> list[bytes]:
    """shapes-v1 scenes as 128 px PNG bytes: what a client sends for every stack."""
    from captioner.scenes import random_scene, render

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        render(random_scene(rng), nrng).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@dataclass
class ModelSpec:
    name: str
    checkpoint: Path
    max_length: int | None  # None: the checkpoint's own
    variants: dict[str, dict] = field(default_factory=dict)  # precision -> {"repo", "encoder", "decoder"}


def resolve_model(name: str, default_model: str | None) -> ModelSpec:
    if name == "default":
        return ModelSpec(name, Path(default_model) if default_model else default_checkpoint(), None)
    if name == "seed-inception":
        from build import seed_inception

        return ModelSpec(name, Path(seed_inception.ensure()), SEED_MAX_LENGTH)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def run_async(coro):
    return asyncio.run(coro)


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.out = Path(a.out)
        self.work = Path(a.work)
        self.images = bench_images()
        self.cores = psutil.cpu_count() or 1
        self.results: dict = {
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()}: {self.cores} cores, {platform.python_version()}, "
            f"load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
            "config": {},
            "inprocess": [],
            "levels": [],
            "notes": list(a.note or []),
        }

    # --- the three stacks ------------------------------------------------------------

    def inprocess(self, spec: ModelSpec, variant: str, paths: dict, bar: tqdm) -> None:
        ck = ckpt_mod.load(spec.checkpoint)
        cap = InProcessCaptioner(ck, paths["encoder"], paths["decoder"], threads=self.a.inproc_threads, max_length=spec.max_length)
        for b in self.a.batches:
            bar.set_postfix_str(f"{spec.name} in-process {variant} batch {b}")
            r = measure(cap, self.images, b, self.a.inproc_duration)
            self.results["inprocess"].append({"model": spec.name, "variant": variant, **r.to_dict()})
            bar.update(1)

    def naive(self, spec: ModelSpec, bar: tqdm) -> None:
        log = self.out / f"naive-{spec.name}.log"
        with NaiveServer(spec.checkpoint, threads=self.a.naive_threads, max_length=spec.max_length, log_path=log) as srv:
            self._levels(spec, "naive", "torch fp32", lambda: HttpClient(srv.url + "/caption", self.images), [srv.proc.pid], bar)

    def _levels(self, spec: ModelSpec, stack: str, variant: str, make_client, pids, bar: tqdm) -> None:
        async def go():
            async with make_client() as client:
                await client(0)  # first request: connections, lazy initialisation
                out = []
                for c in self.a.concurrency:
                    bar.set_postfix_str(f"{spec.name} {stack} {variant} x{c}")
                    r = await run_level(client, c, duration=self.a.duration, warmup=self.a.warmup, server_pids=pids)
                    out.append(r)
                    bar.update(1)
                return out

        for r in run_async(go()):
            if r.errors:
                self.results["notes"].append(f"{spec.name} {stack} {variant} x{r.concurrency}: {r.errors} errors, e.g. {r.error_samples[:1]}")
            self.results["levels"].append({"model": spec.name, "stack": stack, "variant": variant, **r.to_dict()})

    # --- orchestration -----------------------------------------------------------------

    def artifacts(self, spec: ModelSpec, variant: str) -> dict:
        """fp32: the exported ONNX graphs. Other precisions come from the build."""
        from build.export import export_decoder_step, export_encoder

        d = self.work / f"{spec.name}-{variant}"
        ck = ckpt_mod.load(spec.checkpoint)
        if variant != "fp32":
            raise ValueError(f"precision {variant} needs build.build_engines")
        return {
            "encoder": export_encoder(ck, d / "encoder.onnx"),
            "decoder": export_decoder_step(ck, d / "decoder_step.onnx"),
        }

    def run(self) -> dict:
        a = self.a
        specs = [resolve_model(m, a.default_model) for m in a.models]
        self.results["config"] = self.config(specs)
        steps = 0
        for _ in specs:
            if "inprocess" in a.stacks:
                steps += len(a.batches) * len(a.precisions)
            if "naive" in a.stacks:
                steps += len(a.concurrency)
        with tqdm(total=steps, desc="bench", unit="step") as bar:
            for spec in specs:
                for variant in a.precisions:
                    try:
                        paths = self.artifacts(spec, variant)
                    except Exception as e:  # one missing variant must not sink the whole bench
                        self.results["notes"].append(f"{spec.name} {variant}: no artifacts ({e})")
                        continue
                    if "inprocess" in a.stacks:
                        self.inprocess(spec, variant, paths, bar)
                if "naive" in a.stacks:
                    self.naive(spec, bar)
        self.results["machine"] += f"; at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        return self.results

    def config(self, specs: list[ModelSpec]) -> dict:
        a = self.a
        return {
            "models": {s.name: f"{s.checkpoint} (max_length {s.max_length or 'from checkpoint'})" for s in specs},
            "precisions": ",".join(a.precisions),
            "stacks": ",".join(a.stacks),
            "load": f"closed loop, concurrency {a.concurrency}, {a.warmup:g} s warm-up + {a.duration:g} s measured per level, "
            f"{len(self.images)} distinct 128 px PNG scenes",
            "in-process": f"batches {a.batches}, {a.inproc_duration:g} s each, onnxruntime intra-op threads "
            f"{a.inproc_threads or 'ORT default'}, inter-op 1, PNG decode + resize + normalise + encoder + greedy decode",
            "naive": f"FastAPI + uvicorn (1 worker, sync endpoint in the anyio thread pool), eager torch, batch 1, "
            f"torch threads {a.naive_threads or 'torch default'}",
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(str), default=_csv(str)(env("BENCH_MODELS", ",".join(MODELS))))
    p.add_argument("--default-model", default=env("CAPTIONER_MODEL"), help="checkpoint dir for `default` (else models/default, runs/default, /tmp/run0)")
    p.add_argument("--precisions", type=_csv(str), default=_csv(str)(env("BENCH_PRECISIONS", "fp32,int8")))
    p.add_argument("--stacks", type=_csv(str), default=_csv(str)(env("BENCH_STACKS", ",".join(STACKS))))
    p.add_argument("--concurrency", type=_csv(int), default=_csv(int)(env("BENCH_CONCURRENCY", "1,4,16,32,64")))
    p.add_argument("--batches", type=_csv(int), default=_csv(int)(env("BENCH_BATCHES", "1,8,32")), help="in-process batch sizes")
    p.add_argument("--duration", type=float, default=float(env("BENCH_DURATION", "6")), help="measured seconds per load level")
    p.add_argument("--warmup", type=float, default=float(env("BENCH_WARMUP", "1.5")), help="unmeasured seconds before each level")
    p.add_argument("--inproc-duration", type=float, default=float(env("BENCH_INPROC_DURATION", "4")))
    p.add_argument("--inproc-threads", type=int, default=int(env("BENCH_INPROC_THREADS", "0")) or psutil.cpu_count(), help="ORT intra-op threads in-process (default: all cores)")
    p.add_argument("--naive-threads", type=int, default=int(env("BENCH_NAIVE_THREADS", "0")) or None, help="torch threads of the naive server (default: torch's)")
    p.add_argument("--quick", action="store_true", help="short levels (2 s + 0.5 s warm-up, 1.5 s per batch): a smoke run")
    p.add_argument("--out", default=env("BENCH_OUT", str(ROOT / "reports")))
    p.add_argument("--work", default=env("BENCH_WORK", str(ROOT / "build" / "out" / "bench")), help="built artifacts and repositories")
    p.add_argument("--note", action="append", help="a line for the report's notes (repeatable)")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.inproc_duration = 2.0, 0.5, 1.5
    for name, values, allowed in (("models", a.models, MODELS), ("stacks", a.stacks, STACKS), ("precisions", a.precisions, ("fp32", "int8"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: {bad or 'empty'}; choose from {', '.join(allowed)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    bench = Bench(a)
    results = bench.run()
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["plots"] = [
        plots.throughput_plot(results, out / "bench_throughput.png").name,
        plots.latency_plot(results, out / "bench_latency.png").name,
    ]
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    default_name = "default"
    md = report.markdown(results, default_name)
    (out / "bench.md").write_text(md)
    print()
    print("## Configuration\n" + report.config_lines(results))
    print("\n## In-process bound\n" + report.inprocess_table(results))
    print("\n## Load levels\n" + report.levels_table(results))
    print("\n## Ratios\n" + report.ratio_table(results))
    print("\n## Targets\n" + "\n".join(t.line() for t in report.targets(results, default_name)))
    print(f"\nwrote {out / 'bench.md'} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
