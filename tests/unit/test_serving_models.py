"""The Triton model.py files, run against a fake triton_python_backend_utils on a real
assembled repository: per-request responses, batching, errors and metrics."""

import json

import fake_pb_utils
import numpy as np
import pytest
from fake_pb_utils import outputs, request
from serving_support import image_request as _image
from serving_support import initialize, load_model_py, scene_png, tiny_checkpoint
from serving_support import torch_reference as _reference

from builder.export import export_decoder_step, export_encoder
from builder.repository import assemble
from captioner import checkpoint
from captioner.preprocess import preprocess_bytes


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    ck = checkpoint.load(tiny_checkpoint(d / "ck"))
    art = {"encoder_onnx": export_encoder(ck, d / "enc.onnx"), "decoder_onnx": export_decoder_step(ck, d / "dec.onnx")}
    assemble(ck, d / "inprocess", "cpu", art)
    assemble(ck, d / "bls", "cpu", art, step_mode="bls")
    return ck, d


@pytest.fixture
def pb():
    return fake_pb_utils.make_module()


def _model(pb, repo_dir, name):
    return initialize(load_model_py(name, pb), repo_dir, name)


def _pipeline(pb, repo_dir, requests):
    """preprocess -> encoder -> caption_generator, each executed once over the batch,
    errors carried per request as the ensemble does."""
    pre, enc, gen = (_model(pb, repo_dir, n) for n in ("preprocess", "encoder", "caption_generator"))
    responses = pre.execute(requests)
    alive = [i for i, r in enumerate(responses) if not r.has_error()]
    enc_out = enc.execute([request({"image": outputs(responses[i])["image"]}) for i in alive])
    gen_req = [request(outputs(e), json.loads(requests[i].parameters())) for i, e in zip(alive, enc_out)]
    final = list(responses)
    for i, r in zip(alive, gen.execute(gen_req)):
        final[i] = r
    return final


@pytest.mark.parametrize("mode", ["inprocess", "bls"])
def test_a_batch_of_requests_is_captioned_like_the_reference(repo, pb, mode):
    ck, d = repo
    if mode == "bls":
        step_model = _model(pb, d / "bls", "decoder_step")
        pb.InferenceRequest.handler = lambda r: step_model.execute([r])[0]
    images = [scene_png(i) for i in range(5)]
    reqs = [request(_image(images[0])), request(_image(images[1], images[2]), {"beam_size": 3}), request(_image(*images[3:]))]
    resp = _pipeline(pb, d / mode, reqs)
    want_greedy = _reference(ck, [images[0], images[3], images[4]])
    want_beam = _reference(ck, images[1:3], beam_size=3)
    got = [outputs(r) for r in resp]
    assert [c.decode() for c in got[0]["CAPTION"][:, 0]] == want_greedy[0][:1]
    assert [c.decode() for c in got[2]["CAPTION"][:, 0]] == want_greedy[0][1:]
    assert [c.decode() for c in got[1]["CAPTION"][:, 0]] == want_beam[0]
    np.testing.assert_allclose(got[1]["SCORE"][:, 0], want_beam[1], atol=1e-4)
    assert got[1]["CAPTION"].shape == (2, 1) and got[1]["SCORE"].dtype == np.float32
    # every caption names the model version and checkpoint that made it
    assert [[v.decode() for v in g["MODEL_VERSION"][:, 0]] for g in got] == [[f"1:{ck.sha256[:8]}"] * n for n in (1, 2, 2)]


def test_bad_requests_fail_alone_and_are_counted_by_reason(repo, pb):
    ck, d = repo
    good = scene_png(20)
    reqs = [
        request(_image(good)),
        request(_image(b"")),
        request(_image(good), {"beam_size": "abc"}),
        request(_image(b"GIF89a broken")),
        request(_image(good), {"max_length": 3}),
    ]
    resp = _pipeline(pb, d / "inprocess", reqs)
    errors = {i: r.error() for i, r in enumerate(resp) if r.has_error()}
    assert sorted(errors) == [1, 2, 3]
    assert all(e.code() == pb.TritonError.INVALID_ARG for e in errors.values())
    assert errors[1].message() == "IMAGE: image is empty (0 bytes)"
    assert errors[2].message() == "beam_size must be an integer, got 'abc'"
    assert "not a decodable image" in errors[3].message()
    assert [c.decode() for c in outputs(resp[0])["CAPTION"][:, 0]] == _reference(ck, [good])[0]
    short = outputs(resp[4])["CAPTION"][0, 0].decode()
    assert short == _reference(ck, [good], max_length=3)[0][0] and len(short.split()) <= 3
    rejected = pb.MetricFamily.registry["captioner_rejected_total"]
    assert rejected.value(reason="empty") == 1 and rejected.value(reason="bad_parameter") == 1
    assert rejected.value(reason="not_an_image") == 1 and rejected.value(reason="corrupt") == 0
    captions = pb.MetricFamily.registry["captioner_captions_total"]
    assert captions.value(version=f"1:{ck.sha256[:8]}") == 2  # labelled by the model version that made them
    tokens = pb.MetricFamily.registry["captioner_tokens_total"]
    assert tokens.value() == _reference(ck, [good])[2] + _reference(ck, [good], max_length=3)[2]


def test_every_rejection_reason_has_a_series_from_the_start(repo, pb):
    _model(pb, repo[1] / "inprocess", "preprocess")
    family = pb.MetricFamily.registry["captioner_rejected_total"]
    labels = {lab["reason"] for lab, _ in family.series}
    assert {"empty", "not_an_image", "corrupt", "zero_size", "too_many_pixels", "too_large", "bad_parameter"} <= labels
    assert family.kind == pb.MetricFamily.COUNTER


def test_generator_refuses_bad_parameters_itself_when_called_directly(repo, pb):
    ck, d = repo
    gen = _model(pb, d / "inprocess", "caption_generator")
    h = np.zeros((1, ck.args.lstm_units), np.float32)
    good, bad = request({"h0": h, "c0": h}), request({"h0": h, "c0": h}, {"beam_size": 0})
    r_good, r_bad = gen.execute([good, bad])
    assert not r_good.has_error()
    assert r_bad.error().message() == "beam_size must be in 1..10, got 0"
    assert r_bad.error().code() == pb.TritonError.INVALID_ARG


def test_encoder_and_decoder_step_run_each_batch_once_and_split_it(repo, pb):
    ck, d = repo
    enc = _model(pb, d / "inprocess", "encoder")
    x = np.stack([preprocess_bytes(scene_png(i), ck.preprocess) for i in range(3)])
    r1, r2 = enc.execute([request({"image": x[:1]}), request({"image": x[1:]})])
    whole = enc.session.run(["h0", "c0"], {"image": x})
    np.testing.assert_allclose(np.concatenate([outputs(r1)["h0"], outputs(r2)["h0"]]), whole[0], atol=1e-6)
    dec = _model(pb, d / "inprocess", "decoder_step")
    u = ck.args.lstm_units
    tokens = np.array([[ck.vocab.start], [4]], np.int64)
    (r,) = dec.execute([request({"tokens": tokens, "h": whole[0][:2], "c": whole[1][:2]})])
    out = outputs(r)
    assert out["log_probs"].shape == (2, len(ck.vocab)) and out["h_out"].shape == (2, u)
    np.testing.assert_allclose(np.exp(out["log_probs"]).sum(axis=1), 1.0, atol=1e-5)


def test_an_internal_failure_fails_that_batch_with_an_internal_error_and_logs_the_traceback(repo, pb):
    enc = _model(pb, repo[1] / "inprocess", "encoder")
    wrong = np.zeros((1, 3, 7, 7), np.float32)  # Triton would never let this through; a bug might
    (r,) = enc.execute([request({"image": wrong})])
    assert r.has_error() and r.error().code() == pb.TritonError.INTERNAL
    assert "encoder: internal error" in r.error().message()
    assert any(level == "error" and "Traceback" in msg for level, msg in pb.Logger.lines)


def test_unknown_step_mode_is_refused_at_load(repo, pb, tmp_path):
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    d = tmp_path / "r"
    shutil.copytree(repo[1] / "inprocess", d)
    path = d / "caption_generator" / "config.pbtxt"
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    cfg.parameters["step_mode"].string_value = "telepathy"
    path.write_text(text_format.MessageToString(cfg))
    with pytest.raises(ValueError, match="step_mode must be inprocess or bls"):
        _model(pb, d, "caption_generator")


@pytest.mark.parametrize("model", ["preprocess", "encoder", "caption_generator"])
def test_a_request_whose_client_gave_up_is_answered_cancelled_and_the_others_served(repo, pb, model):
    ck, d = repo
    images = [scene_png(i) for i in range(3)]
    pre = _model(pb, d / "inprocess", "preprocess")
    prepared = [outputs(r)["image"] for r in pre.execute([request(_image(x)) for x in images])]
    enc = _model(pb, d / "inprocess", "encoder")
    encoded = [outputs(r) for r in enc.execute([request({"image": x}) for x in prepared])]
    make = {
        "preprocess": lambda i: request(_image(images[i])),
        "encoder": lambda i: request({"image": prepared[i]}),
        "caption_generator": lambda i: request(encoded[i]),
    }[model]
    alone = [outputs(r) for r in _model(pb, d / "inprocess", model).execute([make(0), make(2)])]
    reqs = [make(i) for i in range(3)]
    reqs[1].cancelled = True
    resp = _model(pb, d / "inprocess", model).execute(reqs)
    assert len(resp) == 3
    assert resp[1].has_error() and resp[1].error().code() == pb.TritonError.CANCELLED
    for got, want in zip((outputs(resp[0]), outputs(resp[2])), alone):
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])
