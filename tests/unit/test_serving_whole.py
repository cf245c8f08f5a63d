"""The whole CPU layout (LAYOUT=whole): one Python model, `preprocess`, runs decode, the
encoder and the batched decode loop. Its generated configs and files, and its model.py
against the fake pb_utils on a real assembled repository (the tiny checkpoint)."""

import fake_pb_utils
import numpy as np
import pytest
from fake_pb_utils import outputs, request
from google.protobuf import text_format
from serving_support import image_request as _image
from serving_support import initialize, load_model_py, scene_png, tiny_checkpoint
from serving_support import torch_reference as _reference
from tritonclient.grpc import model_config_pb2 as mc

from builder import capacity, shm
from builder.export import export_decoder_step, export_encoder
from builder.repository import RepositoryError, assemble, check_repository
from captioner import checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    ck = checkpoint.load(tiny_checkpoint(d / "ck"))
    art = {"encoder_onnx": export_encoder(ck, d / "enc.onnx"), "decoder_onnx": export_decoder_step(ck, d / "dec.onnx")}
    repo = assemble(ck, d / "repo", "cpu", art, max_batch_size=24, layout="whole", ort_threads={"caption_generator": 2})
    return ck, art, repo


@pytest.fixture
def pb():
    return fake_pb_utils.make_module()


def _configs(repo):
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.glob("*/config.pbtxt")}


# --- the configs ------------------------------------------------------------------------------


def test_whole_repository_is_one_python_model_behind_the_unchanged_ensemble(built):
    ck, _, repo = built
    cfg = _configs(repo)
    assert set(cfg) == {"preprocess", "captioner"}
    assert set(check_repository(repo)) == {"preprocess", "captioner"}
    pre, ens = cfg["preprocess"], cfg["captioner"]
    assert pre.backend == "python" and pre.max_batch_size == 24 and pre.instance_group[0].count == 2
    assert [(t.name, t.data_type, list(t.dims)) for t in pre.input] == [("IMAGE", mc.TYPE_STRING, [1])]
    wire = [("CAPTION", mc.TYPE_STRING, [1]), ("SCORE", mc.TYPE_FP32, [1]), ("MODEL_VERSION", mc.TYPE_STRING, [1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in pre.output] == wire
    assert [(t.name, t.data_type, list(t.dims)) for t in ens.output] == wire  # clients see no change
    assert [t.name for t in ens.input] == ["IMAGE"]
    (step,) = ens.ensemble_scheduling.step
    assert (step.model_name, step.model_version) == ("preprocess", 1)
    assert dict(step.input_map) == {"IMAGE": "IMAGE"}
    assert dict(step.output_map) == {n: n for n in ("CAPTION", "SCORE", "MODEL_VERSION")}
    p = {k: v.string_value for k, v in pre.parameters.items()}
    assert p["fused_encoder"] == p["fused_generator"] == "1"
    assert p["checkpoint_sha256"] == ck.sha256 and p["max_length"] == str(ck.args.max_length)
    assert (p["intra_op_threads"], p["runtime"]) == ("2", "onnxruntime")  # the encoder's
    assert (p["step_intra_op_threads"], p["step_runtime"]) == ("2", "onnxruntime")  # the decoder step's
    assert ens.parameters["layout"].string_value == "whole"
    # load shedding stays on the front queue, and warmup covers batch 1 and the max batch
    assert pre.dynamic_batching.default_queue_policy.max_queue_size == 4 * 24
    assert [w.batch_size for w in pre.model_warmup] == [1, 24]
    for f in ("model.py", "model.onnx", "decoder_step.onnx", "vocab.json", "preprocess.json"):
        assert (repo / "preprocess" / "1" / f).is_file(), f
    assert "WholeCaptioner" in (repo / "preprocess" / "1" / "model.py").read_text()
    assert shm.repository_limits(repo).layout == "whole"
    assert shm.repository_limits(repo).python_instances == 2


def test_whole_repository_refuses_leftover_models_and_wrong_choices(built, tmp_path):
    ck, art, repo = built
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    (copy / "caption_generator").mkdir()
    (copy / "caption_generator" / "config.pbtxt").write_text('name: "caption_generator"')
    with pytest.raises(RepositoryError, match="whole layout.*no caption_generator model"):
        check_repository(copy)
    (copy / "caption_generator" / "config.pbtxt").unlink()
    (copy / "preprocess" / "1" / "decoder_step.onnx").unlink()
    with pytest.raises(RepositoryError, match="decoder_step.onnx"):
        check_repository(copy)
    with pytest.raises(ValueError, match="fused and whole on cpu only"):
        assemble(ck, tmp_path / "gpu", "gpu", {**art, "encoder_plan": art["encoder_onnx"]}, layout="whole")
    with pytest.raises(ValueError, match="step_mode must be inprocess"):
        assemble(ck, tmp_path / "bls", "cpu", art, layout="whole", step_mode="bls")
    # assembled over a split repository: no stale encoder, decoder_step or generator left behind
    swap = assemble(ck, tmp_path / "swap", "cpu", art, layout="split")
    assemble(ck, swap, "cpu", art, layout="whole")
    assert set(_configs(swap)) == {"preprocess", "captioner"}


def test_whole_load_shedding_lines_name_the_one_model():
    lines = capacity.describe(capacity.policies(None, 32, fused=True), fused=True, whole=True)
    assert len(lines) == 1 and lines[0].startswith("preprocess (runs the encoder and the caption loop): max_queue_size 128")


# --- model.py and captioner.serving.whole -------------------------------------------------------


def test_a_batch_is_captioned_like_the_reference_with_one_encoder_run(built, pb):
    ck, _, repo = built
    model = initialize(load_model_py("whole", pb), repo, "preprocess")
    runs = []
    engine = model.captioner.encoder.engine
    real_run = engine.run
    engine.run = lambda names, feed: runs.append(feed["image"].shape[0]) or real_run(names, feed)
    images = [scene_png(i) for i in range(5)]
    reqs = [request(_image(images[0])), request(_image(images[1], images[2]), {"beam_size": 3}), request(_image(*images[3:]))]
    got = [outputs(r) for r in model.execute(reqs)]
    assert runs == [5]  # every image of the batch through the encoder at once
    greedy = _reference(ck, [images[0], images[3], images[4]])
    beam = _reference(ck, images[1:3], beam_size=3)
    assert [c.decode() for c in got[0]["CAPTION"][:, 0]] == greedy[0][:1]
    assert [c.decode() for c in got[2]["CAPTION"][:, 0]] == greedy[0][1:]
    assert [c.decode() for c in got[1]["CAPTION"][:, 0]] == beam[0]
    np.testing.assert_allclose(got[1]["SCORE"][:, 0], beam[1], atol=1e-4)
    assert got[1]["CAPTION"].shape == (2, 1) and got[1]["SCORE"].dtype == np.float32
    assert [[v.decode() for v in g["MODEL_VERSION"][:, 0]] for g in got] == [[f"1:{ck.sha256[:8]}"] * n for n in (1, 2, 2)]


def test_bad_requests_fail_alone_with_the_other_layouts_messages_and_metrics(built, pb):
    ck, _, repo = built
    model = initialize(load_model_py("whole", pb), repo, "preprocess")
    good = scene_png(20)
    reqs = [
        request(_image(good)),
        request(_image(b"")),
        request(_image(good), {"beam_size": "abc"}),
        request(_image(b"GIF89a broken")),
        request(_image(good), {"max_length": 3}),
        request(_image(good), {"beam_size": 0}),
    ]
    resp = model.execute(reqs)
    errors = {i: r.error() for i, r in enumerate(resp) if r.has_error()}
    assert sorted(errors) == [1, 2, 3, 5]
    assert all(e.code() == pb.TritonError.INVALID_ARG for e in errors.values())
    assert errors[1].message() == "IMAGE: image is empty (0 bytes)"
    assert errors[2].message() == "beam_size must be an integer, got 'abc'"
    assert "not a decodable image" in errors[3].message()
    assert errors[5].message() == "beam_size must be in 1..10, got 0"
    assert [c.decode() for c in outputs(resp[0])["CAPTION"][:, 0]] == _reference(ck, [good])[0]
    short = outputs(resp[4])["CAPTION"][0, 0].decode()
    assert short == _reference(ck, [good], max_length=3)[0][0]
    rejected = pb.MetricFamily.registry["captioner_rejected_total"]
    assert rejected.value(reason="empty") == 1 and rejected.value(reason="bad_parameter") == 2
    assert rejected.value(reason="not_an_image") == 1
    assert pb.MetricFamily.registry["captioner_captions_total"].value(version=f"1:{ck.sha256[:8]}") == 2
    tokens = pb.MetricFamily.registry["captioner_tokens_total"]
    assert tokens.value() == _reference(ck, [good])[2] + _reference(ck, [good], max_length=3)[2]
    # a batch of only bad requests never reaches the encoder or the decode loop
    only_bad = model.execute([request(_image(b"")), request(_image(good), {"colour": 1})])
    assert all(r.has_error() for r in only_bad)


def test_a_cancelled_request_is_answered_cancelled_and_a_failure_is_internal_for_the_batch(built, pb):
    ck, _, repo = built
    model = initialize(load_model_py("whole", pb), repo, "preprocess")
    images = [scene_png(i) for i in range(3)]
    reqs = [request(_image(x)) for x in images]
    reqs[1].cancelled = True
    resp = model.execute(reqs)
    assert resp[1].error().code() == pb.TritonError.CANCELLED
    assert [outputs(resp[i])["CAPTION"][0, 0].decode() for i in (0, 2)] == _reference(ck, [images[0], images[2]])[0]

    def broken(*_):
        raise RuntimeError("boom")

    model.captioner.step = broken
    resp = model.execute([request(_image(images[0])), request(_image(images[1]))])
    assert all(r.error().code() == pb.TritonError.INTERNAL for r in resp)
    assert "preprocess: internal error (RuntimeError)" in resp[0].error().message()


def test_whole_captioner_needs_the_decoding_defaults():
    from captioner.preprocess import Limits, PreprocessConfig
    from captioner.serving.preprocess import ImageEncoder, Preprocessor
    from captioner.serving.whole import WholeCaptioner

    with pytest.raises(ValueError, match="decoding defaults"):
        WholeCaptioner(ImageEncoder(Preprocessor(PreprocessConfig(16), Limits()), engine=None), step=None, vocab=None)
