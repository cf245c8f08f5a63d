"""`make bench`: the in-process bound, the Triton stack over gRPC and a naive HTTP server,
measured one after the other on the same machine with the same images and the same
model, then compared. Writes reports/bench.md, reports/bench.json and PNG plots, and
prints the configuration and the ratio table.

    python -m bench.run                       # everything (cold builds included)
    python -m bench.run --quick               # short levels, for a smoke run
    python -m bench.run --models default --stacks inprocess,naive

Models: `default` (the shipped checkpoint, else the best-so-far of a running training)
and `seed-inception` (InceptionV3 at 299 px with random weights, speed only; it
decodes a fixed 20 tokens). Variants are runtime x precision of the encoder
(onnxruntime or OpenVINO; fp32, bf16 = OpenVINO's hint, int8 = the QDQ graph), each
with its in-process bound through the same runtime and precision. The naive server
runs eager torch (fp32) only.

The jobs live in their own modules: bench/variants.py (what is measured),
bench/engines.py (the builds and their manifests), bench/stacks.py (in-process bound,
load levels, naive server), bench/triton_stack.py, bench/report.py and bench/plots.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from tqdm import tqdm

from builder.build_engines import DEFAULT_MAX_BATCH

from . import engines, photos, plots, report
from .peers import report as peers_report
from .peers import run as peers_run
from .stacks import Session, run_inprocess, run_naive
from .triton_stack import run_triton
from .variants import (
    DEFAULT_VARIANTS,
    MODELS,
    ROOT,
    STACKS,
    ModelSpec,
    bench_images,
    parse_variants,
    resolve_model,
    variant_label,
)

env = os.environ.get


def _csv(cast):
    def parse(s: str):
        return [cast(x) for x in s.split(",") if x.strip()]

    return parse


def _kv(s: str) -> dict[str, int]:
    """`encoder=2,preprocess=1` -> {"encoder": 2, "preprocess": 1}."""
    out = {}
    for item in filter(None, (x.strip() for x in s.split(","))):
        k, _, v = item.partition("=")
        out[k.strip()] = int(v)
    return out


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.images = bench_images()
        self.cores = psutil.cpu_count() or 1
        self.results: dict = {
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()}: {self.cores} cores, {platform.python_version()}, "
            f"load average at start {load_average()}",
            "cores": self.cores,
            "config": {},
            "inprocess": [],
            "levels": [],
            "notes": list(a.note or []),
        }

    def steps(self, specs: list[ModelSpec]) -> int:
        """Progress-bar steps: a batch size or a load level each."""
        a, n = self.a, 0
        for spec in specs:
            n += len(a.batches) * len(spec.variants) * ("inprocess" in a.stacks)
            n += len(a.concurrency) * len(spec.variants) * ("triton" in a.stacks)
            n += len(a.peer_concurrency) * ("naive" in a.stacks)
            n += peers_run.steps(a, spec)
        return n

    def run(self) -> dict:
        a = self.a
        specs = [resolve_model(m, a.default_model, a.variants) for m in a.models]
        self.results["config"] = self.config(specs)
        self.results["variants"] = {}
        with tqdm(total=self.steps(specs), desc="bench", unit="step") as bar:
            s = Session(a, self.images, Path(a.out), Path(a.work), self.results, bar)
            for spec in specs:
                if "inprocess" in a.stacks or "triton" in a.stacks:
                    self.variants(s, spec)
                if "naive" in a.stacks:
                    run_naive(s, spec)
        self.results["machine"] += f"; at end {load_average()}"
        return self.results

    def variants(self, s: Session, spec: ModelSpec) -> None:
        """Build the model's graphs, then each variant in-process and through Triton."""
        a = self.a
        s.bar.set_postfix_str(f"{spec.name}: build")
        options = engines.BuildOptions(
            a.parity_scenes, a.agreement_images, a.speed_only_agreement_images, a.max_batch_size, a.rebuild
        )
        built, notes = engines.build(spec, s.work, s.out, options)
        self.results["notes"] += notes
        served = {}  # label -> paths: what the peers can serve
        for runtime, precision in spec.variants:
            label = variant_label(runtime, precision)
            if precision not in built:
                s.bar.update(len(a.batches) * ("inprocess" in a.stacks) + len(a.concurrency) * ("triton" in a.stacks))
                continue
            paths = engines.served_paths(spec, runtime, precision, built, a.encoder_input, a.layout)
            served[label] = paths
            self.results["variants"][f"{spec.name} {label}"] = {
                "runtime": runtime,
                "precision": precision,
                "step_runtime": paths["step_runtime"],
                "auto_choice": paths.get("auto_encoder_runtime") == runtime,
                "encoder_input": a.encoder_input,
            }
            if "inprocess" in a.stacks:
                run_inprocess(s, spec, label, paths)
                if photos.wanted(a, label, paths):
                    photos.run_inprocess(s, spec, label, paths)
            if "triton" in a.stacks:
                run_triton(s, spec, label, paths)
        if a.peers:  # bench/peers: Ray Serve, LitServe, MLServer on the same graphs
            peers_run.run_model(s, spec, served)

    def config(self, specs: list[ModelSpec]) -> dict:
        a = self.a
        return {
            "models": {s.name: f"{s.checkpoint} (max_length {s.max_length or 'from checkpoint'})" for s in specs},
            "variants": {s.name: ", ".join(variant_label(*v) for v in s.variants) for s in specs},
            "encoder input": f"{a.encoder_input} (preprocess -> encoder)",
            "layout": f"{a.layout} (auto: the build's choice per model, see the Triton lines)",
            "stacks": ",".join(a.stacks),
            "load": f"closed loop, concurrency {a.concurrency}, {a.warmup:g} s warm-up + {a.duration:g} s measured "
            "per level "
            f"(stretched up to {4 * a.duration:g} s until 2 x clients replies are in), "
            f"{len(self.images)} distinct 128 px PNG scenes",
            "in-process": f"batches {a.batches}, {a.inproc_duration:g} s each, onnxruntime intra-op threads "
            f"{a.inproc_threads or 'ORT default'} (spinning {'on' if a.inproc_spinning else 'off'}), inter-op 1, "
            "PNG decode + resize + normalise + encoder + greedy decode",
            "naive": f"FastAPI + uvicorn (1 worker, sync endpoint in the anyio thread pool), eager torch, batch 1, "
            f"torch threads {a.naive_threads or 'torch default'}",
        }


def _selection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure")
    g.add_argument("--models", type=_csv(str), default=_csv(str)(env("BENCH_MODELS", ",".join(MODELS))))
    g.add_argument(
        "--default-model",
        default=env("CAPTIONER_MODEL"),
        help="checkpoint dir for `default` (else models/default, runs/default, /tmp/run0)",
    )
    g.add_argument(
        "--variants",
        type=parse_variants,
        default=parse_variants(env("BENCH_VARIANTS", "")) or None,
        help="runtime:precision list for every model, e.g. openvino:int8,onnxruntime:fp32 "
        f"(default per model: {DEFAULT_VARIANTS})",
    )
    g.add_argument("--stacks", type=_csv(str), default=_csv(str)(env("BENCH_STACKS", ",".join(STACKS))))


def _load_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=_csv(int), default=_csv(int)(env("BENCH_CONCURRENCY", "1,16,32,64")))
    g.add_argument("--batches", type=_csv(int), default=_csv(int)(env("BENCH_BATCHES", "1,32")), help="in-process batch sizes")
    g.add_argument("--duration", type=float, default=float(env("BENCH_DURATION", "6")), help="measured seconds per load level")
    g.add_argument("--warmup", type=float, default=float(env("BENCH_WARMUP", "1.5")), help="unmeasured seconds before each level")
    g.add_argument("--inproc-duration", type=float, default=float(env("BENCH_INPROC_DURATION", "4")))
    g.add_argument(
        "--inproc-threads",
        type=int,
        default=int(env("BENCH_INPROC_THREADS", "0")) or psutil.cpu_count(),
        help="ORT intra-op threads in-process (default: all cores)",
    )
    g.add_argument(
        "--inproc-spinning",
        action="store_true",
        default=env("BENCH_INPROC_SPINNING", "0") == "1",
        help="let ORT worker threads spin in-process",
    )
    g.add_argument(
        "--naive-threads",
        type=int,
        default=int(env("BENCH_NAIVE_THREADS", "0")) or None,
        help="torch threads of the naive server (default: torch's)",
    )
    g.add_argument("--quick", action="store_true", help="short levels (2 s + 0.5 s warm-up, 1.5 s per batch): a smoke run")


def _triton_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the Triton stack")
    g.add_argument(
        "--layout",
        choices=("auto", "split", "fused", "whole"),
        default=env("BENCH_LAYOUT", "auto"),
        help="Triton CPU layout: split, fused (decode + encoder in one model), whole (decode, encoder "
        "and the caption loop in one model) or auto: the build's "
        "choice for the model (default)",
    )
    g.add_argument(
        "--encoder-input",
        choices=("uint8", "float32"),
        default=env("BENCH_ENCODER_INPUT", "uint8"),
        help="what preprocess hands the encoder (default uint8, normalised inside the graph)",
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=int(env("BENCH_MAX_BATCH_SIZE", str(DEFAULT_MAX_BATCH))),
        help="Triton max_batch_size (default: the build's)",
    )
    g.add_argument(
        "--instances",
        type=_kv,
        default=_kv(env("BENCH_INSTANCES", "")),
        help="Triton instance counts, e.g. preprocess=1,encoder=2 (default: the build's)",
    )
    g.add_argument(
        "--ort-threads",
        type=_kv,
        default=_kv(env("BENCH_ORT_THREADS", "")),
        help="ORT intra-op threads per Triton model, e.g. encoder=2 (default: the build's)",
    )
    g.add_argument(
        "--queue-delay-us",
        type=int,
        default=int(env("BENCH_QUEUE_DELAY_US", "-1")),
        help="Triton dynamic batching max queue delay (default: the build's)",
    )
    g.add_argument(
        "--step-mode",
        default=env("BENCH_STEP_MODE") or None,
        choices=("inprocess", "bls"),
        help="decoder step in the generator's process or through BLS (default: the build's)",
    )


def _build_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the builds (builder.build_engines)")
    g.add_argument(
        "--parity-scenes", type=int, default=int(env("BENCH_PARITY_SCENES", "32")), help="build_engines --parity-scenes"
    )
    g.add_argument(
        "--agreement-images",
        type=int,
        default=int(env("BENCH_AGREEMENT_IMAGES", "500")),
        help="build_engines --agreement-images (the int8 gate's sample)",
    )
    g.add_argument(
        "--speed-only-agreement-images",
        type=int,
        default=int(env("BENCH_SPEED_ONLY_AGREEMENT_IMAGES", "64")),
        help="the same for speed-only models, whose agreement is reported, not gated",
    )
    g.add_argument("--rebuild", action="store_true", help="rebuild the artifacts even when the cached ones match")


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=env("BENCH_OUT", str(ROOT / "reports")))
    g.add_argument(
        "--work", default=env("BENCH_WORK", str(ROOT / "artifacts" / "bench")), help="built artifacts and repositories"
    )
    g.add_argument("--note", action="append", help="a line for the report's notes (repeatable)")
    g.add_argument(
        "--report-only", action="store_true", help="measure nothing: rewrite the report and plots from <out>/bench.json"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flags in (_selection_flags, _load_flags, _triton_flags, _build_flags, _output_flags):
        flags(p)
    peers_run.add_arguments(p.add_argument_group("the peers (bench/peers)"), env)
    photos.add_arguments(p, env)
    a = p.parse_args(argv)
    peers_run.check_arguments(p, a)
    if a.quick:
        a.duration, a.warmup, a.inproc_duration = 2.0, 0.5, 1.5
    for name, values, allowed in (("models", a.models, MODELS), ("stacks", a.stacks, STACKS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: {bad or 'empty'}; choose from {', '.join(allowed)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        results = json.loads((out / "bench.json").read_text())
    else:
        t0 = time.monotonic()
        results = Bench(a).run()
        results["wall_s"] = round(time.monotonic() - t0, 1)
    results["plots"] = [
        plots.throughput_plot(results, out / "bench_throughput.png").name,
        plots.latency_plot(results, out / "bench_latency.png").name,
        *(path.name for path in peers_report.plots(results, out)),
    ]
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    default_name = "default"
    md = report.markdown(results, default_name) + photos.markdown(results, default_name)
    (out / "bench.md").write_text(md)
    print()
    print("## Configuration\n" + report.config_lines(results))
    print("\n## In-process bound\n" + report.inprocess_table(results))
    print("\n## Load levels\n" + report.levels_table(results))
    print("\n## Ratios\n" + report.ratio_table(results))
    if peers_report.side_by_side(results).count("\n") > 1:
        print("\n## Side by side with the peers\n" + peers_report.side_by_side(results))
    print("\n## Targets\n" + "\n".join(t.line() for t in report.targets(results, default_name)))
    if results.get("photos"):
        print("\n## Photo workloads\n" + photos.table(results))
        print("\n".join(t.line() for t in photos.targets(results, default_name)))
    print(f"\nwrote {out / 'bench.md'} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
