"""seed-inception: the seed's sizes on InceptionV3 with random weights, labelled
speed-only, exportable and numerically sane (so parity figures mean something)."""

from __future__ import annotations

import numpy as np
import pytest

from builder import parity, seed_inception
from builder.export import export_decoder_step, export_encoder
from captioner import checkpoint


@pytest.fixture(scope="module")
def seed_ck(tmp_path_factory):
    d = seed_inception.ensure(tmp_path_factory.mktemp("seed_inception"))
    return checkpoint.load(d)


def test_has_the_seed_sizes_and_is_labelled_speed_only(seed_ck):
    a = seed_ck.args
    assert a.backbone == "inception_v3" and seed_ck.preprocess.image_size == 299
    assert (a.image_bottleneck, a.lstm_units, a.embedding_dim, a.logit_bottleneck) == (120, 300, 100, 120)
    assert seed_ck.model.encoder.bottleneck.in_features == 2048
    assert len(seed_ck.vocab) == a.vocab_size == 8769
    assert seed_ck.vocab.itos[4] == "w0001" and seed_ck.vocab.itos[-1] == "w8765"
    assert seed_ck.meta["speed_only"] is True and "speed" in seed_ck.meta["note"]


def test_exports_and_matches_torch(seed_ck, tmp_path):
    enc = export_encoder(seed_ck, tmp_path / "encoder.onnx")
    dec = export_decoder_step(seed_ck, tmp_path / "decoder_step.onnx")
    diffs = parity.encoder_diffs(seed_ck, parity.onnx_encode(parity.session(enc)), batch_sizes=(2,))
    diffs += parity.decoder_diffs(seed_ck, parity.session(dec), batch_sizes=(2,))
    for d in diffs:
        assert d.worst <= parity.TOLERANCE, d
    # Random weights with untouched BatchNorm statistics explode to ~1e11; calibrated, the
    # initial state is at a trained network's scale and differs between images.
    images, _ = parity.scene_batch(3, seed_ck.preprocess, seed=5)
    h0, _ = parity.torch_encode(seed_ck)(parity.normalize(images, seed_ck.preprocess))
    assert np.isfinite(h0).all() and np.abs(h0).max() < 100
    assert np.abs(h0[0] - h0[1]).max() > 1e-3
