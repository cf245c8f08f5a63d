"""`make bench`: the in-process bound, the Triton stack over gRPC and a naive HTTP server,
measured one after the other on the same machine with the same images and the same
model, then compared. Writes reports/bench.md, reports/bench.json and PNG plots, and
prints the configuration and the ratio table.

    python -m bench.run                       # everything (about 11 min on 2 quiet cores, cold builds)
    python -m bench.run --quick               # short levels, for a smoke run
    python -m bench.run --models default --stacks inprocess,naive

Models: `default` (the shipped checkpoint, else the best-so-far of a running training)
and `seed-inception` (InceptionV3 at 299 px with random weights, speed only; it
decodes a fixed 20 tokens). Variants are runtime x precision of the encoder
(onnxruntime or OpenVINO; fp32, bf16 = OpenVINO's hint, int8 = the QDQ graph), each
with its in-process bound through the same runtime and precision. The naive server
runs eager torch (fp32) only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
from tqdm import tqdm

from captioner import checkpoint as ckpt_mod

from . import plots, report
from .inprocess import InProcessCaptioner, measure
from .loadgen import HttpClient, TritonClient, run_level
from .naive_server import NaiveServer

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("default", "seed-inception")
STACKS = ("inprocess", "triton", "naive")
SEED_MAX_LENGTH = 20  # random weights rarely emit END: every caption costs the full 20 steps
N_IMAGES = 64
EXIT_REFUSED = 4  # build_engines: the reduced-precision variant was refused
PRECISIONS = ("fp32", "bf16", "int8")
# Per model, the variants `make bench` measures (runtime:precision). onnxruntime fp32 is
# the reference of R1; the rest are what the build can serve. --variants overrides.
DEFAULT_VARIANTS = {
    "default": "onnxruntime:fp32,openvino:fp32,openvino:int8",
    # openvino fp32 runs the seed encoder within a few % of onnxruntime fp32 (the build's
    # RUNTIME=auto timing, in the notes); left out to keep `make bench` under 15 minutes.
    "seed-inception": "onnxruntime:fp32,openvino:bf16,openvino:int8",
}


def parse_variants(s: str) -> list[tuple[str, str]]:
    """`openvino:int8,onnxruntime:fp32` -> [("openvino", "int8"), ("onnxruntime", "fp32")]."""
    from captioner.serving.runtime import RUNTIMES

    out = []
    for item in filter(None, (x.strip() for x in s.split(","))):
        runtime, _, precision = item.partition(":")
        if runtime not in RUNTIMES or precision not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"variant {item!r}: want runtime:precision with runtime in {RUNTIMES} "
                                             f"and precision in {PRECISIONS}")
        out.append((runtime, precision))
    return out


def variant_label(runtime: str, precision: str) -> str:
    return f"{runtime} {precision}"


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
    from captioner.scenes import encoded_scenes

    return [data for data, _ in encoded_scenes(n, seed)]


def _kv(s: str) -> dict[str, int]:
    """`encoder=2,preprocess=1` -> {"encoder": 2, "preprocess": 1}."""
    out = {}
    for item in filter(None, (x.strip() for x in s.split(","))):
        k, _, v = item.partition("=")
        out[k.strip()] = int(v)
    return out


def repo_summary(repo: Path) -> str:
    """What the served repository actually says: instances, batching, ORT threads."""
    from builder.repository import check_repository

    parts = []
    for name, cfg in check_repository(repo).items():
        if cfg.platform == "ensemble":
            parts.append(f"layout {cfg.parameters['layout'].string_value if 'layout' in cfg.parameters else 'split'}")
            continue
        p = {k: v.string_value for k, v in cfg.parameters.items()}
        db = cfg.dynamic_batching
        bits = [f"{sum(g.count for g in cfg.instance_group)} inst", f"max batch {cfg.max_batch_size}",
                f"delay {db.max_queue_delay_microseconds} us"]
        if db.preferred_batch_size:
            bits.append(f"preferred {list(db.preferred_batch_size)}")
        if "intra_op_threads" in p:
            bits.append(f"threads {p['intra_op_threads']}")
        if "step_mode" in p:
            bits.append(f"step {p['step_mode']}")
        if "runtime" in p:
            bits.append(p["runtime"] + (f" {p['inference_precision']}" if p.get("inference_precision", "fp32") != "fp32" else ""))
        parts.append(f"{name} ({', '.join(bits)})")
    return "; ".join(parts)


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
            "compute_ms": (d["exec_compute_ns"] / d["executions"] if d["exec_compute_ns"] else d["request_compute_ns"] / max(d["requests"], 1)) / 1e6,
        }
    return out


@dataclass
class ModelSpec:
    name: str
    checkpoint: Path
    max_length: int | None  # None: the checkpoint's own
    variants: list[tuple[str, str]] = field(default_factory=list)  # (runtime, precision)


def resolve_model(name: str, default_model: str | None, variants: list[tuple[str, str]] | None = None) -> ModelSpec:
    chosen = variants or parse_variants(DEFAULT_VARIANTS.get(name, ""))
    if name == "default":
        return ModelSpec(name, Path(default_model) if default_model else default_checkpoint(), None, chosen)
    if name == "seed-inception":
        from builder import seed_inception

        return ModelSpec(name, Path(seed_inception.ensure()), SEED_MAX_LENGTH, chosen)
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
            "cores": self.cores,
            "config": {},
            "inprocess": [],
            "levels": [],
            "notes": list(a.note or []),
        }

    # --- the three stacks ------------------------------------------------------------

    def captioner(self, spec: ModelSpec, paths: dict, threads: int | None, spinning: bool = False) -> InProcessCaptioner:
        return InProcessCaptioner(ckpt_mod.load(spec.checkpoint), paths["encoder"], paths["decoder"], threads=threads,
                                  max_length=spec.max_length, spinning=spinning, runtime=paths["runtime"],
                                  step_runtime=paths["step_runtime"], inference_precision=paths["inference_precision"])

    def inprocess(self, spec: ModelSpec, variant: str, paths: dict, bar: tqdm) -> None:
        cap = self.captioner(spec, paths, self.a.inproc_threads, self.a.inproc_spinning)
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
                stats = getattr(client, "model_stats", None)
                out = []
                for c in self.a.concurrency:
                    bar.set_postfix_str(f"{spec.name} {stack} {variant} x{c}")
                    before = await stats() if stats else None
                    r = await run_level(client, c, duration=self.a.duration, warmup=self.a.warmup, min_completed=2 * c,
                                        max_duration=4 * self.a.duration, server_pids=pids)
                    out.append((r, model_breakdown(before, await stats()) if stats else None))
                    bar.update(1)
                return out

        for r, models in run_async(go()):
            if r.errors:
                self.results["notes"].append(f"{spec.name} {stack} {variant} x{r.concurrency}: {r.errors} errors, e.g. {r.error_samples[:1]}")
            level = {"model": spec.name, "stack": stack, "variant": variant, **r.to_dict()}
            if models:
                level["models"] = models
            self.results["levels"].append(level)

    # --- orchestration -----------------------------------------------------------------

    def build(self, spec: ModelSpec) -> dict[str, dict]:
        """Precision -> the checked graphs to serve, made by builder.build_engines (the command
        `make build-engines` runs, with its parity checks and caption-agreement gates): one
        build with PRECISION=int8 (it leaves the checked fp32 graphs too) and one with
        PRECISION=bf16 when those variants are asked for. Reused while the checkpoint and
        the requested precisions are unchanged."""
        a = self.a
        d = self.work / spec.name
        out = d / "out"
        sha = ckpt_mod.file_sha256(ckpt_mod.resolve(spec.checkpoint))
        wanted = sorted({p for _, p in spec.variants if p != "fp32"}) or ["fp32"]
        stamp = d / "bench_build.json"
        if stamp.is_file() and not a.rebuild:
            cached = json.loads(stamp.read_text())
            if cached["checkpoint_sha256"] == sha and set(wanted) <= set(cached.get("builds", [])):
                self.results["notes"] += cached["notes"]
                return {k: {n: (Path(p) if n in ("encoder", "decoder") else p) for n, p in v.items()}
                        for k, v in cached["precisions"].items()}
        speed_only = bool(ckpt_mod.load(spec.checkpoint).meta.get("speed_only"))
        d.mkdir(parents=True, exist_ok=True)
        notes, precisions = [], {}
        for precision in wanted:
            built = d / f"built-{precision}"
            # The first build checks the export against torch on --parity-scenes scenes; the
            # second exports the same graphs again and checks them on a few (InceptionV3 in
            # eager torch is most of a seed-inception build).
            scenes = a.parity_scenes if not precisions else min(8, a.parity_scenes)
            cmd = [sys.executable, "-m", "builder.build_engines", "--model", str(spec.checkpoint), "--target", "cpu",
                   "--precision", precision, "--runtime", "auto", "--repo", str(built), "--out", str(out),
                   "--parity-scenes", str(scenes), "--encoder-input", "float32"]
            if speed_only:
                # Random weights: captions are noise, so agreement with fp32 says nothing about
                # quality; the variant is measured for speed and its agreement only reported.
                cmd += ["--min-agreement", "0", "--agreement-images", str(a.speed_only_agreement_images)]
            else:
                # The 98% gate needs a sample whose error bar is well under 2 points.
                cmd += ["--agreement-images", str(a.agreement_images)]
            log = self.out / f"build-{spec.name}-{precision}.log"
            with open(log, "wb") as f:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
            lines = log.read_text(errors="replace").strip().splitlines()
            if rc not in (0, EXIT_REFUSED):
                raise RuntimeError(f"build_engines exited {rc}: {' / '.join(lines[-3:])} (log: {log})")
            suffix = " (speed-only model: built with --min-agreement 0)" if speed_only else ""
            notes += [f"{spec.name}: " + ln.strip() + suffix for ln in lines
                      if ("greedy captions" in ln and "fp32 on" in ln) or "chosen " in ln]
            if rc != 0:
                notes.append(f"{spec.name}: the build refused {precision}: {lines[-1].strip()}")
                continue
            manifest = json.loads((built / "build_manifest.json").read_text())
            step_runtime = manifest["runtime"]["decoder_step"]["runtime"]
            top = str(max(int(b) for r in manifest["runtime"]["encoder_rows_per_s"].values() for b in r))
            base = {"decoder": out / "decoder_step.onnx", "step_runtime": step_runtime,
                    "auto_encoder_runtime": manifest["runtime"]["encoder"]["runtime"],
                    # images/s of this precision's graph per runtime: LAYOUT=auto's rule, per variant
                    "rates": json.dumps({k: v[top] for k, v in manifest["runtime"]["encoder_rows_per_s"].items()})}
            if precision == "int8" and manifest["precision"] != "fp32":
                # the build's reduced-precision graph (int8 unless onnxruntime ran a bf16 graph faster)
                precisions["int8"] = {**base, "encoder": out / f"encoder.{manifest['precision']}.onnx",
                                      "auto_encoder_runtime": manifest["runtime"]["encoder"]["runtime"]}
            if precision == "bf16":
                precisions["bf16"] = {**base, "encoder": out / "encoder.onnx"}
            precisions.setdefault("fp32", {**base, "encoder": out / "encoder.onnx", "auto_encoder_runtime": None,
                                           "rates": None})
        if "fp32" in precisions and precisions["fp32"]["auto_encoder_runtime"] is None:
            precisions["fp32"]["auto_encoder_runtime"] = self._fp32_choice(spec, out, precisions["fp32"])
        stamp.write_text(json.dumps({"checkpoint_sha256": sha, "builds": wanted, "notes": notes,
                                     "precisions": {k: {n: str(p) for n, p in v.items()} for k, v in precisions.items()}},
                                    indent=1))
        self.results["notes"] += notes
        return precisions

    def _fp32_choice(self, spec: ModelSpec, out: Path, paths: dict) -> str:
        """What RUNTIME=auto picks for the fp32 encoder (the reduced-precision builds time their own graph)."""
        from builder.repository import DEFAULT_ORT_THREADS, ENCODER
        from builder.runtime_choice import choose_runtimes

        ck = ckpt_mod.load(spec.checkpoint)
        r = choose_runtimes(ck, paths["encoder"], paths["decoder"], "auto", "fp32", DEFAULT_ORT_THREADS[ENCODER],
                            (1, self.a.max_batch_size), log=lambda m: None)
        paths["rates"] = json.dumps({k: v[self.a.max_batch_size] for k, v in r.encoder_rates.items()})
        self.results["notes"].append(f"{spec.name}: fp32 RUNTIME=auto would serve the encoder with {r.encoder.runtime} "
                                     f"({r.encoder.reason})")
        return r.encoder.runtime

    def served_paths(self, spec: ModelSpec, runtime: str, precision: str, built: dict) -> dict:
        """The graphs, runtimes and precision hint of one variant, the encoder graph with
        uint8 input when the bench serves that (builder/uint8_input.py; cached)."""
        paths = dict(built[precision])
        if self.a.encoder_input == "uint8":
            from builder.uint8_input import with_uint8_input

            src = Path(paths["encoder"])
            dst = src.with_name(f"{src.stem}.uint8.onnx")
            if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
                with_uint8_input(src, dst, ckpt_mod.load(spec.checkpoint).preprocess)
            paths["encoder"] = dst
        paths.update(runtime=runtime, inference_precision="bf16" if precision == "bf16" else "fp32")
        if self.a.layout == "auto":
            from builder.runtime_choice import FUSE_ABOVE_IMAGES_PER_S

            rates = paths.get("rates")
            rate = json.loads(rates).get(runtime) if rates not in (None, "None") else None
            paths["layout"] = "fused" if rate is not None and rate >= FUSE_ABOVE_IMAGES_PER_S else "split"
        else:
            paths["layout"] = self.a.layout
        return paths

    def triton_repo(self, spec: ModelSpec, variant: str, paths: dict) -> Path:
        """The repository the bench serves: the built graphs, assembled with the bench's
        batching, instance and thread settings (builder.repository's own parameters)."""
        from builder.repository import assemble

        from builder.repository import DECODER_STEP, ENCODER, GENERATOR
        from builder.runtime_choice import warm_cache

        a = self.a
        repo = assemble(
            ckpt_mod.load(spec.checkpoint),
            self.work / spec.name / f"repo-{variant.replace(' ', '-')}",
            "cpu",
            {"encoder_onnx": paths["encoder"], "decoder_onnx": paths["decoder"]},
            max_batch_size=a.max_batch_size,
            precision=variant.split()[-1],
            instance_counts=a.instances or None,
            ort_threads=a.ort_threads or None,
            step_mode=a.step_mode,
            runtimes={ENCODER: paths["runtime"], DECODER_STEP: paths["step_runtime"], GENERATOR: paths["step_runtime"]},
            inference_precision=paths["inference_precision"],
            encoder_input=a.encoder_input,
            layout=paths["layout"],
            **({"queue_delay_us": a.queue_delay_us} if a.queue_delay_us >= 0 else {}),
        )
        warm_cache(repo)  # what the build does: a server start must not compile
        return repo

    def triton(self, spec: ModelSpec, variant: str, paths: dict, bar: tqdm) -> None:
        from launcher.tritonserver import TritonServer

        repo = self.triton_repo(spec, variant, paths)
        self.results["config"].setdefault("triton", {})[f"{spec.name} {variant}"] = repo_summary(repo)
        params = {"max_length": spec.max_length} if spec.max_length else None
        log = self.out / f"triton-{spec.name}-{variant}.log"
        log.unlink(missing_ok=True)
        with TritonServer(repo, log_file=log) as server:
            self._parity(spec, variant, paths, server.grpc_url, params)
            make = lambda: TritonClient(server.grpc_url, self.images, parameters=params)  # noqa: E731
            self._levels(spec, "triton", variant, make, [server.process.pid], bar)

    def _parity(self, spec: ModelSpec, variant: str, paths: dict, url: str, params) -> None:
        """The server must be doing the in-process work: same captions for a few images."""
        n = 8
        cap = self.captioner(spec, paths, threads=1)
        expected = cap.caption_bytes(self.images[:n])

        async def go():
            async with TritonClient(url, self.images[:n], parameters=params) as c:
                return [await c(i) for i in range(n)]

        got = run_async(go())
        same = sum(x == y for x, y in zip(got, expected))
        self.results["notes"].append(f"{spec.name} {variant}: Triton and in-process captions agree on {same}/{n} images")

    def run(self) -> dict:
        a = self.a
        specs = [resolve_model(m, a.default_model, a.variants) for m in a.models]
        self.results["config"] = self.config(specs)
        steps = 0
        for spec in specs:
            if "inprocess" in a.stacks:
                steps += len(a.batches) * len(spec.variants)
            if "triton" in a.stacks:
                steps += len(a.concurrency) * len(spec.variants)
            if "naive" in a.stacks:
                steps += len(a.concurrency)
        self.results["variants"] = {}
        with tqdm(total=steps, desc="bench", unit="step") as bar:
            for spec in specs:
                if "inprocess" in a.stacks or "triton" in a.stacks:
                    bar.set_postfix_str(f"{spec.name}: build")
                    built = self.build(spec)
                    for runtime, precision in spec.variants:
                        label = variant_label(runtime, precision)
                        if precision not in built:
                            bar.update(len(a.batches) * ("inprocess" in a.stacks) + len(a.concurrency) * ("triton" in a.stacks))
                            continue
                        paths = self.served_paths(spec, runtime, precision, built)
                        self.results["variants"][f"{spec.name} {label}"] = {
                            "runtime": runtime, "precision": precision, "step_runtime": paths["step_runtime"],
                            "auto_choice": paths.get("auto_encoder_runtime") == runtime,
                            "encoder_input": a.encoder_input}
                        if "inprocess" in a.stacks:
                            self.inprocess(spec, label, paths, bar)
                        if "triton" in a.stacks:
                            self.triton(spec, label, paths, bar)
                if "naive" in a.stacks:
                    self.naive(spec, bar)
        self.results["machine"] += f"; at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        return self.results

    def config(self, specs: list[ModelSpec]) -> dict:
        a = self.a
        return {
            "models": {s.name: f"{s.checkpoint} (max_length {s.max_length or 'from checkpoint'})" for s in specs},
            "variants": {s.name: ", ".join(variant_label(*v) for v in s.variants) for s in specs},
            "encoder input": f"{a.encoder_input} (preprocess -> encoder)",
            "layout": f"{a.layout} (auto: the build's choice per model, see the Triton lines)",
            "stacks": ",".join(a.stacks),
            "load": f"closed loop, concurrency {a.concurrency}, {a.warmup:g} s warm-up + {a.duration:g} s measured per level "
            f"(stretched up to {4 * a.duration:g} s until 2 x clients replies are in), "
            f"{len(self.images)} distinct 128 px PNG scenes",
            "in-process": f"batches {a.batches}, {a.inproc_duration:g} s each, onnxruntime intra-op threads "
            f"{a.inproc_threads or 'ORT default'} (spinning {'on' if a.inproc_spinning else 'off'}), inter-op 1, PNG decode + resize + normalise + encoder + greedy decode",
            "naive": f"FastAPI + uvicorn (1 worker, sync endpoint in the anyio thread pool), eager torch, batch 1, "
            f"torch threads {a.naive_threads or 'torch default'}",
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(str), default=_csv(str)(env("BENCH_MODELS", ",".join(MODELS))))
    p.add_argument("--default-model", default=env("CAPTIONER_MODEL"), help="checkpoint dir for `default` (else models/default, runs/default, /tmp/run0)")
    p.add_argument("--variants", type=parse_variants, default=parse_variants(env("BENCH_VARIANTS", "")) or None,
                   help="runtime:precision list for every model, e.g. openvino:int8,onnxruntime:fp32 "
                        f"(default per model: {DEFAULT_VARIANTS})")
    p.add_argument("--layout", choices=("auto", "split", "fused"), default=env("BENCH_LAYOUT", "auto"),
                   help="Triton CPU layout: split, fused (decode + encoder in one model) or auto: the build's "
                        "choice for the model (default)")
    p.add_argument("--encoder-input", choices=("uint8", "float32"), default=env("BENCH_ENCODER_INPUT", "uint8"),
                   help="what preprocess hands the encoder (default uint8, normalised inside the graph)")
    p.add_argument("--stacks", type=_csv(str), default=_csv(str)(env("BENCH_STACKS", ",".join(STACKS))))
    p.add_argument("--concurrency", type=_csv(int), default=_csv(int)(env("BENCH_CONCURRENCY", "1,4,16,32,64")))
    p.add_argument("--batches", type=_csv(int), default=_csv(int)(env("BENCH_BATCHES", "1,8,32")), help="in-process batch sizes")
    p.add_argument("--duration", type=float, default=float(env("BENCH_DURATION", "6")), help="measured seconds per load level")
    p.add_argument("--warmup", type=float, default=float(env("BENCH_WARMUP", "1.5")), help="unmeasured seconds before each level")
    p.add_argument("--inproc-duration", type=float, default=float(env("BENCH_INPROC_DURATION", "4")))
    p.add_argument("--inproc-threads", type=int, default=int(env("BENCH_INPROC_THREADS", "0")) or psutil.cpu_count(), help="ORT intra-op threads in-process (default: all cores)")
    p.add_argument("--inproc-spinning", action="store_true", default=env("BENCH_INPROC_SPINNING", "0") == "1", help="let ORT worker threads spin in-process")
    p.add_argument("--naive-threads", type=int, default=int(env("BENCH_NAIVE_THREADS", "0")) or None, help="torch threads of the naive server (default: torch's)")
    p.add_argument("--max-batch-size", type=int, default=int(env("BENCH_MAX_BATCH_SIZE", "32")), help="Triton max_batch_size")
    p.add_argument("--instances", type=_kv, default=_kv(env("BENCH_INSTANCES", "")), help="Triton instance counts, e.g. preprocess=1,encoder=2 (default: the build's)")
    p.add_argument("--ort-threads", type=_kv, default=_kv(env("BENCH_ORT_THREADS", "")), help="ORT intra-op threads per Triton model, e.g. encoder=2 (default: the build's)")
    p.add_argument("--queue-delay-us", type=int, default=int(env("BENCH_QUEUE_DELAY_US", "-1")), help="Triton dynamic batching max queue delay (default: the build's)")
    p.add_argument("--step-mode", default=env("BENCH_STEP_MODE") or None, choices=("inprocess", "bls"), help="decoder step in the generator's process or through BLS (default: the build's)")
    p.add_argument("--parity-scenes", type=int, default=int(env("BENCH_PARITY_SCENES", "32")), help="build_engines --parity-scenes")
    p.add_argument("--agreement-images", type=int, default=int(env("BENCH_AGREEMENT_IMAGES", "500")), help="build_engines --agreement-images (the int8 gate's sample)")
    p.add_argument("--speed-only-agreement-images", type=int, default=int(env("BENCH_SPEED_ONLY_AGREEMENT_IMAGES", "64")),
                   help="the same for speed-only models, whose agreement is reported, not gated")
    p.add_argument("--rebuild", action="store_true", help="rebuild the artifacts even when the cached ones match")
    p.add_argument("--quick", action="store_true", help="short levels (2 s + 0.5 s warm-up, 1.5 s per batch): a smoke run")
    p.add_argument("--out", default=env("BENCH_OUT", str(ROOT / "reports")))
    p.add_argument("--work", default=env("BENCH_WORK", str(ROOT / "artifacts" / "bench")), help="built artifacts and repositories")
    p.add_argument("--note", action="append", help="a line for the report's notes (repeatable)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: rewrite the report and plots from <out>/bench.json")
    a = p.parse_args(argv)
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
    ]
    results["investigation"] = report.investigation(ROOT / "docs" / "bench.md")
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
