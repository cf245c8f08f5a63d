"""The exported graphs compute what the checkpoint computes: onnxruntime against torch at
batch 1 and 7 on random inputs and real scenes (max |diff| <= 1e-4), identical greedy
captions on 200 scenes, any batch size, and a wrong graph is caught."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from builder import parity
from builder.export import export_decoder_step, export_encoder
from captioner import checkpoint
from captioner.checkpoint import Checkpoint
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.vocab import SPECIALS, Vocabulary

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "above", "below"]


def tiny_checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    vocab = Vocabulary(list(SPECIALS) + WORDS)
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=8)
    model = CaptionModel(args).eval()
    with torch.no_grad():
        model.decoder.logits.bias[vocab.end] = -4.0  # captions of several words, not all empty
    return Checkpoint(args, PreprocessConfig(32), vocab, model)


def shipped_or_skip() -> Checkpoint:
    for where in (None, "runs/default"):
        try:
            return checkpoint.load(where)
        except FileNotFoundError:
            continue
    pytest.skip("no trained checkpoint (models/default or runs/default)")


@pytest.fixture(scope="module", params=["tiny", "shipped"])
def exported(request, tmp_path_factory):
    ck = tiny_checkpoint() if request.param == "tiny" else shipped_or_skip()
    d = tmp_path_factory.mktemp(f"export_{request.param}")
    return ck, export_encoder(ck, d / "encoder.onnx"), export_decoder_step(ck, d / "decoder_step.onnx")


def test_onnx_matches_torch_on_random_inputs_and_scenes_and_captions(exported):
    ck, enc, dec = exported
    report = parity.check_exports(ck, enc, dec, caption_scenes=200)
    print("\n".join(report.lines()))
    kinds = {(d.graph, d.inputs, d.batch) for d in report.diffs}
    assert kinds == {(g, i, b) for g in ("encoder", "decoder_step") for i in ("random", "scenes") for b in (1, 7)}
    for d in report.diffs:
        assert d.worst <= 1e-4, d
    assert report.captions.total == 200
    assert report.captions.identical == 200, report.captions.examples
    assert report.passed


def test_graphs_take_any_batch_size(exported):
    ck, enc, dec = exported
    u, v = ck.args.lstm_units, ck.args.vocab_size
    for path in (enc, dec):
        graph = onnx.load(str(path)).graph
        for t in list(graph.input) + list(graph.output):
            assert t.type.tensor_type.shape.dim[0].dim_param, f"{path.name}:{t.name} batch axis is not symbolic"
    enc_s, dec_s = parity.session(enc), parity.session(dec)
    for n in (1, 3, 33):
        h0, c0 = enc_s.run(["h0", "c0"], {"image": parity.random_images(n, ck.preprocess)})
        assert h0.shape == c0.shape == (n, u)
        logp, h, c = dec_s.run(None, {"tokens": np.zeros(n, np.int64), "h": h0, "c": c0})
        assert logp.shape == (n, v) and h.shape == c.shape == (n, u)
        assert np.allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-4)


def test_parity_catches_a_graph_that_drifted(tmp_path):
    ck = tiny_checkpoint()
    drifted = tiny_checkpoint()
    with torch.no_grad():
        drifted.model.encoder.to_state.bias += 1e-3  # small, but ten times the tolerance
        drifted.model.decoder.logit_bottleneck.bias += 1e-3
    enc = export_encoder(drifted, tmp_path / "encoder.onnx")
    dec = export_decoder_step(drifted, tmp_path / "decoder_step.onnx")
    report = parity.check_exports(ck, enc, dec, caption_scenes=20)
    assert not report.passed
    over = {d.graph for d in report.diffs if d.worst > report.tolerance}
    assert over == {"encoder", "decoder_step"}
    assert any("OVER" in line for line in report.lines())


def test_real_scene_inputs_come_from_the_one_preprocessing():
    cfg = PreprocessConfig(48, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    images, drawn = parity.scene_batch(4, cfg, seed=3)
    again, _ = parity.scene_batch(4, cfg, seed=3)
    assert images.shape == (4, 48, 48, 3) and images.dtype == np.uint8 and len(drawn) == 4
    assert np.array_equal(images, again), "scenes for parity must be reproducible"
