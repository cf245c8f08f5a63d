"""The server captions exactly what the in-process reference (captioner.inference)
captions, for 200 spec scenes, greedy and beam 3, as PNG, JPEG and resized."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from triton_requests import ask_all, encode

from captioner.inference import Captioner
from captioner.scenes import Scene, caption_is_correct, generate_split

pytestmark = pytest.mark.integration
N_SCENES = 200
SEED = 90210
VARIANTS = {  # encode() arguments; "png" is the generator's own file
    "jpeg": dict(fmt="JPEG", quality=85),
    "resized": dict(fmt="PNG", size=300, compress_level=1),
}
VARIANT_PARITY_SCENES = 100  # JPEG / resized parity on a subset; quality is checked on all 200


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    ann = json.loads(generate_split(out, "test", N_SCENES, seed=SEED, progress=False).read_text())
    files = [out / im["file_name"] for im in ann["images"]]
    truth = [Scene.from_json(s) for s in ann["scenes"]]
    encoded = {"png": [f.read_bytes() for f in files]}
    for name, kw in VARIANTS.items():
        encoded[name] = [encode(Image.open(f).convert("RGB"), **kw) for f in files]
    return encoded, truth


@pytest.fixture(scope="module")
def reference(triton_server):
    return Captioner(triton_server.checkpoint)


def _compare(server, ref):
    refused = [a for a in server if a.caption is None]
    assert not refused, refused[:3]
    mismatches = [(i, a.caption, r.text) for i, (a, r) in enumerate(zip(server, ref)) if a.caption != r.text]
    assert not mismatches, f"{len(mismatches)} of {len(ref)} captions differ, e.g. {mismatches[:3]}"
    np.testing.assert_allclose([a.score for a in server], [r.score for r in ref], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_png_captions_equal_the_reference(triton_server, reference, scenes, beam):
    encoded, _ = scenes
    params = {"beam_size": beam} if beam > 1 else None
    server = ask_all(triton_server.grpc_url, [(d, params) for d in encoded["png"]])
    _compare(server, reference.caption_images(encoded["png"], beam_size=beam))


@pytest.mark.parametrize("variant", ["jpeg", "resized"])
def test_jpeg_and_resized_captions_equal_the_reference(triton_server, reference, scenes, variant):
    data = scenes[0][variant][:VARIANT_PARITY_SCENES]
    server = ask_all(triton_server.grpc_url, [(d, None) for d in data])
    _compare(server, reference.caption_images(data))


def test_max_length_parameter_matches_the_reference(triton_server, reference, scenes):
    encoded, _ = scenes
    data = encoded["png"][:20]
    server = ask_all(triton_server.grpc_url, [(d, {"max_length": 3, "beam_size": 2}) for d in data])
    _compare(server, reference.caption_images(data, max_length=3, beam_size=2))
    assert all(len(a.caption.split()) <= 3 for a in server)


def test_sampling_gives_captions_and_scores(triton_server, scenes):
    encoded, _ = scenes
    answers = ask_all(triton_server.grpc_url, [(d, {"temperature": 1.0}) for d in encoded["png"][:10]])
    assert all(a.caption is not None and a.score <= 0.0 for a in answers)


@pytest.mark.parametrize("variant", ["png", *VARIANTS])
def test_shipped_model_captions_spec_scenes_correctly(triton_server, scenes, variant):
    if not triton_server.shipped:
        pytest.skip("models/default (the shipped model) is not there: caption quality is its property, not the server's")
    encoded, truth = scenes
    answers = ask_all(triton_server.grpc_url, [(d, None) for d in encoded[variant]])
    correct = sum(caption_is_correct(a.caption or "", s) for a, s in zip(answers, truth))
    assert correct / len(truth) >= 0.98, f"{correct}/{len(truth)} correct as {variant}"
