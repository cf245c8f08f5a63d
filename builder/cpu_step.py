"""Step 6 of `make build-engines` on CPU: the encoder's input (uint8 wrapper), the runtime
per graph, and the numerics checks of what OpenVINO will serve (builder/build_steps.py
holds the other steps and the state they share)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .build_steps import EXIT_CHECK_FAILED, EXIT_REFUSED, EXIT_USAGE, BuildFailed, BuildState, detail

# OpenVINO fp32 against onnxruntime, relative to max(1, max|reference|): the TensorRT check's bound.
OPENVINO_TOLERANCE = 1e-3


def cpu_runtime_and_input(b: BuildState) -> None:
    a = b.a
    if b.target == "gpu":
        detail("not needed: TensorRT and Triton's onnxruntime backend serve the graphs")
        return
    float_graph = Path(b.artifacts["encoder_onnx"])
    if a.encoder_input == "uint8":
        from .uint8_input import with_uint8_input

        b.artifacts["encoder_onnx"] = with_uint8_input(float_graph, b.out_dir / f"{float_graph.stem}.uint8.onnx", b.ck.preprocess)
        b.encoder_input = "uint8"
        detail(
            f"{b.artifacts['encoder_onnx'].name}: uint8 [S, S, 3] input, normalisation inside the graph "
            "(same float32 operations as captioner.preprocess.normalize)"
        )
    auto, why = cpu_runtime(b, Path(b.artifacts["encoder_onnx"]), float_graph)
    b.layout = a.layout if a.layout != "auto" else auto
    detail(f"layout {b.layout}" + (f" (auto: {why})" if a.layout == "auto" else ""))


def cpu_runtime(b: BuildState, served: Path, float_graph: Path) -> tuple[str, str]:
    """Step 6 on CPU: choose the runtime per graph (RUNTIME=auto times both), then check
    what will be served when its numerics are not the ones already checked: OpenVINO fp32
    against onnxruntime (tolerance), and every reduced-precision encoder run by OpenVINO
    (bf16 hint, or the int8 graph) by its greedy-caption agreement with fp32.
    `served` is timed; the checks run on `float_graph`, the same graph before the uint8
    wrapper, whose input step is bit-identical to captioner.preprocess.normalize.
    Sets the runtimes, inference precision and precision label; returns (layout, why)
    for LAYOUT=auto."""
    from captioner.serving import runtime as rt

    from . import runtime_choice
    from .repository import DEFAULT_ORT_THREADS, ENCODER

    a = b.a
    if a.precision == "bf16":
        if not rt.cpu_has_bf16():
            raise BuildFailed(
                EXIT_REFUSED,
                "bf16 REFUSED: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16); build with PRECISION=fp32 or int8",
            )
        if rt.openvino_version() is None:
            raise BuildFailed(EXIT_REFUSED, "bf16 needs OpenVINO, which is not installed (pip install -r requirements.txt)")
        b.inference_precision, b.precision = "bf16", "bf16"
    threads = DEFAULT_ORT_THREADS[ENCODER]
    try:
        report = runtime_choice.choose_runtimes(
            b.ck, served, b.dec_onnx, a.runtime, b.inference_precision, threads, (1, a.max_batch_size), log=detail
        )
    except rt.RuntimeUnavailable as e:
        raise BuildFailed(EXIT_USAGE, f"RUNTIME={a.runtime}: {e}") from None
    for line in report.lines():
        detail("chosen " + line)
    b.manifest["runtime"] = report.to_dict()
    if report.encoder.runtime == rt.OPENVINO and b.precision == "fp32":
        _check_openvino_fp32(
            b,
            float_graph,
            rt.EngineSettings(runtime=report.encoder.runtime, threads=threads, inference_precision=b.inference_precision),
        )
    # The reduced-precision graph was gated through onnxruntime in step 5; OpenVINO's
    # numerics differ, so it is gated too wherever it runs, chosen or not (the bench
    # serves both runtimes from one build).
    if b.precision != "fp32" and rt.openvino_version() is not None:
        _gate_openvino_reduced(b, float_graph, threads, chosen=report.encoder.runtime == rt.OPENVINO)
    b.runtimes = report.runtimes()
    return runtime_choice.auto_layout(report)


def _check_openvino_fp32(b: BuildState, float_graph: Path, settings) -> None:
    from captioner.preprocess import normalize
    from captioner.serving import runtime as rt

    from . import parity

    images, _ = parity.scene_batch(16, b.ck.preprocess, seed=5)
    x = {"image": normalize(images, b.ck.preprocess)}
    ref = parity.session(float_graph).run(["h0", "c0"], x)
    got = rt.load(float_graph, settings).run(["h0", "c0"], x)
    worst = max(float(np.abs(r - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got))
    b.manifest["runtime"]["openvino_vs_onnxruntime_max_rel_diff"] = worst
    detail(f"OpenVINO fp32 vs onnxruntime on 16 scenes: max|diff| / max(1, max|ref|) = {worst:.1e}")
    if worst > OPENVINO_TOLERANCE:
        raise BuildFailed(
            EXIT_CHECK_FAILED,
            f"OpenVINO fp32 encoder differs from onnxruntime by {worst:.1e} "
            f"(> {OPENVINO_TOLERANCE:.0e}): build with RUNTIME=onnxruntime",
        )


def _gate_openvino_reduced(b: BuildState, float_graph: Path, threads: int, chosen: bool) -> None:
    """The reduced-precision encoder under OpenVINO against fp32 captions: refused when
    OpenVINO serves it and it agrees too rarely, reported when onnxruntime serves it."""
    from captioner.serving import runtime as rt

    from . import parity, quantize

    a = b.a
    evalset = b.eval_images()
    engine = rt.load(
        float_graph, rt.EngineSettings(runtime=rt.OPENVINO, threads=threads, inference_precision=b.inference_precision)
    )
    agreement = quantize.caption_agreement(
        b.ck,
        parity.onnx_encode(parity.session(b.enc_onnx)),
        parity.onnx_encode(engine),
        parity.session(b.dec_onnx),
        evalset.images,
        evalset.scenes,
    )
    what = f"OpenVINO {b.precision}"
    detail(f"greedy captions {what} == fp32 on {evalset.source}: {agreement.agree}/{agreement.total} = {agreement.share:.2%}")
    if agreement.fp32_correct is not None:
        detail(f"captions correct by the scene spec: fp32 {agreement.fp32_correct:.2%}, {what} {agreement.variant_correct:.2%}")
    b.manifest["runtime"]["agreement"] = {
        "variant": what,
        "total": agreement.total,
        "agree": agreement.agree,
        "share": agreement.share,
        "evaluated_on": evalset.source,
        "fp32_correct": agreement.fp32_correct,
        "variant_correct": agreement.variant_correct,
        "examples": agreement.examples,
    }
    b.manifest["runtime"]["agreement"]["accepted"] = agreement.share >= a.min_agreement
    if agreement.share < a.min_agreement and not chosen:
        detail(f"{what} would be REFUSED (below {a.min_agreement:.0%}); onnxruntime serves it")
    elif agreement.share < a.min_agreement:
        hint = (
            "; this SPEED-ONLY model has meaningless captions: CAPTIONER_MIN_AGREEMENT=0 builds it for speed measurements"
            if b.speed_only
            else "; build with PRECISION=fp32 or RUNTIME=onnxruntime"
        )
        raise BuildFailed(
            EXIT_REFUSED,
            f"{what} encoder REFUSED: {agreement.share:.2%} caption agreement with fp32 is below {a.min_agreement:.0%}{hint}",
        )
