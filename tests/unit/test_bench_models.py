"""The bench's in-process bound and naive peer caption with the same model as the
reference `Captioner`: same preprocessing, same decoding, same words."""

from __future__ import annotations

import io
import json
import random
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from bench.inprocess import InProcessCaptioner, measure
from bench.naive_server import NaiveServer
from builder.export import export_decoder_step, export_encoder
from captioner.checkpoint import Checkpoint
from captioner.inference import Captioner
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.scenes import random_scene, render
from captioner.vocab import SPECIALS, Vocabulary

WORDS = ["a", "red", "blue", "circle", "square", "small", "large", "above", "below"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Random small_cnn model; END is made unlikely so captions have words in them."""
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIALS) + WORDS)
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=8)
    model = CaptionModel(args).eval()
    with torch.no_grad():
        model.decoder.logits.bias[vocab.end] = -20.0
    d = tmp_path_factory.mktemp("tiny_model")
    ck = Checkpoint(args, PreprocessConfig(32), vocab, model)
    ck.save(d)
    return d


@pytest.fixture(scope="module")
def images():
    out = []
    for i in range(3):
        buf = io.BytesIO()
        render(random_scene(random.Random(i)), np.random.default_rng(i)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def test_inprocess_bound_captions_like_the_reference(tiny_model, images, tmp_path):
    from captioner import checkpoint

    ck = checkpoint.load(tiny_model)
    enc, dec = export_encoder(ck, tmp_path / "enc.onnx"), export_decoder_step(ck, tmp_path / "dec.onnx")
    cap = InProcessCaptioner(ck, enc, dec, threads=1)
    expected = [c.text for c in Captioner(tiny_model).caption_images(images)]
    assert all(expected)
    assert cap.caption_bytes(images) == expected

    r = measure(cap, images, batch_size=2, duration=0.05)
    assert r.captions % 2 == 0 and r.captions >= 2  # whole batches only
    assert r.captions_per_s == pytest.approx(r.captions / r.elapsed_s)
    assert 0 < r.mean_tokens <= 8


def _post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_naive_server_answers_the_reference_caption_and_survives_junk(tiny_model, images):
    expected = [c.text for c in Captioner(tiny_model).caption_images(images)]
    with NaiveServer(tiny_model, threads=1) as srv:
        got = [_post(srv.url + "/caption", img) for img in images]
        assert [s for s, _ in got] == [200] * len(images)
        assert [b["caption"] for _, b in got] == expected

        status, body = _post(srv.url + "/caption", b"not an image")
        assert status == 400 and body["error"] == "not_an_image"
        status, body = _post(srv.url + "/caption", images[0])
        assert status == 200 and body["caption"] == expected[0]
