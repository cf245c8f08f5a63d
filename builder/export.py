"""Checkpoint -> ONNX: the encoder (image -> h0, c0) and one decoder step
(tokens, h, c -> log_probs, h_out, c_out), with named tensors and a dynamic batch axis.

Normalisation is NOT in the encoder graph: `captioner.preprocess.normalize` does it,
once, before the encoder (Triton's `preprocess` model, or the in-process path)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from captioner.checkpoint import Checkpoint
from captioner.model import DecoderStepExport, EncoderExport

OPSET = 17
ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["h0", "c0"]
STEP_INPUTS = ["tokens", "h", "c"]
STEP_OUTPUTS = ["log_probs", "h_out", "c_out"]


def _check(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return inferred


def export_module(
    module: torch.nn.Module,
    example: tuple,
    path: str | Path,
    inputs: list[str],
    outputs: list[str],
    opset: int = OPSET,
    strict: bool = True,
) -> Path:
    """torch module -> checked ONNX file with named tensors and a dynamic batch axis.
    `strict` adds strict shape inference (bf16 probe graphs don't pass it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
            opset_version=opset,
            dynamo=False,  # the dynamo exporter needs onnxscript, which we don't ship
        )
    if strict:
        _check(path)
    else:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_encoder(ck: Checkpoint, path: str | Path, opset: int = OPSET) -> Path:
    s = ck.preprocess.image_size
    return export_module(EncoderExport(ck.model), (torch.zeros(2, 3, s, s),), path, ENCODER_INPUTS, ENCODER_OUTPUTS, opset)


def export_decoder_step(ck: Checkpoint, path: str | Path, opset: int = OPSET) -> Path:
    u = ck.args.lstm_units
    example = (torch.zeros(2, dtype=torch.int64), torch.zeros(2, u), torch.zeros(2, u))
    return export_module(DecoderStepExport(ck.model), example, path, STEP_INPUTS, STEP_OUTPUTS, opset)
