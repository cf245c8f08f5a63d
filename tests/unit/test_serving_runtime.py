"""CPU runtimes (captioner.serving.runtime): settings from config.pbtxt, the build-time
choice, OpenVINO's numerics against onnxruntime and torch on the shipped default model,
the compiled-model cache, the uint8-input encoder graph, and the caption-agreement gate
of the OpenVINO bf16 / int8 builds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder import build_engines as be
from builder import parity
from builder import tensorrt_engine as te
from builder.export import export_decoder_step, export_encoder
from builder.runtime_choice import warm_cache
from builder.uint8_input import with_uint8_input
from captioner import checkpoint as ckpt_mod
from captioner.preprocess import normalize
from captioner.serving import runtime as rt

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "default"
needs_openvino = pytest.mark.skipif(rt.openvino_version() is None, reason="openvino is not installed")
needs_default = pytest.mark.skipif(not (DEFAULT / ckpt_mod.FILENAME).is_file(), reason="models/default is not there")


# --- settings and the choice (no runtime needed) ---------------------------------------


def test_settings_come_from_config_parameters_and_the_cache_follows_the_model(tmp_path):
    s = rt.EngineSettings.from_config(
        {"runtime": "openvino", "intra_op_threads": "2", "inference_precision": "bf16"}, tmp_path / "1"
    )
    assert (s.runtime, s.threads, s.inference_precision) == ("openvino", 2, "bf16")
    assert s.cache_dir == str(tmp_path / "1" / rt.CACHE_DIRNAME)
    assert rt.EngineSettings.from_config(s.config_parameters(), tmp_path / "1") == s
    assert rt.EngineSettings.from_config({"cache_dir": "/var/cache/x"}, tmp_path).cache_dir == "/var/cache/x"
    assert rt.EngineSettings.from_config({}) == rt.EngineSettings()  # the old configs: onnxruntime, 1 thread


@pytest.mark.parametrize(
    "bad",
    [
        dict(runtime="tensorrt"),
        dict(inference_precision="fp16"),
        dict(threads=0),
        dict(runtime="onnxruntime", inference_precision="bf16"),
    ],
)
def test_settings_refuse_what_no_runtime_does(bad):
    with pytest.raises(ValueError):
        rt.EngineSettings(**bad)


def test_auto_picks_the_faster_runtime_and_ties_keep_onnxruntime():
    assert rt.choose("auto", {"onnxruntime": 30.0, "openvino": 60.0}).runtime == "openvino"
    assert rt.choose("auto", {"onnxruntime": 60.0, "openvino": 30.0}).runtime == "onnxruntime"
    tie = rt.choose("auto", {"onnxruntime": 100.0, "openvino": 104.0}, margin=1.05)
    assert tie.runtime == "onnxruntime" and "1.05" not in tie.reason
    assert rt.choose("auto", {"onnxruntime": None, "openvino": 5.0}).runtime == "openvino"
    c = rt.choose("openvino", {"onnxruntime": 60.0, "openvino": 30.0})
    assert c.runtime == "openvino" and c.reason == "requested"  # an explicit RUNTIME is obeyed
    with pytest.raises(rt.RuntimeUnavailable):
        rt.choose("openvino", {"openvino": None})
    with pytest.raises(rt.RuntimeUnavailable):
        rt.choose("auto", {"onnxruntime": None, "openvino": None})
    with pytest.raises(ValueError):
        rt.choose("tensorrt", {})


def test_layout_auto_runs_small_encoders_whole_and_fuses_large_ones():
    from builder.runtime_choice import RuntimeReport, auto_layout

    def report(rate):
        return RuntimeReport(rt.Choice("openvino", "x", {"openvino": rate}), rt.Choice("onnxruntime", "x", {}), "fp32")

    assert auto_layout(report(4000.0))[0] == "whole"  # the default model: one hop, one batcher
    assert auto_layout(report(140.0))[0] == auto_layout(report(36.0))[0] == "fused"  # seed int8, fp32
    assert auto_layout(report(36.0), fuse_above=50.0)[0] == "split"  # the thresholds stay knobs
    assert auto_layout(report(4000.0), whole_above=5000.0)[0] == "fused"
    no_rate = RuntimeReport(rt.Choice("openvino", "x", {}), rt.Choice("onnxruntime", "x", {}), "fp32")
    assert auto_layout(no_rate) == ("split", "encoder rate not measured: split")


def test_bf16_needs_the_cpu_instructions():
    assert rt.cpu_has_bf16({"avx512f", "avx512_bf16"}) and rt.cpu_has_bf16({"amx_bf16"})
    assert not rt.cpu_has_bf16({"avx512f", "avx512_vnni", "avx2"})


# --- numerics on the shipped model --------------------------------------------------------


@pytest.fixture(scope="module")
def default_graphs(tmp_path_factory):
    if not (DEFAULT / ckpt_mod.FILENAME).is_file():
        pytest.skip("models/default is not there")
    d = tmp_path_factory.mktemp("graphs")
    ck = ckpt_mod.load(DEFAULT)
    return ck, export_encoder(ck, d / "encoder.onnx"), export_decoder_step(ck, d / "decoder_step.onnx")


@needs_openvino
@needs_default
def test_openvino_fp32_matches_onnxruntime_and_torch_on_the_default_model(default_graphs):
    ck, enc, dec = default_graphs
    images, _ = parity.scene_batch(24, ck.preprocess, seed=3)
    x = normalize(images, ck.preprocess)
    ov = rt.load(enc, rt.EngineSettings(runtime="openvino", threads=2))
    ort = rt.load(enc, rt.EngineSettings())
    with torch.inference_mode():
        ref = [t.numpy() for t in ck.model.encoder(torch.from_numpy(x))]
    for got in (ov.run(["h0", "c0"], {"image": x}), ort.run(["h0", "c0"], {"image": x})):
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, atol=1e-4 * max(1.0, float(np.abs(r).max())))
    # the decoder step, and what a user sees: identical greedy captions through both runtimes
    ov_step, ort_step = (rt.load(dec, rt.EngineSettings(runtime=r)) for r in ("openvino", "onnxruntime"))
    feed = {"tokens": np.arange(8, dtype=np.int64) % len(ck.vocab), "h": ref[0][:8], "c": ref[1][:8]}
    for a, b in zip(ov_step.run(None, feed), ort_step.run(None, feed)):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())))
    from captioner.decoding import onnx_step

    ov_caps = parity.greedy_tokens(ck, parity.onnx_encode(ov), onnx_step(ov_step), images)
    ort_caps = parity.greedy_tokens(ck, parity.onnx_encode(ort), onnx_step(ort_step), images)
    assert ov_caps == ort_caps


@needs_openvino
@needs_default
def test_uint8_graph_normalises_like_the_float_graph_in_both_runtimes(default_graphs, tmp_path):
    ck, enc, _ = default_graphs
    u8 = with_uint8_input(enc, tmp_path / "encoder.uint8.onnx", ck.preprocess)
    images, _ = parity.scene_batch(6, ck.preprocess, seed=4)
    for runtime in rt.RUNTIMES:
        settings = rt.EngineSettings(runtime=runtime)
        want = rt.load(enc, settings).run(["h0", "c0"], {"image": normalize(images, ck.preprocess)})
        engine = rt.load(u8, settings)
        assert rt.input_dtype(engine, "image") == np.uint8
        got = engine.run(["h0", "c0"], {"image": images})
        for w, g in zip(want, got):
            if runtime == "onnxruntime":
                np.testing.assert_array_equal(g, w)  # same kernels, same input bits
            else:  # OpenVINO fuses the normalisation into the first convolution: rounding differs
                np.testing.assert_allclose(g, w, atol=1e-4 * max(1.0, float(np.abs(w).max())))
    with pytest.raises(ValueError, match="not float32"):
        with_uint8_input(u8, tmp_path / "twice.onnx", ck.preprocess)


@needs_openvino
@needs_default
def test_compiled_models_are_cached_on_disk_and_a_second_start_loads_them(default_graphs, tmp_path):
    ck, enc, _ = default_graphs
    settings = rt.EngineSettings(runtime="openvino", threads=1, cache_dir=str(tmp_path / "cache"))
    first = rt.load(enc, settings)
    assert not first.loaded_from_cache and any((tmp_path / "cache").iterdir())
    second = rt.load(enc, settings)
    assert second.loaded_from_cache
    s = ck.preprocess.image_size
    x = normalize(parity.scene_batch(2, ck.preprocess, seed=6)[0], ck.preprocess)
    assert x.shape == (2, 3, s, s)
    np.testing.assert_array_equal(first.run(None, {"image": x})[0], second.run(None, {"image": x})[0])


@needs_openvino
@needs_default
def test_a_read_only_repository_cache_is_copied_to_a_writable_folder_and_still_loads(default_graphs, tmp_path, monkeypatch):
    """A repository mounted read-only elsewhere (pods, images): the build's blobs are loaded
    from a writable copy ($CAPTIONER_OPENVINO_CACHE), and what a miss compiles is stored there."""
    _, enc, _ = default_graphs
    repo_cache = tmp_path / "repo" / "1" / rt.CACHE_DIRNAME
    rt.load(enc, rt.EngineSettings(runtime="openvino", threads=1, cache_dir=str(repo_cache)))  # the build's warm-up
    blobs = sorted(p.name for p in repo_cache.iterdir())
    # Readable by all: an image copies the repository and uid 1000 reads it (OpenVINO writes 0440).
    assert blobs and all(p.stat().st_mode & 0o444 == 0o444 for p in repo_cache.iterdir())
    writable = tmp_path / "writable"
    monkeypatch.setenv(rt.CACHE_ENV, str(writable))
    real_access = os.access
    # Root may write anywhere whatever the mode bits: the read-only mount is stood in for here.
    monkeypatch.setattr(rt.os, "access", lambda p, mode: False if Path(p) == repo_cache else real_access(p, mode))
    mounted = tmp_path / "mnt" / "model.onnx"  # the graph where the pod mounts the repository
    mounted.parent.mkdir()
    mounted.write_bytes(Path(enc).read_bytes())
    engine = rt.load(mounted, rt.EngineSettings(runtime="openvino", threads=1, cache_dir=str(repo_cache)))
    assert engine.cache_dir == str(writable) and engine.loaded_from_cache
    assert sorted(p.name for p in writable.iterdir()) == blobs
    assert sorted(p.name for p in repo_cache.iterdir()) == blobs  # nothing written to the repository

    empty = tmp_path / "other" / "1" / rt.CACHE_DIRNAME  # a cache miss: compiled and stored in the copy
    empty.mkdir(parents=True)
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "fresh"))
    monkeypatch.setattr(rt.os, "access", lambda p, mode: False if Path(p) == empty else real_access(p, mode))
    miss = rt.load(enc, rt.EngineSettings(runtime="openvino", threads=1, cache_dir=str(empty)))
    assert not miss.loaded_from_cache and any((tmp_path / "fresh").iterdir()) and not any(empty.iterdir())


# --- the build: RUNTIME, the gate, the warmed cache ----------------------------------------


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(te, "cuda_available", lambda: False)


def _build(tmp_path, *extra):
    repo, out = tmp_path / "repo", tmp_path / "out"
    rc = be.main(
        [
            "--model",
            str(DEFAULT),
            "--target",
            "cpu",
            "--repo",
            str(repo),
            "--out",
            str(out),
            "--parity-scenes",
            "8",
            "--agreement-images",
            "200",
            "--data",
            str(tmp_path / "no-data"),
            *extra,
        ]
    )
    manifest = json.loads((repo / be.MANIFEST).read_text()) if (repo / be.MANIFEST).is_file() else None
    return rc, repo, manifest


def _params(repo, name):
    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}


@needs_openvino
@needs_default
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_openvino_reduced_precision_builds_pass_the_caption_gate(tmp_path, no_cuda, precision):
    if precision == "bf16" and not rt.cpu_has_bf16():
        rc, _, _ = _build(tmp_path, "--precision", "bf16", "--runtime", "openvino")
        assert rc == be.EXIT_REFUSED
        return
    rc, repo, manifest = _build(tmp_path, "--precision", precision, "--runtime", "openvino", "--layout", "split")
    assert rc == 0
    gate = manifest["runtime"]["agreement"]
    assert gate["variant"] == f"OpenVINO {precision}" and gate["total"] == 200
    assert gate["share"] >= 0.98 and gate["accepted"]
    assert gate["variant_correct"] >= gate["fp32_correct"] - 0.02  # the spec's correctness does not drop
    enc = _params(repo, "encoder")
    assert enc["runtime"] == "openvino" and enc["precision"] == precision
    assert enc["inference_precision"] == ("bf16" if precision == "bf16" else "fp32")
    # the build compiled the served graph into the repository's cache
    assert manifest["openvino_cache_warmed"] == ["encoder", "decoder_step", "caption_generator"]  # RUNTIME=openvino: all
    assert any((repo / "encoder" / "1" / rt.CACHE_DIRNAME).iterdir())
    assert manifest["versions"]["openvino"] == rt.openvino_version()


@needs_openvino
@needs_default
def test_auto_records_both_runtimes_figures_and_onnxruntime_refuses_bf16(tmp_path, no_cuda):
    rc, repo, manifest = _build(tmp_path, "--runtime", "auto")
    assert rc == 0
    choice = manifest["runtime"]["encoder"]
    assert set(choice["rows_per_s"]) == {"onnxruntime", "openvino"} and all(v > 0 for v in choice["rows_per_s"].values())
    fastest = max(choice["rows_per_s"], key=choice["rows_per_s"].get)
    assert choice["runtime"] in (fastest, "onnxruntime")  # onnxruntime keeps a near-tie
    # LAYOUT=auto: the small default encoder runs thousands of images/s, so decode, encoder
    # and the caption loop share one model
    assert manifest["layout"] == "whole" and not (repo / "encoder").exists() and not (repo / "caption_generator").exists()
    assert _params(repo, "preprocess")["runtime"] == choice["runtime"]
    assert _params(repo, "preprocess")["step_runtime"] == manifest["runtime"]["decoder_step"]["runtime"]
    assert manifest["encoder_input"] == "uint8" and _params(repo, "preprocess")["output_type"] == "uint8"
    assert warm_cache(repo) == (["preprocess"] if choice["runtime"] == "openvino" else [])
    with pytest.raises(SystemExit):
        be.parse_args(["--precision", "bf16", "--runtime", "onnxruntime"])


# --- the fused layout: decode + encoder in one model ------------------------------------------


def test_image_encoder_runs_every_good_image_of_the_batch_once_and_refuses_the_bad_alone():
    from captioner.preprocess import PreprocessConfig
    from captioner.scenes import encoded_scenes
    from captioner.serving import Rejected
    from captioner.serving.preprocess import ImageEncoder, Limits, Preprocessor

    calls = []

    class Engine:  # h0 = per-image pixel sum, c0 = its negation: easy to trace back to a request
        def run(self, outputs, feed):
            x = feed["image"]
            calls.append(x.shape)
            s = x.reshape(len(x), -1).sum(axis=1, dtype=np.float64)[:, None].astype(np.float32)
            return [s, -s]

    cfg = PreprocessConfig(16)
    enc = ImageEncoder(Preprocessor(cfg, Limits(), normalise=False), Engine())
    good = [np.array([[d]], dtype=object) for d, _ in encoded_scenes(3, 9)]
    bad = np.array([[b"junk"]], dtype=object)
    out = enc.run([good[0], bad, np.concatenate([good[1], good[2]])])
    assert calls == [(3, 16, 16, 3)]  # one engine run, uint8 HWC, the bad request left out
    assert isinstance(out[1], Rejected) and out[1].reason == "not_an_image"
    assert out[0][0].shape == (1, 1) and out[2][0].shape == (2, 1)
    np.testing.assert_array_equal(out[2][1], -out[2][0])


@needs_default
def test_fused_repository_has_no_encoder_model_and_checks_its_absence(default_graphs, tmp_path):
    from builder.repository import RepositoryError, assemble, check_repository

    ck, enc, dec = default_graphs
    u8 = with_uint8_input(enc, tmp_path / "encoder.uint8.onnx", ck.preprocess)
    repo = assemble(
        ck, tmp_path / "repo", "cpu", {"encoder_onnx": u8, "decoder_onnx": dec}, encoder_input="uint8", layout="fused"
    )
    configs = check_repository(repo)
    assert "encoder" not in configs
    steps = [s.model_name for s in configs["captioner"].ensemble_scheduling.step]
    assert steps == ["preprocess", "caption_generator"]
    assert [o.name for o in configs["preprocess"].output] == ["h0", "c0"]
    (repo / "encoder").mkdir()
    (repo / "encoder" / "config.pbtxt").write_text('name: "encoder"')
    with pytest.raises(RepositoryError, match="no encoder model"):
        check_repository(repo)
    with pytest.raises(ValueError):
        assemble(ck, tmp_path / "gpu", "gpu", {"encoder_onnx": u8, "decoder_onnx": dec}, layout="fused")
    with pytest.raises(RepositoryError, match="UINT8"):  # a float graph where uint8 is declared
        assemble(ck, tmp_path / "r2", "cpu", {"encoder_onnx": enc, "decoder_onnx": dec}, encoder_input="uint8")
