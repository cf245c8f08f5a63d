"""Reduced-precision encoders.

CPU: int8 by onnxruntime static quantization (QDQ format, per-channel weights),
calibrated on real scenes that went through `captioner.preprocess`; bf16 is probed
too, and the faster of the two that onnxruntime can run here is offered. A variant
is only accepted when its greedy captions agree with fp32's on at least
`MIN_AGREEMENT` of the evaluation images.

The same quantizer with symmetric int8 activations gives the Q/DQ graph that
TensorRT builds int8 engines from (explicit quantization)."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from captioner import scenes
from captioner.checkpoint import Checkpoint
from captioner.decoding import onnx_step
from captioner.preprocess import normalize, prepare_path

from . import parity
from .capacity import DEFAULT_MAX_BATCH
from .export import ENCODER_INPUTS, ENCODER_OUTPUTS, export_module

MIN_AGREEMENT = 0.98
CALIBRATION_SCENES = 128
CALIBRATION_SEED = 7  # distinct from the parity and fallback evaluation seeds
CALIBRATION_BATCH = 8
# The dense head (pooled features -> bottleneck -> h0, c0) stays fp32: quantizing it cost
# far more greedy-caption agreement with fp32 than it gained in speed; the convolutions
# are where the time is.
KEEP_FP32_OPS = ("Gemm", "MatMul")
CALIBRATION_MEMORY = 1536 << 20
FALLBACK_EVAL_SCENES = 500
EVAL_SEED = 2024


class CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over normalised images."""

    def __init__(self, images: np.ndarray, batch_size: int = 32, input_name: str = ENCODER_INPUTS[0]):
        self._batches = [{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._batches)


def activation_bytes_per_image(onnx_path: str | Path) -> int:
    """float32 bytes of all intermediate tensors of the graph for one image."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    for t in list(model.graph.input) + list(model.graph.output):
        batch = t.type.tensor_type.shape.dim[0]
        batch.ClearField("dim_param")
        batch.dim_value = 1
    del model.graph.value_info[:]
    total = 0
    for v in onnx.shape_inference.infer_shapes(model).graph.value_info:
        tt = v.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type == onnx.TensorProto.FLOAT and dims and all(d > 0 for d in dims):
            total += int(np.prod(dims)) * 4
    return total


def calibration_count(onnx_path: str | Path, wanted: int = CALIBRATION_SCENES, budget_bytes: int = CALIBRATION_MEMORY) -> int:
    """onnxruntime's MinMax calibration keeps every intermediate tensor of every
    calibration image until the end (its incremental option discards data in this
    release), so the sample is capped by memory: 128 scenes for the small CNN, about
    16 for InceptionV3 at 299 px (92 MB of activations per image)."""
    per_image = max(1, activation_bytes_per_image(onnx_path))
    return int(max(CALIBRATION_BATCH, min(wanted, budget_bytes // per_image)))


def calibration_images(ck: Checkpoint, n: int = CALIBRATION_SCENES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    images, _ = parity.scene_batch(n, ck.preprocess, seed=seed)
    return normalize(images, ck.preprocess)


def quantize_int8(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    symmetric_activations: bool = False,
    keep_fp32: tuple[str, ...] = KEEP_FP32_OPS,
) -> Path:
    """Static int8 QDQ: per-channel int8 weights, activations calibrated (MinMax) on
    `calibration`. Activations are uint8 with a zero point for onnxruntime on CPU (its
    fastest u8s8 kernels); `symmetric_activations=True` gives int8 activations with zero
    point 0, which TensorRT's explicit quantization requires. Ops of the types in
    `keep_fp32` stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_onnx), str(prepped))
        excluded = [n.name for n in onnx.load(str(prepped)).graph.node if n.op_type in keep_fp32]
        quantize_static(
            str(prepped),
            str(out_path),
            CalibrationReader(calibration, batch_size=CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
            extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
        )
    onnx.checker.check_model(onnx.load(str(out_path)), full_check=True)
    return out_path


def convert_fp16(fp32_onnx: str | Path, out_path: str | Path) -> Path:
    """The fp32 graph computing in fp16, with float32 inputs and outputs kept (same
    Triton config, same preprocessing): what a strongly typed TensorRT 11 network needs
    for an fp16 engine. Graph-level conversion (onnxconverter-common) rather than a
    half-precision torch export, whose tracer leaves some ops in fp32."""
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_onnx))
    # Casts the exporter wrote to float32 (coordinate channels) must now produce fp16,
    # and stale value_info would contradict the converted types.
    for node in model.graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    del model.graph.value_info[:]
    converted = float16.convert_float_to_float16(model, keep_io_types=True, check_fp16_ready=False)
    del converted.graph.value_info[:]
    onnx.checker.check_model(converted, full_check=True)
    onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out_path))
    return out_path


def export_encoder_cast(ck: Checkpoint, path: str | Path, dtype: torch.dtype) -> Path:
    """The encoder exported from torch computing in `dtype`, casts at its boundary.
    Used to probe bf16, which has no graph-level converter."""

    class Cast(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module):
            super().__init__()
            self.encoder = copy.deepcopy(encoder).to(dtype)

        def forward(self, image):
            h0, c0 = self.encoder(image.to(dtype))
            return h0.float(), c0.float()

    s = ck.preprocess.image_size
    return export_module(Cast(ck.model.encoder), (torch.zeros(2, 3, s, s),), path, ENCODER_INPUTS, ENCODER_OUTPUTS, strict=False)


def probe_bf16(ck: Checkpoint, path: str | Path) -> tuple[bool, str]:
    """Can onnxruntime's CPU provider run a bf16 encoder at all? (False, reason) if not."""
    try:
        export_encoder_cast(ck, path, torch.bfloat16)
        sess = parity.session(path)
        x = parity.random_images(1, ck.preprocess)
        sess.run(None, {ENCODER_INPUTS[0]: x})
    except Exception as e:  # export or kernel gaps: both mean "not available here"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"onnxruntime CPU cannot run it: {msg[:240]}"
    return True, "runs"


def throughput(sess: ort.InferenceSession, images: np.ndarray, batch: int, min_seconds: float = 1.0, min_runs: int = 3) -> float:
    """Images per second for one batch size (after a warm-up run)."""
    x = np.ascontiguousarray(images[:batch])
    if len(x) < batch:
        x = np.concatenate([x] * (batch // len(x) + 1))[:batch]
    feed = {ENCODER_INPUTS[0]: x}
    sess.run(None, feed)
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_seconds:
        sess.run(None, feed)
        runs += 1
    return runs * batch / (time.perf_counter() - t0)


@dataclass
class Agreement:
    total: int
    agree: int
    examples: list[dict] = field(default_factory=list)
    # Share of captions correct by the scene spec's rule, when ground truth is known:
    # disagreements between two equally valid templates are not errors.
    fp32_correct: float | None = None
    variant_correct: float | None = None

    @property
    def share(self) -> float:
        return self.agree / self.total if self.total else 0.0


@dataclass
class EvalSet:
    images: np.ndarray  # uint8 [N, S, S, 3], prepared by THE preprocessing
    source: str
    scenes: list[scenes.Scene] | None = None


def caption_agreement(
    ck: Checkpoint,
    reference: parity.EncodeFn,
    candidate: parity.EncodeFn,
    dec_sess: ort.InferenceSession,
    images_uint8: np.ndarray,
    truth: list[scenes.Scene] | None = None,
) -> Agreement:
    """Share of images whose greedy caption is identical through `candidate` and `reference`
    encoders (same decoder-step graph for both, so only the encoder differs)."""
    step = onnx_step(dec_sess)
    ref = parity.greedy_tokens(ck, reference, step, images_uint8, desc="greedy captions, fp32")
    got = parity.greedy_tokens(ck, candidate, step, images_uint8, desc="greedy captions, variant")
    same = [a == b for a, b in zip(ref, got)]
    examples = [{"fp32": ck.vocab.decode(a), "variant": ck.vocab.decode(b)} for a, b, s in zip(ref, got, same) if not s][:3]
    result = Agreement(len(same), int(sum(same)), examples)
    if truth is not None:

        def correct(seqs):
            return float(np.mean([scenes.caption_is_correct(ck.vocab.decode(t), sc) for t, sc in zip(seqs, truth)]))

        result.fp32_correct, result.variant_correct = correct(ref), correct(got)
    return result


def evaluation_images(
    ck: Checkpoint,
    data_dir: str | Path | None,
    split: str = "test",
    limit: int | None = None,
    fallback: int = FALLBACK_EVAL_SCENES,
    progress: Callable | None = None,
) -> EvalSet:
    """The dataset split's images prepared by THE preprocessing when the split exists,
    else freshly generated scenes; with their ground-truth scenes."""
    if data_dir and (ann := Path(data_dir) / f"captions_{split}.json").is_file():
        meta = json.loads(ann.read_text())
        chosen = meta["images"][:limit]
        by_id = {int(s["image_id"]): scenes.Scene.from_json(s) for s in meta.get("scenes", [])}
        files = [Path(data_dir) / im["file_name"] for im in chosen]
        it = progress(files, desc=f"loading {split}", unit="img", mininterval=2.0, leave=False) if progress else files
        images = np.stack([prepare_path(f, ck.preprocess) for f in it])
        truth = [by_id.get(int(im["id"])) for im in chosen]
        known = [t for t in truth if t is not None]
        return EvalSet(images, f"{ann.parent}/{split} ({len(images)} images)", known if len(known) == len(truth) else None)
    n = min(fallback, limit) if limit else fallback
    images, drawn = parity.scene_batch(n, ck.preprocess, seed=EVAL_SEED)
    return EvalSet(images, f"{n} generated scenes (no {split} split at {data_dir})", drawn)


@dataclass
class Candidate:
    name: str
    path: Path | None
    runs: bool
    note: str = ""
    images_per_s: dict[int, float] = field(default_factory=dict)


@dataclass
class CpuVariantReport:
    fp32_images_per_s: dict[int, float]
    candidates: list[Candidate]
    chosen: Candidate | None
    agreement: Agreement | None
    evaluated_on: str
    min_agreement: float

    @property
    def accepted(self) -> bool:
        return self.chosen is not None and self.agreement is not None and self.agreement.share >= self.min_agreement

    def lines(self) -> list[str]:
        bs = sorted(self.fp32_images_per_s)
        out = ["fp32: " + ", ".join(f"{self.fp32_images_per_s[b]:.1f} img/s at batch {b}" for b in bs)]
        for c in self.candidates:
            if c.runs:
                speed = ", ".join(
                    f"{c.images_per_s[b]:.1f} img/s at batch {b} ({c.images_per_s[b] / self.fp32_images_per_s[b]:.2f}x fp32)"
                    for b in bs
                )
                out.append(f"{c.name}: {speed}")
            else:
                out.append(f"{c.name}: not available here ({c.note})")
        if self.chosen is not None:
            out.append(f"faster reduced-precision variant here: {self.chosen.name}")
            slower = [b for b in bs if self.chosen.images_per_s[b] < self.fp32_images_per_s[b]]
            if slower:
                out.append(f"note: {self.chosen.name} is SLOWER than fp32 at batch {', '.join(map(str, slower))}")
        if self.agreement is not None:
            a = self.agreement
            assert self.chosen is not None  # the agreement is measured on the chosen variant
            verdict = "accepted" if self.accepted else f"REFUSED (below {self.min_agreement:.0%})"
            out.append(
                f"greedy captions {self.chosen.name} == fp32 on {self.evaluated_on}: "
                f"{a.agree}/{a.total} = {a.share:.2%}  {verdict}"
            )
            if a.fp32_correct is not None:
                out.append(
                    f"captions correct by the scene spec: fp32 {a.fp32_correct:.2%}, {self.chosen.name} {a.variant_correct:.2%}"
                )
            for ex in a.examples:
                out.append(f"  differs: fp32 {ex['fp32']!r} vs {self.chosen.name} {ex['variant']!r}")
        return out

    def to_dict(self) -> dict:
        return {
            "fp32_images_per_s": self.fp32_images_per_s,
            "candidates": [
                {"name": c.name, "runs": c.runs, "note": c.note, "images_per_s": c.images_per_s} for c in self.candidates
            ],
            "chosen": None if self.chosen is None else self.chosen.name,
            "agreement": None
            if self.agreement is None
            else {
                "total": self.agreement.total,
                "agree": self.agreement.agree,
                "share": self.agreement.share,
                "examples": self.agreement.examples,
                "fp32_correct": self.agreement.fp32_correct,
                "variant_correct": self.agreement.variant_correct,
            },
            "evaluated_on": self.evaluated_on,
            "min_agreement": self.min_agreement,
            "accepted": self.accepted,
        }


def build_cpu_variant(
    ck: Checkpoint,
    fp32_onnx: Path,
    decoder_onnx: Path,
    out_dir: Path,
    evalset: EvalSet,
    batch_sizes: tuple[int, ...] = (1, DEFAULT_MAX_BATCH),
    min_agreement: float = MIN_AGREEMENT,
    calibration_scenes: int = CALIBRATION_SCENES,
    log: Callable[[str], None] = print,
) -> CpuVariantReport:
    """Build int8, probe bf16, time what runs against fp32, keep the faster, and measure
    its caption agreement with fp32."""
    timing_images = normalize(evalset.images[: max(batch_sizes)], ck.preprocess)
    fp32 = parity.session(fp32_onnx)
    fp32_speed = {b: throughput(fp32, timing_images, b) for b in batch_sizes}

    n = calibration_count(fp32_onnx, calibration_scenes)
    log(f"int8: calibrating on {n} generated scenes")
    int8_path = quantize_int8(fp32_onnx, out_dir / "encoder.int8.onnx", calibration_images(ck, n))
    candidates = [
        Candidate("int8", int8_path, True, "onnxruntime static QDQ, per-channel weights, u8 activations, dense head fp32")
    ]
    bf16_path = out_dir / "encoder.bf16.onnx"
    ok, note = probe_bf16(ck, bf16_path)
    candidates.append(Candidate("bf16", bf16_path if ok else None, ok, note))
    if not ok:
        bf16_path.unlink(missing_ok=True)
    sessions = {}
    for c in candidates:
        if c.runs:
            assert c.path is not None  # a candidate that runs has its file
            sessions[c.name] = parity.session(c.path)
            c.images_per_s = {b: throughput(sessions[c.name], timing_images, b) for b in batch_sizes}
    runnable = [c for c in candidates if c.runs]
    chosen = max(runnable, key=lambda c: c.images_per_s[max(batch_sizes)]) if runnable else None
    agreement = None
    if chosen is not None:
        agreement = caption_agreement(
            ck,
            parity.onnx_encode(fp32),
            parity.onnx_encode(sessions[chosen.name]),
            parity.session(decoder_onnx),
            evalset.images,
            evalset.scenes,
        )
    return CpuVariantReport(fp32_speed, candidates, chosen, agreement, evalset.source, min_agreement)
