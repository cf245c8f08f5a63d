"""Every bad input gets INVALID_ARGUMENT naming the problem, for that request alone:
good requests batched with it still get their captions and the server stays ready."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from triton_requests import ask_all, encode

from captioner.preprocess import DEFAULT_MAX_BYTES
from captioner.scenes import random_scene, render

pytestmark = pytest.mark.integration
INVALID = "StatusCode.INVALID_ARGUMENT"


def _scene(seed: int) -> Image.Image:
    return render(random_scene(random.Random(seed)), np.random.default_rng(seed))


def _zero_pixel_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bomb() -> bytes:  # 10000 x 10000 one-bit pixels: 7 KB of PNG, 100 megapixels
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, "PNG")
    return buf.getvalue()


_png, _jpeg = encode(_scene(1), "PNG"), encode(_scene(2), "JPEG", quality=90)

# name: (data, parameters, IMAGE datatype, words the message must contain)
CASES = {
    "empty bytes": (b"", None, "BYTES", "image is empty (0 bytes)"),
    "not an image": (b"plain text, not an image\n" * 3, None, "BYTES", "bytes are not a decodable image"),
    "truncated png": (_png[: len(_png) // 2], None, "BYTES", "truncated or corrupt"),
    "truncated jpeg": (_jpeg[: len(_jpeg) // 2], None, "BYTES", "truncated or corrupt"),
    "0-pixel image": (_zero_pixel_png(), None, "BYTES", "image has no pixels (0x0)"),
    "decompression bomb": (_bomb(), None, "BYTES", "10000x10000 = 100000000 pixels, over the limit"),
    "payload over the byte limit": (
        _png + bytes(DEFAULT_MAX_BYTES),
        None,
        "BYTES",
        f"over the limit of {DEFAULT_MAX_BYTES}",
    ),
    "wrong dtype": (np.zeros((1, 1), np.float32), None, "FP32", "data-type is 'FP32', but model 'captioner' expects 'BYTES'"),
    "wrong shape": (np.array([[_png, _png]], dtype=np.object_), None, "BYTES", "unexpected shape for input 'IMAGE'"),
    "beam_size 0": (_png, {"beam_size": 0}, "BYTES", "beam_size must be in 1..10, got 0"),
    "beam_size 1000": (_png, {"beam_size": 1000}, "BYTES", "beam_size must be in 1..10, got 1000"),
    "beam_size abc": (_png, {"beam_size": "abc"}, "BYTES", "beam_size must be an integer, got 'abc'"),
    "max_length 0": (_png, {"max_length": 0}, "BYTES", "max_length must be in 1..50, got 0"),
    "max_length 51": (_png, {"max_length": 51}, "BYTES", "max_length must be in 1..50, got 51"),
    "temperature abc": (_png, {"temperature": "abc"}, "BYTES", "temperature must be a number, got 'abc'"),
    "temperature -1": (_png, {"temperature": -1.0}, "BYTES", "temperature must be in (0, 100]"),
    "unknown parameter": (_png, {"beams": 3}, "BYTES", "unknown parameter(s) beams"),
}


def _job(case):
    data, params, dtype, _ = CASES[case]
    return (data, params, dtype)


@pytest.fixture(scope="module")
def good(triton_server):
    """A few good images and the captions the server gives them on their own."""
    images = [encode(_scene(100 + i), "PNG") for i in range(6)]
    answers = ask_all(triton_server.grpc_url, [(d, None) for d in images], concurrency=1)
    assert all(a.caption is not None for a in answers)
    return images, [a.caption for a in answers]


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_refused_with_a_message_naming_the_problem(triton_server, case):
    (answer,) = ask_all(triton_server.grpc_url, [_job(case)])
    assert answer.status == INVALID, answer
    assert CASES[case][3] in answer.message, answer.message


def _stats(client, model: str) -> tuple[int, int]:
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def test_bad_inputs_mixed_with_good_ones_fail_alone(triton_server, good):
    import tritonclient.grpc as grpcclient

    images, captions = good
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    before = _stats(client, "preprocess")
    # Every bad case between good requests, all in flight together, twice over: the
    # dynamic batcher puts good and bad requests into the same preprocess executions.
    jobs, expected = [], []
    rng = random.Random(5)
    for _ in range(2):
        for case in CASES:
            i = rng.randrange(len(images))
            jobs += [(images[i], None, "BYTES"), _job(case)]
            expected += [("ok", captions[i]), ("bad", CASES[case][3])]
    answers = ask_all(triton_server.grpc_url, jobs, concurrency=len(jobs))
    for (kind, want), answer in zip(expected, answers):
        if kind == "ok":
            assert answer.caption == want, answer
        else:
            assert answer.status == INVALID and want in answer.message, answer
    inferences, executions = (a - b for a, b in zip(_stats(client, "preprocess"), before))
    assert executions < inferences, "no preprocess execution held more than one request"
    assert client.is_server_ready() and client.is_model_ready("captioner")
    # and it still answers afterwards
    (after,) = ask_all(triton_server.grpc_url, [(images[0], None, "BYTES")])
    assert after.caption == captions[0]
    client.close()


def test_a_request_with_several_images_names_the_bad_one(triton_server, good):
    images, captions = good
    batch = np.array([[images[0]], [b""], [images[1]]], dtype=np.object_)
    (answer,) = ask_all(triton_server.grpc_url, [(batch, None, "BYTES")])
    assert answer.status == INVALID and "IMAGE[1]: image is empty" in answer.message


def test_a_request_with_several_good_images_gets_a_caption_for_each(triton_server, good):
    import tritonclient.grpc as grpcclient

    images, captions = good
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    inp = grpcclient.InferInput("IMAGE", [3, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[x] for x in images[:3]], dtype=np.object_))
    result = client.infer("captioner", [inp])
    assert [c.decode() for c in result.as_numpy("CAPTION")[:, 0]] == captions[:3]
    assert result.as_numpy("SCORE").shape == (3, 1)
    client.close()
