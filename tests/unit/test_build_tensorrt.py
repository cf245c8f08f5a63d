"""The TensorRT path up to the CUDA device: it refuses cleanly without CUDA, detects the
10.x / 11.x API, and drives the builder as TensorRT needs (strong typing, one profile
1 / 8 / max batch, timing cache on disk). The builder is a fake `tensorrt` module with
only the API surface the code calls; the one thing not run here is executing the
engine on a GPU (`open_engine`), which the orchestration tests replace."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from fake_tensorrt import fake_tensorrt

from builder import parity
from builder import tensorrt_engine as te
from builder.export import export_encoder
from builder.quantize import convert_fp16
from captioner.checkpoint import Checkpoint
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.vocab import SPECIALS, Vocabulary


@pytest.fixture(scope="module")
def ck():
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIALS) + ["a", "red", "circle"])
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=6)
    return Checkpoint(args, PreprocessConfig(32), vocab, CaptionModel(args).eval())


@pytest.fixture(scope="module")
def encoder_onnx(ck, tmp_path_factory):
    return export_encoder(ck, tmp_path_factory.mktemp("trt") / "encoder.onnx")


def test_refuses_without_cuda_before_touching_tensorrt(ck, tmp_path, monkeypatch):
    monkeypatch.setattr(te, "cuda_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it would raise ImportError
    asked = []
    with pytest.raises(te.NoCudaDevice) as e:
        te.build_encoder_plan(ck, lambda kind: asked.append(kind), tmp_path, 32, "fp32")
    assert str(e.value) == "no CUDA device: TensorRT engine skipped, CPU repository built"
    assert asked == [] and list(tmp_path.iterdir()) == []


def test_missing_tensorrt_package_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(te.TensorRTMissing, match="tensorrt Python package is not installed"):
        te.import_tensorrt()


def test_version_guard_refuses_a_tensorrt_the_target_triton_lacks(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.1", weak_typing=False))
    with pytest.raises(te.EngineUnavailable, match="needs 10.5"):
        te.import_tensorrt("10.5")
    assert te.import_tensorrt("11.4").__version__ == "11.4.0.1"
    assert te.import_tensorrt(None).__version__ == "11.4.0.1"


def test_detects_which_precision_api_is_present():
    v10 = te.detect_api(fake_tensorrt("10.5.0", weak_typing=True))
    v11 = te.detect_api(fake_tensorrt("11.4.0", weak_typing=False))
    assert (v10.major, v10.weak_typing) == (10, True)
    assert (v11.major, v11.weak_typing) == (11, False)
    # 10.x: fp16 by builder flag on the fp32 graph. 11.x: an fp16 graph, strongly typed.
    assert te.recipe_for(v10, "fp16") == te.BuildRecipe("fp16", "fp32", False, ("FP16",))
    assert te.recipe_for(v11, "fp16") == te.BuildRecipe("fp16", "fp16", True, ())
    for api in (v10, v11):
        assert te.recipe_for(api, "fp32") == te.BuildRecipe("fp32", "fp32", True, ())
        assert te.recipe_for(api, "int8") == te.BuildRecipe("int8", "int8_qdq", True, ())
    with pytest.raises(ValueError):
        te.recipe_for(v11, "int4")


@pytest.mark.parametrize("version,weak", [("10.5.0", True), ("11.4.0", False)])
def test_build_engine_strongly_typed_profile_and_timing_cache(encoder_onnx, tmp_path, version, weak):
    trt = fake_tensorrt(version, weak)
    api = te.detect_api(trt)
    cache = tmp_path / "timing.cache"
    engine = te.build_engine(trt, encoder_onnx, te.recipe_for(api, "fp32"), 32, cache, log=lambda m: None)
    assert engine == b"ENGINE-" + version.encode()
    assert trt.network.flags == 1 << 1  # STRONGLY_TYPED
    (profile,) = trt.config.profiles
    assert profile.shapes == {"image": ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}
    assert trt.config.cleared == {trt.BuilderFlag.TF32} and trt.config.flags == set()
    assert cache.read_bytes() == b"|timings"
    # A second build starts from the cache the first one left on disk.
    te.build_engine(trt, encoder_onnx, te.recipe_for(api, "fp32"), 32, cache, log=lambda m: None)
    assert [c for c in trt.calls if c[0] == "create_timing_cache"][-1] == ("create_timing_cache", b"|timings")


def test_fp16_on_10x_uses_the_builder_flag_on_a_weakly_typed_network(encoder_onnx, tmp_path):
    trt = fake_tensorrt("10.5.0", weak_typing=True)
    recipe = te.recipe_for(te.detect_api(trt), "fp16")
    te.build_engine(trt, encoder_onnx, recipe, 16, tmp_path / "c", log=lambda m: None)
    assert trt.network.flags == 0 and trt.config.flags == {trt.BuilderFlag.FP16}
    assert trt.config.cleared == set()
    assert trt.config.profiles[0].shapes["image"][2][0] == 16


def test_build_errors_are_reported_with_the_parser_message(encoder_onnx, tmp_path):
    bad = fake_tensorrt("11.4.0", False, parse_error="In node 3 (Conv): unsupported")
    with pytest.raises(te.EngineBuildError, match="In node 3"):
        te.build_engine(bad, encoder_onnx, te.BuildRecipe("fp32", "fp32", True), 32, tmp_path / "c")
    failing = fake_tensorrt("11.4.0", False, build_fails=True)
    with pytest.raises(te.EngineBuildError, match="failed to build"):
        te.build_engine(failing, encoder_onnx, te.BuildRecipe("fp32", "fp32", True), 32, tmp_path / "c", log=lambda m: None)
    assert not (tmp_path / "c").exists(), "a failed build must not leave a timing cache claiming success"


def test_fp16_graph_for_11x_computes_in_fp16_with_float32_io(ck, encoder_onnx, tmp_path):
    path = convert_fp16(encoder_onnx, tmp_path / "encoder.fp16.onnx")
    model = onnx.load(str(path))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [t.type.tensor_type.elem_type for t in model.graph.input] == [f32]
    assert [t.type.tensor_type.elem_type for t in model.graph.output] == [f32, f32]
    assert {i.data_type for i in model.graph.initializer} == {f16}
    x = parity.random_images(2, ck.preprocess)
    h16, _ = parity.onnx_encode(parity.session(path))(x)
    h32, _ = parity.torch_encode(ck)(x)
    assert 0 < np.abs(h16 - h32).max() < te.ENGINE_TOLERANCE["fp16"] * max(1.0, np.abs(h32).max())


@pytest.mark.parametrize("version,weak,kind", [("10.5.0", True, "fp32"), ("11.4.0", False, "fp16")])
def test_encoder_plan_orchestration_with_a_fake_gpu(ck, encoder_onnx, tmp_path, monkeypatch, version, weak, kind):
    """Everything build_encoder_plan does, with `open_engine` (execution on the GPU)
    replaced by onnxruntime on the same graph plus a configurable error."""
    trt = fake_tensorrt(version, weak)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(te, "cuda_available", lambda: True)
    error = {"value": 0.0}
    made = {}

    def onnx_for(k):
        made[k] = encoder_onnx if k == "fp32" else convert_fp16(encoder_onnx, tmp_path / "encoder.fp16.onnx")
        return made[k]

    def open_engine(trt_mod, engine):
        assert trt_mod is trt and engine == b"ENGINE-" + version.encode()
        sess = parity.session(made[kind])

        def run(feeds):
            assert len(feeds["image"]) <= 16, "the engine's profile ends at max batch"
            h0, c0 = sess.run(["h0", "c0"], feeds)
            return {"h0": h0 + error["value"], "c0": c0}

        return run

    monkeypatch.setattr(te, "open_engine", open_engine)
    precision = "fp32" if kind == "fp32" else "fp16"
    result = te.build_encoder_plan(ck, onnx_for, tmp_path, 16, precision, expected_version=version[:4], log=lambda m: None)
    assert list(made) == [kind]
    assert result.plan_path.read_bytes() == b"ENGINE-" + version.encode()
    assert result.passed and {d.batch for d in result.diffs} == {1, 7, 16}
    h0, _ = result.encode(parity.random_images(40, ck.preprocess))  # more rows than the profile's max
    assert h0.shape == (40, ck.args.lstm_units)
    assert (tmp_path / "tensorrt_timing.cache").is_file()
    assert result.to_dict()["tensorrt_version"] == version

    error["value"] = 0.5  # an engine that computes something else is caught
    bad = te.build_encoder_plan(ck, onnx_for, tmp_path, 16, precision, log=lambda m: None)
    assert not bad.passed
