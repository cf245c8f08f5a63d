"""The steps of `make build-engines`, one function each (builder/build_engines.py parses
the flags and runs them in order; step 6, the CPU runtime, is builder/cpu_step.py).

Every step reads and extends one `BuildState`: what the flags asked for, the checkpoint,
the artifacts made so far, what has been decided (target, precision, runtimes, layout)
and the manifest. A step that must stop the build raises BuildFailed with its exit
status."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "build_manifest.json"
EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_GPU_UNMET, EXIT_REFUSED = 1, 2, 3, 4
INDENT = "      "  # step detail lines sit under their "[n/7] ..." heading


class BuildFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def log(msg: str = "") -> None:
    print(msg, flush=True)


def detail(msg: str) -> None:
    log(INDENT + msg)


@dataclass
class BuildState:
    """What the steps share; each step fills in its part."""

    a: argparse.Namespace
    ck_path: Path
    name: str
    out_dir: Path
    repo_dir: Path
    manifest: dict
    started: float = field(default_factory=time.perf_counter)
    ck: Any = None  # captioner.checkpoint.Checkpoint, loaded by step 1
    speed_only: bool = False
    enc_onnx: Path = Path()  # the fp32 encoder graph (step 2)
    dec_onnx: Path = Path()  # the decoder step graph (step 2)
    artifacts: dict = field(default_factory=dict)  # what the repository is assembled from
    target: str = "cpu"
    precision: str = "fp32"
    gpu_unmet: str | None = None  # TARGET=gpu could not be met: why (exit EXIT_GPU_UNMET at the end)
    runtimes: dict | None = None
    inference_precision: str = "fp32"
    encoder_input: str = "float32"
    layout: str = "split"
    _eval_images: Any = None

    def eval_images(self):
        """The images reduced precision is checked on (loaded once, when first needed)."""
        if self._eval_images is None:
            from tqdm import tqdm

            from . import quantize

            self._eval_images = quantize.evaluation_images(self.ck, self.a.data, limit=self.a.agreement_images, progress=tqdm)
        return self._eval_images


# --- step 1 -------------------------------------------------------------------------------


def load_checkpoint(b: BuildState) -> None:
    from captioner import checkpoint as ckpt_mod

    from . import tensorrt_engine as te

    a = b.a
    ck = b.ck = ckpt_mod.load(b.ck_path)
    b.speed_only = bool(ck.meta.get("speed_only"))
    detail(f"{b.ck_path}  sha256 {ck.sha256[:16]}")
    detail(
        f"{ck.args.backbone} {ck.preprocess.image_size}px, vocabulary {len(ck.vocab)}, "
        f"lstm {ck.args.lstm_units}, max batch {a.max_batch_size}"
    )
    if b.speed_only:
        detail(f"SPEED-ONLY MODEL: {ck.meta.get('note', 'random weights')}")
    if a.target == "gpu" and not te.cuda_available():
        detail(
            f"TARGET=gpu but {te.NO_CUDA.split(':')[0]}: the CPU repository will be built and the "
            f"build will exit {EXIT_GPU_UNMET}"
        )


# --- step 2 -------------------------------------------------------------------------------


def export_onnx(b: BuildState) -> None:
    from .export import export_decoder_step, export_encoder

    b.enc_onnx = export_encoder(b.ck, b.out_dir / "encoder.onnx")
    b.dec_onnx = export_decoder_step(b.ck, b.out_dir / "decoder_step.onnx")
    for f in (b.enc_onnx, b.dec_onnx):
        detail(f"{f.name}: {f.stat().st_size / 1e6:.1f} MB, named I/O, dynamic batch, onnx.checker ok")
    b.artifacts.update(encoder_onnx=b.enc_onnx, decoder_onnx=b.dec_onnx)


# --- step 3 -------------------------------------------------------------------------------


def check_parity(b: BuildState) -> None:
    from . import parity

    report = parity.check_exports(b.ck, b.enc_onnx, b.dec_onnx, caption_scenes=b.a.parity_scenes)
    for line in report.lines():
        detail(line)
    b.manifest["parity"] = report.to_dict()
    if not report.passed:
        raise BuildFailed(
            EXIT_CHECK_FAILED,
            f"parity FAILED (tolerance {report.tolerance:.0e}, captions must be "
            "identical): the ONNX graphs do not compute what the checkpoint does",
        )
    detail("parity PASSED")


# --- step 4 -------------------------------------------------------------------------------


def tensorrt_engine(b: BuildState) -> None:
    from . import tensorrt_engine as te

    a = b.a
    if a.target == "cpu" or a.precision == "bf16":
        why = "TARGET=cpu" if a.target == "cpu" else "PRECISION=bf16 is a CPU precision"
        detail(f"skipped: {why}")
        b.manifest["tensorrt"] = {"skipped": why}
        return
    try:
        result = te.build_encoder_plan(
            b.ck,
            _engine_onnx(b),
            b.out_dir,
            a.max_batch_size,
            a.precision,
            timing_cache=a.timing_cache,
            expected_version=a.trt_version,
            log=detail,
        )
    except te.EngineUnavailable as e:
        msg = str(e) if isinstance(e, te.NoCudaDevice) else f"{e}: TensorRT engine skipped, CPU repository built"
        detail(msg)
        b.manifest["tensorrt"] = {"skipped": msg}
        if a.target == "gpu":
            b.gpu_unmet = msg
        return
    for d in result.diffs:
        detail(
            f"engine vs onnxruntime batch {d.batch:<2} {d.inputs:<7} max|diff| "
            + "  ".join(f"{k}={v:.2e}" for k, v in d.max_abs.items())
            + f"  (max|ref| {d.ref_max:.2f})"
        )
    b.manifest["tensorrt"] = result.to_dict()
    if not result.passed:
        raise BuildFailed(
            EXIT_CHECK_FAILED,
            f"TensorRT engine differs from onnxruntime by more than {result.tolerance:.0e} x max(1, max|reference|)",
        )
    if a.precision != "fp32":
        _engine_agreement(b, result.encode)
    b.artifacts["encoder_plan"] = result.plan_path
    b.target, b.precision = "gpu", a.precision
    detail(f"{result.plan_path.name}: engine check PASSED")


def _engine_onnx(b: BuildState):
    """kind -> the ONNX graph TensorRT builds that kind of engine from, made on first use."""
    from . import quantize

    onnx_files = {"fp32": b.enc_onnx}

    def onnx_for(kind: str) -> Path:
        if kind not in onnx_files:
            if kind == "fp16":
                onnx_files[kind] = quantize.convert_fp16(b.enc_onnx, b.out_dir / "encoder.fp16.onnx")
            elif kind == "int8_qdq":
                n = quantize.calibration_count(b.enc_onnx)
                detail(f"Q/DQ graph: symmetric int8, calibrated on {n} scenes")
                onnx_files[kind] = quantize.quantize_int8(
                    b.enc_onnx,
                    b.out_dir / "encoder.int8_qdq.onnx",
                    quantize.calibration_images(b.ck, n),
                    symmetric_activations=True,
                )
        return onnx_files[kind]

    return onnx_for


def _engine_agreement(b: BuildState, encode) -> None:
    """A reduced-precision engine is kept only when its greedy captions agree with fp32's."""
    from . import parity, quantize

    a = b.a
    evalset = b.eval_images()
    agreement = quantize.caption_agreement(
        b.ck, parity.onnx_encode(parity.session(b.enc_onnx)), encode, parity.session(b.dec_onnx), evalset.images, evalset.scenes
    )
    detail(
        f"greedy captions engine {a.precision} == fp32 on {evalset.source}: "
        f"{agreement.agree}/{agreement.total} = {agreement.share:.2%}"
    )
    b.manifest["tensorrt"]["agreement"] = {
        "total": agreement.total,
        "agree": agreement.agree,
        "share": agreement.share,
        "evaluated_on": evalset.source,
        "fp32_correct": agreement.fp32_correct,
        "engine_correct": agreement.variant_correct,
    }
    if agreement.share < a.min_agreement:
        raise BuildFailed(
            EXIT_REFUSED,
            f"{a.precision} engine REFUSED: {agreement.share:.2%} caption agreement with fp32 is below {a.min_agreement:.0%}",
        )


# --- step 5 -------------------------------------------------------------------------------


def cpu_reduced_precision(b: BuildState) -> None:
    from . import quantize

    a = b.a
    if b.target == "gpu":
        detail("not needed: the encoder runs in TensorRT")
        return
    if a.precision == "fp16":
        detail("PRECISION=fp16 is a TensorRT precision: the CPU repository stays fp32")
        return
    if a.precision == "fp32":
        detail("not requested (PRECISION=int8 builds it and checks its caption agreement with fp32)")
        return
    if a.precision == "bf16":
        detail("bf16: the fp32 graph under OpenVINO's bf16 inference-precision hint (checked in step 6)")
        return
    variant = quantize.build_cpu_variant(
        b.ck,
        b.enc_onnx,
        b.dec_onnx,
        b.out_dir,
        b.eval_images(),
        batch_sizes=(1, a.max_batch_size),
        min_agreement=a.min_agreement,
        log=detail,
    )
    for line in variant.lines():
        detail(line)
    b.manifest["cpu_reduced_precision"] = variant.to_dict()
    if variant.chosen is None:
        raise BuildFailed(EXIT_REFUSED, "no reduced-precision encoder runs on this CPU")
    if not variant.accepted:
        assert variant.agreement is not None  # measured for every chosen variant
        hint = (
            "; this SPEED-ONLY model has meaningless captions: CAPTIONER_MIN_AGREEMENT=0 builds it for speed measurements"
            if b.speed_only
            else "; build with PRECISION=fp32"
        )
        raise BuildFailed(
            EXIT_REFUSED,
            f"{variant.chosen.name} encoder REFUSED: "
            f"{variant.agreement.share:.2%} caption agreement with fp32 is below "
            f"{a.min_agreement:.0%}{hint}",
        )
    b.artifacts["encoder_onnx"] = variant.chosen.path
    b.precision = variant.chosen.name


# --- step 7 -------------------------------------------------------------------------------


def write_repository(b: BuildState) -> None:
    from . import capacity, versions
    from .repository import assemble
    from .runtime_choice import warm_cache

    a = b.a
    from .decode_gate import choose

    # The decode path served (preprocess.json, the rates measured next, the manifest).
    b.ck.preprocess, b.manifest["decode"] = choose(
        b.ck, getattr(a, "decode", "fast"), log=detail, min_agreement=getattr(a, "decode_min_agreement", None)
    )
    measured = _measure_capacity(b) if b.target == "cpu" else None
    fused = b.layout in ("fused", "whole")  # preprocess runs the encoder: its queue is the encoder's
    queues = capacity.policies(
        measured, a.max_batch_size, a.queue_budget_ms, None if a.max_queue_size < 0 else a.max_queue_size, fused=fused
    )
    for line in capacity.describe(queues, fused=fused, whole=b.layout == "whole"):
        detail(f"load shedding: {line}")
    b.manifest["load_shedding"] = {
        "budget_ms": a.queue_budget_ms,
        "measured": measured and measured.to_dict(),
        "queues": {k: v.to_dict() for k, v in queues.items()},
    }
    add_version = getattr(a, "add_version", False)
    # VERSION=next: assembled on its own, then added to the repository as its next version.
    into = versions.staging_dir(b.repo_dir) if add_version else b.repo_dir
    try:
        repo = Path(
            assemble(
                b.ck,
                into,
                b.target,
                b.artifacts,
                max_batch_size=a.max_batch_size,
                precision=b.precision,
                runtimes=b.runtimes,
                inference_precision=b.inference_precision,
                encoder_input=b.encoder_input,
                layout=b.layout,
                queues=queues,
            )
        )
        warmed = [] if add_version else warm_cache(repo)
        if add_version:
            gate = versions.gate_record(b.ck_path, repo)
            b.manifest["model_version"] = versions.add_version(repo, b.repo_dir, keep=a.keep)
            repo = b.repo_dir
            warmed = warm_cache(repo, b.manifest["model_version"])  # where the version now lies
    except ValueError as e:  # RepositoryError and VersionError included: the repository could not be made consistent
        raise BuildFailed(EXIT_CHECK_FAILED, f"repository assembly failed: {e}") from None
    finally:
        if add_version:
            shutil.rmtree(into, ignore_errors=True)
    if warmed:
        detail(f"OpenVINO compiled-model cache filled for {', '.join(warmed)}: a server start loads, not compiles")
    previous = versions.version_records(repo) if add_version else {}  # before this build's manifest replaces it
    _write_manifest(b, repo, warmed)
    if add_version:
        record = versions.record_build(repo, b.manifest, b.manifest["model_version"], gate, previous)
        detail(
            f"added as version {b.manifest['model_version']} ({record['model_version']}); versions on disk "
            f"{versions.all_versions(repo)}, serving {versions.serving_version(repo)}: make rollout switches"
        )
    for child in sorted(p for p in repo.iterdir() if p.is_dir()):
        detail(f"{child.name}/")
    detail(f"{MANIFEST} written to {repo} and {b.out_dir}")


def _measure_capacity(b: BuildState):
    """The rates load shedding sizes the queues from, measured here with the served runtimes."""
    from captioner.serving.runtime import EngineSettings

    from . import capacity
    from .repository import DEFAULT_ORT_THREADS, ENCODER, GENERATOR

    chosen = b.runtimes or {}
    measured = capacity.measure(
        b.ck,
        b.artifacts["encoder_onnx"],
        b.dec_onnx,
        b.a.max_batch_size,
        normalise=b.encoder_input != "uint8",
        encoder_settings=EngineSettings(chosen.get(ENCODER, "onnxruntime"), DEFAULT_ORT_THREADS[ENCODER], b.inference_precision),
        step_settings=EngineSettings(chosen.get(GENERATOR, "onnxruntime"), 1),
    )
    detail(
        f"measured here: preprocess {measured.preprocess_per_s:.0f} img/s (1 core), encoder "
        f"{measured.encoder_per_s:.0f} img/s (batch {measured.encoder_batch}, {measured.threads} threads), "
        f"decoding {measured.decode_per_s:.0f} captions/s (1 core): the stack's ceiling "
        f"{measured.pipeline_per_s:.0f} captions/s on {measured.cores} cores"
    )
    return measured


def _write_manifest(b: BuildState, repo: Path, warmed: list[str]) -> None:
    from . import shm
    from .export import OPSET

    ck = b.ck
    b.manifest.update(
        {
            "speed_only": b.speed_only,
            "checkpoint": {"path": str(b.ck_path), "sha256": ck.sha256, "meta": ck.meta},
            "preprocess": ck.preprocess.to_dict(),
            "target": b.target,
            "precision": b.precision,
            "encoder_input": b.encoder_input,
            "layout": b.layout,
            "openvino_cache_warmed": warmed,
            "max_batch_size": b.a.max_batch_size,
            # /dev/shm for full batches of the largest images (builder/shm.py); pods mount this much.
            "shm": shm.manifest_entry(repo),
            "opset": OPSET,
            "versions": versions(),
            "artifacts": {k: {"file": str(v), "sha256": _sha(Path(v))} for k, v in b.artifacts.items()},
            "repository": str(repo),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - b.started, 1),
        }
    )
    text = json.dumps(b.manifest, indent=2, default=str) + "\n"
    for d in (repo, b.out_dir):
        (d / MANIFEST).write_text(text)


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

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino_version(),
        "tensorrt": trt,
    }


def _sha(path: Path) -> str:
    from captioner.checkpoint import file_sha256

    return file_sha256(path)
