"""`make build-engines` end to end on a small checkpoint: a complete CPU repository with
a manifest, the GPU target refused cleanly without CUDA (and built through a fake
TensorRT where a device is pretended), failures that stop the build with their exit
codes."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from fake_tensorrt import fake_tensorrt
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder import build_engines as be
from builder import parity, seed_inception
from builder import tensorrt_engine as te
from builder.repository import check_repository
from captioner.checkpoint import Checkpoint, file_sha256
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.vocab import SPECIALS, Vocabulary


def tiny_checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    vocab = Vocabulary(list(SPECIALS) + ["a", "red", "blue", "circle", "square", "above"])
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=8)
    return Checkpoint(args, PreprocessConfig(32), vocab, CaptionModel(args).eval())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_checkpoint().save(d)
    return d


def run(model_dir, tmp_path, *extra):
    repo, out = tmp_path / "repo", tmp_path / "out"
    # the split layout, whose encoder model these tests inspect (test_serving_runtime covers fused)
    rc = be.main(
        ["--model", str(model_dir), "--repo", str(repo), "--out", str(out), "--parity-scenes", "40", "--layout", "split", *extra]
    )
    return rc, repo, out


def config(repo, name) -> mc.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(te, "cuda_available", lambda: False)


def test_cpu_build_is_complete_with_a_manifest(model_dir, tmp_path, no_cuda, capsys):
    rc, repo, out = run(model_dir, tmp_path, "--target", "cpu")
    log = capsys.readouterr().out
    assert rc == 0, log
    assert "parity PASSED" in log and "greedy captions onnx == torch: 40/40" in log
    configs = check_repository(repo)
    assert configs["encoder"].max_batch_size == be.DEFAULT_MAX_BATCH
    # the served graph: the checked export with uint8 input, normalised inside (the default)
    assert (repo / "encoder" / "1" / "model.onnx").read_bytes() == (out / "encoder.uint8.onnx").read_bytes()
    manifest = json.loads((repo / be.MANIFEST).read_text())
    assert manifest["encoder_input"] == "uint8" and manifest["runtime"]["encoder"]["runtime"] in ("onnxruntime", "openvino")
    assert manifest == json.loads((out / be.MANIFEST).read_text())
    assert manifest["checkpoint"]["sha256"] == file_sha256(model_dir / "model.pt")
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "tensorrt"}
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["torch"]
    assert (manifest["target"], manifest["precision"], manifest["max_batch_size"]) == ("cpu", "fp32", 32)
    assert manifest["parity"]["passed"] and manifest["speed_only"] is False
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    for art in manifest["artifacts"].values():
        assert file_sha256(Path(art["file"])) == art["sha256"]


def test_max_batch_size_flows_from_one_flag_to_the_configs(model_dir, tmp_path, no_cuda, capsys):
    rc, repo, _ = run(model_dir, tmp_path, "--target", "cpu", "--max-batch-size", "48")
    assert rc == 0, capsys.readouterr().out
    assert config(repo, "encoder").max_batch_size == 48
    assert config(repo, "captioner").max_batch_size == 48


def test_auto_without_cuda_says_so_and_builds_cpu(model_dir, tmp_path, no_cuda, capsys):
    rc, repo, _ = run(model_dir, tmp_path, "--target", "auto")
    log = capsys.readouterr().out
    assert rc == 0
    assert "no CUDA device: TensorRT engine skipped, CPU repository built" in log
    assert config(repo, "encoder").backend == "python"


def test_gpu_without_cuda_exits_non_zero_with_the_message(model_dir, tmp_path, no_cuda, capsys):
    rc, repo, _ = run(model_dir, tmp_path, "--target", "gpu")
    log = capsys.readouterr().out
    assert rc == be.EXIT_GPU_UNMET
    assert log.rstrip().endswith("no CUDA device: TensorRT engine skipped, CPU repository built")
    check_repository(repo)


def test_gpu_build_through_tensorrt_writes_a_tensorrt_plan_model(model_dir, tmp_path, monkeypatch, capsys):
    """The GPU path with a fake TensorRT 11 and the engine's execution replaced by
    onnxruntime on the same graph: everything but the device itself."""
    trt = fake_tensorrt("11.4.0", weak_typing=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(te, "cuda_available", lambda: True)

    def open_engine(trt_mod, engine):
        sess = parity.session(tmp_path / "out" / "encoder.onnx")

        def run(feeds):
            assert len(feeds["image"]) <= 32, "the engine's profile ends at max batch"
            h0, c0 = sess.run(["h0", "c0"], feeds)
            return {"h0": h0, "c0": c0}

        return run

    monkeypatch.setattr(te, "open_engine", open_engine)
    rc, repo, out = run(model_dir, tmp_path, "--target", "gpu", "--trt-version", "11.4")
    log = capsys.readouterr().out
    assert rc == 0, log
    enc = config(repo, "encoder")
    assert enc.platform == "tensorrt_plan" and enc.max_batch_size == 32
    assert (repo / "encoder" / "1" / "model.plan").read_bytes() == b"ENGINE-11.4.0"
    assert trt.config.profiles[0].shapes["image"] == ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert (out / "tensorrt_timing.cache").is_file()
    manifest = json.loads((repo / be.MANIFEST).read_text())
    assert manifest["target"] == "gpu" and manifest["tensorrt"]["tensorrt_version"] == "11.4.0"
    assert manifest["versions"]["tensorrt"] == "11.4.0"


def test_gpu_refuses_a_tensorrt_that_does_not_match_the_target_triton(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", weak_typing=False))
    monkeypatch.setattr(te, "cuda_available", lambda: True)
    rc, repo, _ = run(model_dir, tmp_path, "--target", "gpu", "--trt-version", "10.5")
    assert rc == be.EXIT_GPU_UNMET
    assert "tensorrt 11.4.0 is installed but the target Triton needs 10.5" in capsys.readouterr().out
    assert config(repo, "encoder").backend == "python"


def test_parity_failure_stops_the_build_before_the_repository(model_dir, tmp_path, no_cuda, monkeypatch, capsys):
    import builder.export as export

    real = export.export_encoder

    def drifted_export(ck, path):
        with torch.no_grad():
            ck.model.encoder.to_state.bias += 1e-2
        try:
            return real(ck, path)
        finally:
            with torch.no_grad():
                ck.model.encoder.to_state.bias -= 1e-2

    monkeypatch.setattr(export, "export_encoder", drifted_export)
    rc, repo, _ = run(model_dir, tmp_path, "--target", "cpu")
    log = capsys.readouterr().out
    assert rc == be.EXIT_CHECK_FAILED
    assert "parity FAILED" in log and "OVER" in log
    assert not (repo / "encoder").exists()


def test_a_refused_int8_variant_writes_no_repository(model_dir, tmp_path, no_cuda, monkeypatch, capsys):
    from builder import quantize

    def low_agreement(ck, enc, dec, out_dir, evalset, **kw):
        assert len(evalset.images) == 20 and len(evalset.scenes) == 20
        int8 = quantize.Candidate("int8", enc, True, "", {1: 2.0, 32: 2.0})
        return quantize.CpuVariantReport(
            {1: 1.0, 32: 1.0}, [int8], int8, quantize.Agreement(100, 90), evalset.source, kw["min_agreement"]
        )

    monkeypatch.setattr(quantize, "build_cpu_variant", low_agreement)
    rc, repo, _ = run(
        model_dir,
        tmp_path,
        "--target",
        "cpu",
        "--precision",
        "int8",
        "--data",
        str(tmp_path / "none"),
        "--agreement-images",
        "20",
    )
    log = capsys.readouterr().out
    assert rc == be.EXIT_REFUSED
    assert "90/100 = 90.00%  REFUSED" in log and "below 98%" in log
    assert not (repo / "encoder").exists()


def test_missing_checkpoint_and_bad_arguments_are_clear(tmp_path, capsys):
    assert be.main(["--model", str(tmp_path / "nope"), "--repo", str(tmp_path / "r")]) == be.EXIT_USAGE
    assert "no checkpoint at" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        be.parse_args(["--target", "cpu", "--precision", "fp16"])
    assert e.value.code == 2


def test_flags_default_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAPTIONER_TARGET", "cpu")
    monkeypatch.setenv("CAPTIONER_PRECISION", "int8")
    monkeypatch.setenv("CAPTIONER_MAX_BATCH", "64")
    a = be.parse_args([])
    assert (a.target, a.precision, a.max_batch_size) == ("cpu", "int8", 64)
    assert be.parse_args(["--max-batch-size", "16"]).max_batch_size == 16


def test_seed_inception_name_resolves_to_its_generated_checkpoint(model_dir, monkeypatch):
    monkeypatch.setattr(seed_inception, "ensure", lambda: model_dir)
    path, name = be.resolve_model("seed-inception")
    assert (path, name) == (model_dir / "model.pt", "seed-inception")
    assert be.resolve_model(str(model_dir)) == (model_dir / "model.pt", model_dir.name)
