"""The fast decode path's gate (builder/decode_gate.py): on photo-sized encodings of fresh
scenes the shipped model's greedy captions through the fast path agree with the exact
path's on >= 99% and are correct no less often; a decode path that changes captions is
refused and the build then serves the exact path.

CAPTIONER_TEST_MODEL=DIR points the model test at another checkpoint."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builder import decode_gate
from captioner import checkpoint
from captioner.checkpoint import DEFAULT_MODEL_DIR, FILENAME, Checkpoint
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig, decode_image
from captioner.vocab import SPECIALS, Vocabulary

MODEL = Path(os.environ.get("CAPTIONER_TEST_MODEL") or DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIALS) + ["a", "red", "blue", "circle", "square"])
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=6)
    return Checkpoint(args, PreprocessConfig(32), vocab, CaptionModel(args).eval())


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / FILENAME).is_file(), reason=f"no model at {MODEL / FILENAME}")
def test_the_gate_holds_for_the_shipped_model_on_photo_sized_encodings():
    ck = checkpoint.load(MODEL)
    r = decode_gate.check(ck)
    assert r.total >= 300 and set(r.by_kind) == {"jpeg", "png", "turned"}
    # Not vacuous: every gate image went through the reduced decode.
    assert r.identical_pixels == 0
    assert r.share >= 0.99, "\n".join(r.lines())
    assert r.fast_correct >= r.exact_correct, "\n".join(r.lines())
    assert r.passed


def test_the_gate_set_is_photos_of_fresh_scenes():
    photos = decode_gate.gate_set(6)
    assert [p.fmt for p in photos] == ["jpeg", "png", "jpeg", "jpeg", "jpeg", "png", "jpeg", "jpeg"]
    assert {p.side for p in photos} == {1024, 1000, 768}
    for p in photos:
        stored = Image.open(io.BytesIO(p.data))
        assert stored.size == (p.side, p.side)
        assert stored.getexif().get(0x0112, 1) == p.orientation
        assert decode_image(p.data).size == (p.side, p.side)
    assert sum(p.orientation != 1 for p in photos) >= 3


def _pixel_tokens(images: np.ndarray) -> list[tuple[int, ...]]:
    """A 'model' that tells every pixel apart: any change of the prepared image changes
    its caption."""
    return [(4 + int(img.astype(np.int64).sum()) % 5,) for img in images]


def test_a_decode_path_that_changes_captions_is_refused_and_exact_is_served(tiny):
    lines = []
    cfg, entry = decode_gate.choose(tiny, "fast", tokens=_pixel_tokens, log=lines.append, n=9)
    assert cfg.decode == "exact" and entry["served"] == "exact" and entry["requested"] == "fast"
    assert entry["gate"]["passed"] is False and entry["gate"]["share"] < 0.99
    assert any("REFUSED" in ln for ln in lines)


def test_identical_captions_pass_and_fast_is_served(tiny):
    cfg, entry = decode_gate.choose(tiny, "fast", tokens=lambda x: [(4,)] * len(x), log=lambda m: None, n=9)
    assert cfg.decode == "fast" and entry["gate"]["passed"] and entry["gate"]["share"] == 1.0
    assert cfg.image_size == tiny.preprocess.image_size


def test_exact_requested_runs_no_gate(tiny):
    def never(images):
        raise AssertionError("the exact path needs no gate")

    cfg, entry = decode_gate.choose(tiny, "exact", tokens=never, log=lambda m: None)
    assert cfg.decode == "exact" and entry == {"requested": "exact", "checkpoint": "exact", "served": "exact", "gate": None}
    with pytest.raises(ValueError):
        decode_gate.choose(tiny, "draft", tokens=never, log=lambda m: None)


@pytest.mark.parametrize(
    "agree, exact_ok, fast_ok, passed",
    [(200, 200, 200, True), (198, 190, 190, True), (197, 200, 200, False), (199, 195, 194, False), (199, 194, 195, True)],
)
def test_the_verdict_needs_agreement_and_no_drop_in_correctness(agree, exact_ok, fast_ok, passed):
    r = decode_gate.GateReport(200, agree, 0, exact_ok, fast_ok, {}, "test")
    assert r.passed is passed
