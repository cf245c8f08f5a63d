"""`make build-engines`: checkpoint -> ONNX -> parity checks -> (TensorRT engine on a
CUDA machine) -> (reduced-precision encoder when asked) -> Triton model repository,
with a build manifest next to the artifacts and in the repository.

Exit status: 0 built; 1 a check failed (parity, engine); 2 bad arguments or missing
checkpoint; 3 TARGET=gpu could not be met (the CPU repository is still built);
4 the reduced-precision variant was refused (no repository written)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .capacity import DEFAULT_QUEUE_BUDGET_MS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_BATCH = 32  # the one default: Triton configs and the TensorRT profile both take it from here
DEFAULT_ENCODER_INPUT = "uint8"  # docs/bench.md, investigation 7
DEFAULT_LAYOUT = "auto"  # fused for small encoders: builder/runtime_choice.py, docs/bench.md investigation 8
TARGETS = ("auto", "cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
RUNTIMES = ("auto", "onnxruntime", "openvino")
ENCODER_INPUTS_CHOICES = ("float32", "uint8")
MANIFEST = "build_manifest.json"
STEPS = 7

EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_GPU_UNMET, EXIT_REFUSED = 1, 2, 3, 4
# OpenVINO fp32 against onnxruntime, relative to max(1, max|reference|): the TensorRT check's bound.
OPENVINO_TOLERANCE = 1e-3


class BuildFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def log(msg: str = "") -> None:
    print(msg, flush=True)


@contextmanager
def step(n: int, title: str):
    log(f"[{n}/{STEPS}] {title}")
    t0 = time.perf_counter()
    yield
    log(f"      ({time.perf_counter() - t0:.1f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m builder.build_engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env("CAPTIONER_MODEL"),
                   help="checkpoint dir/file, or 'seed-inception' (env CAPTIONER_MODEL; default: models/default)")
    p.add_argument("--target", choices=TARGETS, default=env("CAPTIONER_TARGET", "auto"),
                   help="auto: TensorRT when a CUDA device is present, else CPU (env CAPTIONER_TARGET)")
    p.add_argument("--precision", choices=PRECISIONS, default=env("CAPTIONER_PRECISION", "fp32"),
                   help="encoder precision; fp16 is GPU-only, bf16 CPU-only (OpenVINO's inference-precision "
                        "hint, where the CPU has bf16), bf16 and int8 are checked for caption agreement "
                        "(env CAPTIONER_PRECISION)")
    p.add_argument("--runtime", choices=RUNTIMES, default=env("CAPTIONER_RUNTIME", "auto"),
                   help="CPU runtime of the encoder and decoder step: auto times both here and keeps the faster "
                        "per graph (env CAPTIONER_RUNTIME)")
    p.add_argument("--layout", choices=("auto", "split", "fused"), default=env("CAPTIONER_LAYOUT", DEFAULT_LAYOUT),
                   help="CPU repository layout: split (preprocess -> encoder -> caption_generator), fused "
                        "(decode + encoder in one Python model, one hop fewer) or auto (fused when the encoder is "
                        f"small, by its measured rate) (env CAPTIONER_LAYOUT, default {DEFAULT_LAYOUT})")
    p.add_argument("--encoder-input", choices=ENCODER_INPUTS_CHOICES,
                   default=env("CAPTIONER_ENCODER_INPUT", DEFAULT_ENCODER_INPUT),
                   help="what preprocess hands the CPU encoder: uint8 HWC (normalised inside the encoder graph) or "
                        f"float32 CHW (env CAPTIONER_ENCODER_INPUT, default {DEFAULT_ENCODER_INPUT})")
    p.add_argument("--repo", default=env("CAPTIONER_REPO", "model_repository"),
                   help="Triton model repository to write (env CAPTIONER_REPO)")
    p.add_argument("--max-batch-size", type=int, default=int(env("CAPTIONER_MAX_BATCH", DEFAULT_MAX_BATCH)),
                   help=f"Triton max_batch_size and TensorRT profile max (env CAPTIONER_MAX_BATCH, default {DEFAULT_MAX_BATCH})")
    p.add_argument("--out", default=env("CAPTIONER_BUILD_OUT"),
                   help="artifact directory (env CAPTIONER_BUILD_OUT; default artifacts/<model name>)")
    p.add_argument("--data", default=env("CAPTIONER_DATA", "data/shapes-v1"),
                   help="dataset whose test split measures reduced-precision agreement (env CAPTIONER_DATA); "
                        "generated scenes when it is absent")
    p.add_argument("--agreement-images", type=int, default=int(env("CAPTIONER_AGREEMENT_IMAGES", 0)) or None,
                   help="cap on the images used for the agreement check (default: the whole split)")
    p.add_argument("--min-agreement", type=float, default=float(env("CAPTIONER_MIN_AGREEMENT", 0.98)),
                   help="refuse a reduced-precision encoder below this share of fp32-identical captions")
    p.add_argument("--parity-scenes", type=int, default=int(env("CAPTIONER_PARITY_SCENES", 200)),
                   help="scenes whose greedy captions must be identical through ONNX and torch")
    p.add_argument("--queue-budget-ms", type=int, default=int(env("CAPTIONER_QUEUE_BUDGET_MS", DEFAULT_QUEUE_BUDGET_MS)),
                   help="load shedding: the longest a request may wait in one model's queue; queues are sized to "
                        "drain within it at the rate measured on this machine (env CAPTIONER_QUEUE_BUDGET_MS, "
                        f"default {DEFAULT_QUEUE_BUDGET_MS})")
    p.add_argument("--max-queue-size", type=int, default=int(env("CAPTIONER_MAX_QUEUE_SIZE", -1)),
                   help="override every derived queue bound (0: unbounded, no shedding; env CAPTIONER_MAX_QUEUE_SIZE)")
    p.add_argument("--trt-version", default=env("CAPTIONER_TRT_VERSION"),
                   help="TensorRT version of the target Triton image (e.g. 10.5): the build refuses another "
                        "(env CAPTIONER_TRT_VERSION)")
    p.add_argument("--timing-cache", default=env("CAPTIONER_TRT_TIMING_CACHE"),
                   help="TensorRT timing cache file (default <out>/tensorrt_timing.cache)")
    a = p.parse_args(argv)
    if a.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1")
    if a.queue_budget_ms < 1:
        p.error("--queue-budget-ms must be >= 1")
    if not 0.0 <= a.min_agreement <= 1.0:
        p.error("--min-agreement must be in [0, 1]")
    if a.target == "cpu" and a.precision == "fp16":
        p.error("PRECISION=fp16 is a TensorRT precision; on CPU use fp32, bf16 or int8")
    if a.precision == "bf16" and a.target == "gpu":
        p.error("PRECISION=bf16 is a CPU precision (OpenVINO); on GPU use fp32, fp16 or int8")
    if a.precision == "bf16" and a.runtime == "onnxruntime":
        p.error("PRECISION=bf16 runs through OpenVINO's inference-precision hint: use RUNTIME=openvino or auto")
    return a


def resolve_model(arg: str | None) -> tuple[Path, str]:
    """(checkpoint path, model name). 'seed-inception' is created on first use."""
    from captioner import checkpoint as ckpt_mod

    from . import seed_inception

    if arg == seed_inception.NAME and not Path(arg).exists():
        return ckpt_mod.resolve(seed_inception.ensure()), seed_inception.NAME
    try:
        path = ckpt_mod.resolve(arg)
    except FileNotFoundError as e:
        raise BuildFailed(EXIT_USAGE, f"{e}. Train one (make default-model) or pass MODEL=<checkpoint dir> "
                                      f"or MODEL={seed_inception.NAME}") from None
    return path, path.parent.name


def versions() -> dict:
    from importlib import metadata

    import onnx
    import onnxruntime
    import torch

    try:
        trt = metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        trt = None
    if trt is None and "tensorrt" in sys.modules:
        trt = getattr(sys.modules["tensorrt"], "__version__", None)
    from captioner.serving.runtime import openvino_version

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino_version(), "tensorrt": trt}


def _sha(path: Path) -> str:
    from captioner.checkpoint import file_sha256

    return file_sha256(path)


def build(a: argparse.Namespace) -> dict:
    """Run the pipeline; returns the manifest. Raises BuildFailed with an exit code."""
    from captioner import checkpoint as ckpt_mod

    from . import capacity, parity, quantize
    from . import tensorrt_engine as te
    from .export import OPSET, export_decoder_step, export_encoder

    started = time.perf_counter()
    ck_path, name = resolve_model(a.model)
    out_dir = Path(a.out) if a.out else ROOT / "artifacts" / name
    repo_dir = Path(a.repo)
    manifest: dict = {"model": name, "requested": {"target": a.target, "precision": a.precision,
                                                   "runtime": a.runtime, "encoder_input": a.encoder_input,
                                                   "layout": a.layout}}
    gpu_unmet: str | None = None

    with step(1, "checkpoint"):
        ck = ckpt_mod.load(ck_path)
        speed_only = bool(ck.meta.get("speed_only"))
        log(f"      {ck_path}  sha256 {ck.sha256[:16]}")
        log(f"      {ck.args.backbone} {ck.preprocess.image_size}px, vocabulary {len(ck.vocab)}, "
            f"lstm {ck.args.lstm_units}, max batch {a.max_batch_size}")
        if speed_only:
            log(f"      SPEED-ONLY MODEL: {ck.meta.get('note', 'random weights')}")
        if a.target == "gpu" and not te.cuda_available():
            log(f"      TARGET=gpu but {te.NO_CUDA.split(':')[0]}: the CPU repository will be built and the "
                f"build will exit {EXIT_GPU_UNMET}")

    with step(2, f"ONNX export (opset {OPSET}) -> {out_dir}"):
        enc_onnx = export_encoder(ck, out_dir / "encoder.onnx")
        dec_onnx = export_decoder_step(ck, out_dir / "decoder_step.onnx")
        for f in (enc_onnx, dec_onnx):
            log(f"      {f.name}: {f.stat().st_size / 1e6:.1f} MB, named I/O, dynamic batch, onnx.checker ok")

    with step(3, f"parity onnxruntime vs torch (batch 1 and 7; greedy captions on {a.parity_scenes} scenes)"):
        report = parity.check_exports(ck, enc_onnx, dec_onnx, caption_scenes=a.parity_scenes)
        for line in report.lines():
            log("      " + line)
        manifest["parity"] = report.to_dict()
        if not report.passed:
            raise BuildFailed(EXIT_CHECK_FAILED, f"parity FAILED (tolerance {report.tolerance:.0e}, captions must be "
                                                 "identical): the ONNX graphs do not compute what the checkpoint does")
        log("      parity PASSED")

    artifacts = {"encoder_onnx": enc_onnx, "decoder_onnx": dec_onnx}
    target, precision = "cpu", "fp32"
    eval_cache: dict = {}

    def eval_images():
        if "images" not in eval_cache:
            from tqdm import tqdm

            eval_cache["images"] = quantize.evaluation_images(ck, a.data, limit=a.agreement_images, progress=tqdm)
        return eval_cache["images"]

    with step(4, "TensorRT engine"):
        if a.target == "cpu" or a.precision == "bf16":
            why = "TARGET=cpu" if a.target == "cpu" else "PRECISION=bf16 is a CPU precision"
            log(f"      skipped: {why}")
            manifest["tensorrt"] = {"skipped": why}
        else:
            onnx_files = {"fp32": enc_onnx}

            def onnx_for(kind: str) -> Path:
                if kind not in onnx_files:
                    if kind == "fp16":
                        onnx_files[kind] = quantize.convert_fp16(enc_onnx, out_dir / "encoder.fp16.onnx")
                    elif kind == "int8_qdq":
                        n = quantize.calibration_count(enc_onnx)
                        log(f"      Q/DQ graph: symmetric int8, calibrated on {n} scenes")
                        onnx_files[kind] = quantize.quantize_int8(enc_onnx, out_dir / "encoder.int8_qdq.onnx",
                                                                  quantize.calibration_images(ck, n),
                                                                  symmetric_activations=True)
                return onnx_files[kind]

            try:
                result = te.build_encoder_plan(
                    ck, onnx_for, out_dir, a.max_batch_size, a.precision,
                    timing_cache=a.timing_cache, expected_version=a.trt_version, log=lambda m: log("      " + m))
            except te.EngineUnavailable as e:
                msg = str(e) if isinstance(e, te.NoCudaDevice) else f"{e}: TensorRT engine skipped, CPU repository built"
                log("      " + msg)
                manifest["tensorrt"] = {"skipped": msg}
                if a.target == "gpu":
                    gpu_unmet = msg
            else:
                for d in result.diffs:
                    log(f"      engine vs onnxruntime batch {d.batch:<2} {d.inputs:<7} max|diff| "
                        + "  ".join(f"{k}={v:.2e}" for k, v in d.max_abs.items()) + f"  (max|ref| {d.ref_max:.2f})")
                manifest["tensorrt"] = result.to_dict()
                if not result.passed:
                    raise BuildFailed(EXIT_CHECK_FAILED, f"TensorRT engine differs from onnxruntime by more than "
                                                         f"{result.tolerance:.0e} x max(1, max|reference|)")
                if a.precision != "fp32":
                    evalset = eval_images()
                    agreement = quantize.caption_agreement(ck, parity.onnx_encode(parity.session(enc_onnx)),
                                                           result.encode, parity.session(dec_onnx), evalset.images,
                                                           evalset.scenes)
                    log(f"      greedy captions engine {a.precision} == fp32 on {evalset.source}: "
                        f"{agreement.agree}/{agreement.total} = {agreement.share:.2%}")
                    manifest["tensorrt"]["agreement"] = {"total": agreement.total, "agree": agreement.agree,
                                                         "share": agreement.share, "evaluated_on": evalset.source,
                                                         "fp32_correct": agreement.fp32_correct,
                                                         "engine_correct": agreement.variant_correct}
                    if agreement.share < a.min_agreement:
                        raise BuildFailed(EXIT_REFUSED, f"{a.precision} engine REFUSED: {agreement.share:.2%} caption "
                                                        f"agreement with fp32 is below {a.min_agreement:.0%}")
                artifacts["encoder_plan"] = result.plan_path
                target, precision = "gpu", a.precision
                log(f"      {result.plan_path.name}: engine check PASSED")

    with step(5, "reduced-precision CPU encoder"):
        if target == "gpu":
            log("      not needed: the encoder runs in TensorRT")
        elif a.precision == "fp16":
            log("      PRECISION=fp16 is a TensorRT precision: the CPU repository stays fp32")
        elif a.precision == "fp32":
            log("      not requested (PRECISION=int8 builds it and checks its caption agreement with fp32)")
        elif a.precision == "bf16":
            log("      bf16: the fp32 graph under OpenVINO's bf16 inference-precision hint (checked in step 6)")
        else:
            variant = quantize.build_cpu_variant(ck, enc_onnx, dec_onnx, out_dir, eval_images(),
                                                 batch_sizes=(1, a.max_batch_size), min_agreement=a.min_agreement,
                                                 log=lambda m: log("      " + m))
            for line in variant.lines():
                log("      " + line)
            manifest["cpu_reduced_precision"] = variant.to_dict()
            if variant.chosen is None:
                raise BuildFailed(EXIT_REFUSED, "no reduced-precision encoder runs on this CPU")
            if not variant.accepted:
                hint = ("; this SPEED-ONLY model has meaningless captions: CAPTIONER_MIN_AGREEMENT=0 builds it "
                        "for speed measurements" if speed_only else "; build with PRECISION=fp32")
                raise BuildFailed(EXIT_REFUSED, f"{variant.chosen.name} encoder REFUSED: "
                                                f"{variant.agreement.share:.2%} caption agreement with fp32 is below "
                                                f"{a.min_agreement:.0%}{hint}")
            artifacts["encoder_onnx"] = variant.chosen.path
            precision = variant.chosen.name

    runtimes, inference_precision, encoder_input, layout = None, "fp32", "float32", "split"
    with step(6, f"CPU runtime (RUNTIME={a.runtime}) and encoder input ({a.encoder_input})"):
        if target == "gpu":
            log("      not needed: TensorRT and Triton's onnxruntime backend serve the graphs")
        else:
            float_graph = Path(artifacts["encoder_onnx"])
            if a.encoder_input == "uint8":
                from .uint8_input import with_uint8_input

                artifacts["encoder_onnx"] = with_uint8_input(float_graph, out_dir / f"{float_graph.stem}.uint8.onnx",
                                                             ck.preprocess)
                encoder_input = "uint8"
                log(f"      {artifacts['encoder_onnx'].name}: uint8 [S, S, 3] input, normalisation inside the graph "
                    "(same float32 operations as captioner.preprocess.normalize)")
            runtimes, inference_precision, precision, fuse = cpu_runtime(
                a, ck, Path(artifacts["encoder_onnx"]), float_graph, dec_onnx, precision, enc_onnx, eval_images, manifest)
            layout = a.layout if a.layout != "auto" else ("fused" if fuse[0] else "split")
            log(f"      layout {layout}" + (f" (auto: {fuse[1]})" if a.layout == "auto" else ""))

    with step(7, f"Triton repository ({target}, {precision}) -> {repo_dir}"):
        try:
            from .repository import DEFAULT_ORT_THREADS, ENCODER, GENERATOR, assemble
        except ImportError as e:
            raise BuildFailed(EXIT_CHECK_FAILED, f"builder/repository.py is not available ({e})") from None
        measured = None
        if target == "cpu":
            from captioner.serving.runtime import EngineSettings

            chosen = runtimes or {}
            measured = capacity.measure(
                ck, artifacts["encoder_onnx"], dec_onnx, a.max_batch_size, normalise=encoder_input != "uint8",
                encoder_settings=EngineSettings(chosen.get(ENCODER, "onnxruntime"), DEFAULT_ORT_THREADS[ENCODER],
                                                inference_precision),
                step_settings=EngineSettings(chosen.get(GENERATOR, "onnxruntime"), 1))
            log(f"      measured here: preprocess {measured.preprocess_per_s:.0f} img/s (1 core), encoder "
                f"{measured.encoder_per_s:.0f} img/s (batch {measured.encoder_batch}, {measured.threads} threads), "
                f"decoding {measured.decode_per_s:.0f} captions/s (1 core): the stack's ceiling "
                f"{measured.pipeline_per_s:.0f} captions/s on {measured.cores} cores")
        queues = capacity.policies(measured, a.max_batch_size, a.queue_budget_ms,
                                   None if a.max_queue_size < 0 else a.max_queue_size, fused=layout == "fused")
        for line in capacity.describe(queues, fused=layout == "fused"):
            log(f"      load shedding: {line}")
        manifest["load_shedding"] = {"budget_ms": a.queue_budget_ms, "measured": measured and measured.to_dict(),
                                     "queues": {k: v.to_dict() for k, v in queues.items()}}
        try:
            repo = Path(assemble(ck, repo_dir, target, artifacts, max_batch_size=a.max_batch_size,
                                 precision=precision, runtimes=runtimes, inference_precision=inference_precision,
                                 encoder_input=encoder_input, layout=layout, queues=queues))
        except ValueError as e:  # RepositoryError included: the repository could not be made consistent
            raise BuildFailed(EXIT_CHECK_FAILED, f"repository assembly failed: {e}") from None
        from .runtime_choice import warm_cache

        warmed = warm_cache(repo)
        if warmed:
            log(f"      OpenVINO compiled-model cache filled for {', '.join(warmed)}: a server start loads, not compiles")
        manifest.update({
            "speed_only": speed_only,
            "checkpoint": {"path": str(ck_path), "sha256": ck.sha256, "meta": ck.meta},
            "preprocess": ck.preprocess.to_dict(),
            "target": target,
            "precision": precision,
            "encoder_input": encoder_input,
            "layout": layout,
            "openvino_cache_warmed": warmed,
            "max_batch_size": a.max_batch_size,
            "opset": OPSET,
            "versions": versions(),
            "artifacts": {k: {"file": str(v), "sha256": _sha(Path(v))} for k, v in artifacts.items()},
            "repository": str(repo),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 1),
        })
        text = json.dumps(manifest, indent=2, default=str) + "\n"
        for d in (repo, out_dir):
            (d / MANIFEST).write_text(text)
        for child in sorted(p for p in repo.iterdir() if p.is_dir()):
            log(f"      {child.name}/")
        log(f"      {MANIFEST} written to {repo} and {out_dir}")

    if gpu_unmet:
        raise BuildFailed(EXIT_GPU_UNMET, gpu_unmet)
    return manifest


def cpu_runtime(a, ck, served: Path, float_graph: Path, dec_onnx: Path, precision: str, fp32_onnx: Path,
                eval_images, manifest: dict) -> tuple[dict, str, str]:
    """Step 6 on CPU: choose the runtime per graph (RUNTIME=auto times both), then check
    what will be served when its numerics are not the ones already checked: OpenVINO fp32
    against onnxruntime (tolerance), and every reduced-precision encoder run by OpenVINO
    (bf16 hint, or the int8 graph) by its greedy-caption agreement with fp32.
    `served` is timed; the checks run on `float_graph`, the same graph before the uint8
    wrapper, whose input step is bit-identical to captioner.preprocess.normalize.
    Returns (runtimes for assemble, inference precision, precision label, (fuse?, why)
    for LAYOUT=auto)."""
    from captioner.preprocess import normalize
    from captioner.serving import runtime as rt

    from . import parity, quantize, runtime_choice
    from .repository import DEFAULT_ORT_THREADS, ENCODER

    inference_precision = "fp32"
    if a.precision == "bf16":
        if not rt.cpu_has_bf16():
            raise BuildFailed(EXIT_REFUSED, "bf16 REFUSED: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16); "
                                            "build with PRECISION=fp32 or int8")
        if rt.openvino_version() is None:
            raise BuildFailed(EXIT_REFUSED, "bf16 needs OpenVINO, which is not installed (pip install -r requirements.txt)")
        inference_precision, precision = "bf16", "bf16"
    threads = DEFAULT_ORT_THREADS[ENCODER]
    try:
        report = runtime_choice.choose_runtimes(ck, served, dec_onnx, a.runtime, inference_precision, threads,
                                                (1, a.max_batch_size), log=lambda m: log("      " + m))
    except rt.RuntimeUnavailable as e:
        raise BuildFailed(EXIT_USAGE, f"RUNTIME={a.runtime}: {e}") from None
    for line in report.lines():
        log("      chosen " + line)
    manifest["runtime"] = report.to_dict()
    settings = rt.EngineSettings(runtime=report.encoder.runtime, threads=threads, inference_precision=inference_precision)
    if report.encoder.runtime == rt.OPENVINO and precision == "fp32":
        images, _ = parity.scene_batch(16, ck.preprocess, seed=5)
        x = {"image": normalize(images, ck.preprocess)}
        ref = parity.session(float_graph).run(["h0", "c0"], x)
        got = rt.load(float_graph, settings).run(["h0", "c0"], x)
        worst = max(float(np.abs(r - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got))
        manifest["runtime"]["openvino_vs_onnxruntime_max_rel_diff"] = worst
        log(f"      OpenVINO fp32 vs onnxruntime on 16 scenes: max|diff| / max(1, max|ref|) = {worst:.1e}")
        if worst > OPENVINO_TOLERANCE:
            raise BuildFailed(EXIT_CHECK_FAILED, f"OpenVINO fp32 encoder differs from onnxruntime by {worst:.1e} "
                                                 f"(> {OPENVINO_TOLERANCE:.0e}): build with RUNTIME=onnxruntime")
    # The reduced-precision graph was gated through onnxruntime in step 5; OpenVINO's
    # numerics differ, so it is gated too wherever it runs, chosen or not (the bench
    # serves both runtimes from one build).
    if precision != "fp32" and rt.openvino_version() is not None:
        evalset = eval_images()
        engine = rt.load(float_graph, rt.EngineSettings(runtime=rt.OPENVINO, threads=threads,
                                                        inference_precision=inference_precision))
        agreement = quantize.caption_agreement(ck, parity.onnx_encode(parity.session(fp32_onnx)),
                                               parity.onnx_encode(engine), parity.session(dec_onnx),
                                               evalset.images, evalset.scenes)
        what = f"OpenVINO {precision}"
        log(f"      greedy captions {what} == fp32 on {evalset.source}: {agreement.agree}/{agreement.total} = "
            f"{agreement.share:.2%}")
        if agreement.fp32_correct is not None:
            log(f"      captions correct by the scene spec: fp32 {agreement.fp32_correct:.2%}, "
                f"{what} {agreement.variant_correct:.2%}")
        manifest["runtime"]["agreement"] = {"variant": what, "total": agreement.total, "agree": agreement.agree,
                                            "share": agreement.share, "evaluated_on": evalset.source,
                                            "fp32_correct": agreement.fp32_correct,
                                            "variant_correct": agreement.variant_correct,
                                            "examples": agreement.examples}
        manifest["runtime"]["agreement"]["accepted"] = agreement.share >= a.min_agreement
        if agreement.share < a.min_agreement and report.encoder.runtime != rt.OPENVINO:
            log(f"      {what} would be REFUSED (below {a.min_agreement:.0%}); onnxruntime serves it")
        elif agreement.share < a.min_agreement:
            speed_only = bool(ck.meta.get("speed_only"))
            hint = ("; this SPEED-ONLY model has meaningless captions: CAPTIONER_MIN_AGREEMENT=0 builds it for "
                    "speed measurements" if speed_only else "; build with PRECISION=fp32 or RUNTIME=onnxruntime")
            raise BuildFailed(EXIT_REFUSED, f"{what} encoder REFUSED: {agreement.share:.2%} caption agreement with "
                                            f"fp32 is below {a.min_agreement:.0%}{hint}")
    return report.runtimes(), inference_precision, precision, runtime_choice.fused_layout(report)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = build(a)
    except BuildFailed as e:
        log(f"build-engines: {e}")
        return e.code
    log(f"build-engines: {manifest['model']} -> {manifest['repository']} ({manifest['target']}, "
        f"{manifest['precision']}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
