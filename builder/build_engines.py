"""`make build-engines`: checkpoint -> ONNX -> parity checks -> (TensorRT engine on a
CUDA machine) -> (reduced-precision encoder when asked) -> Triton model repository,
with a build manifest next to the artifacts and in the repository.

Exit status: 0 built; 1 a check failed (parity, engine); 2 bad arguments or missing
checkpoint; 3 TARGET=gpu could not be met (the CPU repository is still built);
4 the reduced-precision variant was refused (no repository written)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from captioner.serving import PRECISIONS

from . import build_steps as steps
from . import cpu_step
from .build_steps import EXIT_CHECK_FAILED, EXIT_GPU_UNMET, EXIT_REFUSED, EXIT_USAGE, MANIFEST, BuildFailed, BuildState, log
from .capacity import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_BUDGET_MS

# The CLI's interface for the launcher, the benchmark and the tests.
__all__ = [
    "DEFAULT_MAX_BATCH",
    "EXIT_CHECK_FAILED",
    "EXIT_GPU_UNMET",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "MANIFEST",
    "BuildFailed",
    "build",
    "main",
    "parse_args",
    "resolve_model",
]
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENCODER_INPUT = "uint8"  # why: docs/bench.md, "What the defaults are, and why"
DEFAULT_LAYOUT = "auto"  # whole for small encoders, fused for large: builder/runtime_choice.py
TARGETS = ("auto", "cpu", "gpu")
RUNTIMES = ("auto", "onnxruntime", "openvino")
ENCODER_INPUTS_CHOICES = ("float32", "uint8")
STEPS = 7


@contextmanager
def step(n: int, title: str):
    log(f"[{n}/{STEPS}] {title}")
    t0 = time.perf_counter()
    yield
    log(f"      ({time.perf_counter() - t0:.1f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m builder.build_engines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=env("CAPTIONER_MODEL"),
        help="checkpoint dir/file, or 'seed-inception' (env CAPTIONER_MODEL; default: models/default)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default=env("CAPTIONER_TARGET", "auto"),
        help="auto: TensorRT when a CUDA device is present, else CPU (env CAPTIONER_TARGET)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=env("CAPTIONER_PRECISION", "fp32"),
        help="encoder precision; fp16 is GPU-only, bf16 CPU-only (OpenVINO's inference-precision "
        "hint, where the CPU has bf16), bf16 and int8 are checked for caption agreement "
        "(env CAPTIONER_PRECISION)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=env("CAPTIONER_RUNTIME", "auto"),
        help="CPU runtime of the encoder and decoder step: auto times both here and keeps the faster "
        "per graph (env CAPTIONER_RUNTIME)",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "split", "fused", "whole"),
        default=env("CAPTIONER_LAYOUT", DEFAULT_LAYOUT),
        help="CPU repository layout: split (preprocess -> encoder -> caption_generator), fused "
        "(decode + encoder in one Python model, one hop fewer), whole (opt-in: decode, encoder and "
        "the caption loop in one Python model, one hop) or auto (fused when the encoder is "
        f"small, by its measured rate) (env CAPTIONER_LAYOUT, default {DEFAULT_LAYOUT})",
    )
    p.add_argument(
        "--encoder-input",
        choices=ENCODER_INPUTS_CHOICES,
        default=env("CAPTIONER_ENCODER_INPUT", DEFAULT_ENCODER_INPUT),
        help="what preprocess hands the CPU encoder: uint8 HWC (normalised inside the encoder graph) or "
        f"float32 CHW (env CAPTIONER_ENCODER_INPUT, default {DEFAULT_ENCODER_INPUT})",
    )
    p.add_argument(
        "--decode",
        choices=("fast", "exact"),
        default=env("CAPTIONER_DECODE", "fast"),
        help="image decode path the repository serves (captioner/preprocess.py): fast decodes no larger "
        "than the model needs and is served only when its gate passes (builder/decode_gate.py), else "
        "exact; exact decodes every image at full size (env CAPTIONER_DECODE, default fast)",
    )
    p.add_argument(
        "--decode-min-agreement",
        type=float,
        default=env("CAPTIONER_DECODE_MIN_AGREEMENT"),
        help="the fast decode path's gate: share of greedy captions identical to the exact path's "
        "(env CAPTIONER_DECODE_MIN_AGREEMENT; default builder/decode_gate.py's MIN_AGREEMENT, 0.99); 0 for a "
        "speed-only model with random weights, whose captions say nothing about quality (the bench's seed-inception)",
    )
    p.add_argument(
        "--repo", default=env("CAPTIONER_REPO", "model_repository"), help="Triton model repository to write (env CAPTIONER_REPO)"
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=int(env("CAPTIONER_MAX_BATCH", DEFAULT_MAX_BATCH)),
        help=f"Triton max_batch_size and TensorRT profile max (env CAPTIONER_MAX_BATCH, default {DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--out",
        default=env("CAPTIONER_BUILD_OUT"),
        help="artifact directory (env CAPTIONER_BUILD_OUT; default artifacts/<model name>)",
    )
    p.add_argument(
        "--data",
        default=env("CAPTIONER_DATA", "data/shapes-v1"),
        help="dataset whose test split measures reduced-precision agreement (env CAPTIONER_DATA); "
        "generated scenes when it is absent",
    )
    p.add_argument(
        "--agreement-images",
        type=int,
        default=int(env("CAPTIONER_AGREEMENT_IMAGES", 0)) or None,
        help="cap on the images used for the agreement check (default: the whole split)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=float(env("CAPTIONER_MIN_AGREEMENT", 0.98)),
        help="refuse a reduced-precision encoder below this share of fp32-identical captions",
    )
    p.add_argument(
        "--parity-scenes",
        type=int,
        default=int(env("CAPTIONER_PARITY_SCENES", 200)),
        help="scenes whose greedy captions must be identical through ONNX and torch",
    )
    p.add_argument(
        "--queue-budget-ms",
        type=int,
        default=int(env("CAPTIONER_QUEUE_BUDGET_MS", DEFAULT_QUEUE_BUDGET_MS)),
        help="load shedding: the longest a request may wait in one model's queue; queues are sized to "
        "drain within it at the rate measured on this machine (env CAPTIONER_QUEUE_BUDGET_MS, "
        f"default {DEFAULT_QUEUE_BUDGET_MS})",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=int(env("CAPTIONER_MAX_QUEUE_SIZE", -1)),
        help="override every derived queue bound (0: unbounded, no shedding; env CAPTIONER_MAX_QUEUE_SIZE)",
    )
    p.add_argument(
        "--trt-version",
        default=env("CAPTIONER_TRT_VERSION"),
        help="TensorRT version of the target Triton image (e.g. 10.5): the build refuses another (env CAPTIONER_TRT_VERSION)",
    )
    p.add_argument(
        "--timing-cache",
        default=env("CAPTIONER_TRT_TIMING_CACHE"),
        help="TensorRT timing cache file (default <out>/tensorrt_timing.cache)",
    )
    p.add_argument(
        "--add-version",
        action="store_true",
        help="add the model to the existing repository as the next version of every model instead of "
        "replacing it (make build-engines VERSION=next; builder/versions.py); what the server loads "
        "is unchanged until a rollout (make rollout)",
    )
    p.add_argument(
        "--keep",
        type=int,
        default=int(env("CAPTIONER_KEEP_VERSIONS", 3)),
        help="with --add-version: versions kept on disk, the newest ones plus any loaded "
        "(env CAPTIONER_KEEP_VERSIONS, default 3)",
    )
    a = p.parse_args(argv)
    if a.keep < 1:
        p.error("--keep must be >= 1")
    if a.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1")
    if a.queue_budget_ms < 1:
        p.error("--queue-budget-ms must be >= 1")
    if not 0.0 <= a.min_agreement <= 1.0:
        p.error("--min-agreement must be in [0, 1]")
    if a.decode_min_agreement is not None and not 0.0 <= a.decode_min_agreement <= 1.0:
        p.error("--decode-min-agreement must be in [0, 1]")
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
        raise BuildFailed(
            EXIT_USAGE, f"{e}. Train one (make default-model) or pass MODEL=<checkpoint dir> or MODEL={seed_inception.NAME}"
        ) from None
    return path, path.parent.name


def build(a: argparse.Namespace) -> dict:
    """Run the pipeline; returns the manifest. Raises BuildFailed with an exit code."""
    from .export import OPSET

    started = time.perf_counter()
    ck_path, name = resolve_model(a.model)
    if a.add_version:  # refused before a long build, not after it
        from .versions import VersionError, check_addable

        try:
            a.layout = check_addable(Path(a.repo), a.layout)
        except VersionError as e:
            raise BuildFailed(EXIT_USAGE, str(e)) from None
    b = BuildState(
        a,
        ck_path,
        name,
        out_dir=Path(a.out) if a.out else ROOT / "artifacts" / name,
        repo_dir=Path(a.repo),
        started=started,
        manifest={
            "model": name,
            "requested": {
                "target": a.target,
                "precision": a.precision,
                "runtime": a.runtime,
                "encoder_input": a.encoder_input,
                "layout": a.layout,
            },
        },
    )
    with step(1, "checkpoint"):
        steps.load_checkpoint(b)
    with step(2, f"ONNX export (opset {OPSET}) -> {b.out_dir}"):
        steps.export_onnx(b)
    with step(3, f"parity onnxruntime vs torch (batch 1 and 7; greedy captions on {a.parity_scenes} scenes)"):
        steps.check_parity(b)
    with step(4, "TensorRT engine"):
        steps.tensorrt_engine(b)
    with step(5, "reduced-precision CPU encoder"):
        steps.cpu_reduced_precision(b)
    with step(6, f"CPU runtime (RUNTIME={a.runtime}) and encoder input ({a.encoder_input})"):
        cpu_step.cpu_runtime_and_input(b)
    with step(7, f"Triton repository ({b.target}, {b.precision}) -> {b.repo_dir}"):
        steps.write_repository(b)
    if b.gpu_unmet:
        raise BuildFailed(EXIT_GPU_UNMET, b.gpu_unmet)
    return b.manifest


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = build(a)
    except BuildFailed as e:
        log(f"build-engines: {e}")
        return e.code
    log(
        f"build-engines: {manifest['model']} -> {manifest['repository']} ({manifest['target']}, "
        f"{manifest['precision']}) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
