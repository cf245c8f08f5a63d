"""The reduced-precision CPU encoder: a real static int8 Q/DQ graph (per-channel
weights, dense head kept fp32), symmetric for TensorRT, timed against fp32, and on the
trained model the build serves it only when its greedy captions agree with fp32's on at
least 98% of scenes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from builder import parity, quantize
from builder.export import export_decoder_step, export_encoder
from captioner import checkpoint
from captioner.checkpoint import Checkpoint
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.vocab import SPECIALS, Vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIALS) + ["a", "red", "blue", "circle", "square"])
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=6)
    ck = Checkpoint(args, PreprocessConfig(32), vocab, CaptionModel(args).eval())
    d = tmp_path_factory.mktemp("quant_tiny")
    return ck, export_encoder(ck, d / "encoder.onnx"), export_decoder_step(ck, d / "decoder_step.onnx"), d


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_graph_is_static_qdq_with_per_channel_weights(tiny, symmetric):
    ck, enc, _, d = tiny
    out = quantize.quantize_int8(
        enc, d / f"int8_{symmetric}.onnx", quantize.calibration_images(ck, 16), symmetric_activations=symmetric
    )
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = _initializers(model)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    per_channel = 0
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights:
            scale = inits[n.input[1]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            assert axis == 0 and scale.ndim == 1 and len(scale) > 1
            per_channel += 1
    assert per_channel == 4  # every conv of the tiny backbone
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    for g in gemms:  # the dense head stays fp32: float weights straight from the initializers
        assert g.input[1] not in dequantized and inits[g.input[1]].dtype == np.float32
    act_zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert act_zero_points
    for zp in act_zero_points:
        if symmetric:  # what TensorRT's explicit quantization requires
            assert zp.dtype == np.int8 and not zp.any()
        else:
            assert zp.dtype == np.uint8


def test_cpu_variant_is_timed_against_fp32_and_checked_for_agreement(tiny):
    ck, enc, dec, d = tiny
    images, drawn = parity.scene_batch(24, ck.preprocess, seed=11)
    report = quantize.build_cpu_variant(
        ck,
        enc,
        dec,
        d / "variant",
        quantize.EvalSet(images, "24 scenes", drawn),
        batch_sizes=(1, 8),
        calibration_scenes=16,
        log=lambda m: None,
    )
    assert set(report.fp32_images_per_s) == {1, 8} and min(report.fp32_images_per_s.values()) > 0
    names = {c.name: c for c in report.candidates}
    assert set(names) == {"int8", "bf16"}
    assert names["int8"].runs and min(names["int8"].images_per_s.values()) > 0
    assert names["bf16"].runs or names["bf16"].note  # either timed or the reason it cannot run
    runnable = [c for c in report.candidates if c.runs]
    assert report.chosen is max(runnable, key=lambda c: c.images_per_s[8])
    assert report.agreement.total == 24
    assert 0.0 <= report.agreement.fp32_correct <= 1.0 and 0.0 <= report.agreement.variant_correct <= 1.0
    assert report.accepted == (report.agreement.share >= 0.98)
    text = "\n".join(report.lines())
    assert "fp32:" in text and "img/s at batch 8" in text and "greedy captions" in text


def trained_dir_or_skip() -> Path:
    for where in (checkpoint.DEFAULT_MODEL_DIR, Path("runs/default")):
        if (where / checkpoint.FILENAME).is_file():
            return where
    pytest.skip("no trained checkpoint (models/default or runs/default)")


def test_int8_build_follows_the_agreement_rule_on_the_trained_model(tmp_path, capsys, monkeypatch):
    """PRECISION=int8 on the trained model: the agreement with fp32 is measured and the
    variant is served only at >= 98%; below that the build refuses and writes nothing."""
    from builder import build_engines as be
    from builder import tensorrt_engine as te
    from builder.repository import check_repository

    monkeypatch.setattr(te, "cuda_available", lambda: False)
    repo = tmp_path / "repo"
    rc = be.main(
        [
            "--model",
            str(trained_dir_or_skip()),
            "--target",
            "cpu",
            "--precision",
            "int8",
            "--repo",
            str(repo),
            "--out",
            str(tmp_path / "out"),
            "--parity-scenes",
            "20",
            "--data",
            str(tmp_path / "no-data"),
            "--agreement-images",
            "400",
        ]
    )
    log = capsys.readouterr().out
    m = re.search(r"greedy captions int8 == fp32 on .*: (\d+)/(\d+) = [\d.]+%  (accepted|REFUSED)", log)
    assert m, log
    agree, total, verdict = int(m[1]), int(m[2]), m[3]
    print(f"int8 == fp32 greedy captions: {agree}/{total} ({verdict})")
    assert total == 400
    assert agree / total > 0.9, "int8 this far from fp32 means the quantization is broken, not borderline"
    if agree / total >= quantize.MIN_AGREEMENT:
        assert rc == 0 and verdict == "accepted"
        check_repository(repo)
        # the encoder graph lives in `encoder`, or in `preprocess` in the fused layout
        served_by = "encoder" if (repo / "encoder").exists() else "preprocess"
        served = onnx.load(str(repo / served_by / "1" / "model.onnx"))
        assert any(n.op_type == "QuantizeLinear" for n in served.graph.node)
    else:
        assert rc == be.EXIT_REFUSED and verdict == "REFUSED"
        assert not (repo / "encoder").exists()
