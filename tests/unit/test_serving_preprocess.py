"""The preprocess model's logic: per-request decoding errors, one normalisation for the batch."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from serving_support import scene_png

from captioner.preprocess import Limits, PreprocessConfig, preprocess_bytes
from captioner.serving import Rejected
from captioner.serving.params import DecodeDefaults
from captioner.serving.preprocess import REJECT_REASONS, Preprocessor, limits_from_config

CFG = PreprocessConfig(32, "bilinear", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def _pre(**limits) -> Preprocessor:
    return Preprocessor(CFG, Limits(**limits), DecodeDefaults(20, 0.7))


def _req(*items: bytes) -> np.ndarray:
    return np.array([[x] for x in items], dtype=object)


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_good_images_become_exactly_what_training_preprocessing_gives():
    images = [scene_png(1), scene_png(2, size=200), scene_png(3, fmt="JPEG")]
    out = _pre().run([_req(x) for x in images])
    for data, got in zip(images, out):
        assert got.shape == (1, 3, 32, 32) and got.dtype == np.float32
        np.testing.assert_array_equal(got[0], preprocess_bytes(data, CFG))


BAD = {
    "empty": (b"", "empty", "image is empty (0 bytes)"),
    "junk": (b"this is not an image at all", "not_an_image", "not a decodable image"),
    "truncated png": (scene_png(4)[:700], "corrupt", "truncated"),
    "truncated jpeg": (scene_png(5, fmt="JPEG")[:900], "corrupt", "truncated"),
    "zero pixels": (_png_header(0, 0), "zero_size", "no pixels (0x0)"),
    "bomb": (_encoded(Image.new("1", (8000, 8000)), "PNG"), "too_many_pixels", "8000x8000 = 64000000 pixels"),
    "too many bytes": (b"\x89PNG" + bytes(200_000), "too_large", "image is 200004 bytes, over the limit of 100000"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_image_is_refused_alone_and_its_batch_mates_succeed(case):
    data, reason, message = BAD[case]
    good = scene_png(6)
    out = _pre(max_bytes=100_000 if case == "too many bytes" else 10**7).run([_req(good), _req(data), _req(good)])
    assert isinstance(out[1], Rejected) and out[1].reason == reason and message in out[1].message
    assert out[1].message.startswith("IMAGE: ")
    for ok in (out[0], out[2]):
        np.testing.assert_array_equal(ok[0], preprocess_bytes(good, CFG))
    assert reason in REJECT_REASONS


def test_a_request_with_several_images_names_the_bad_one():
    out = _pre().run([_req(scene_png(7), b"", scene_png(8))])
    assert isinstance(out[0], Rejected) and out[0].message.startswith("IMAGE[1]: image is empty")


def test_a_request_with_several_good_images_keeps_their_order():
    a, b = scene_png(9), scene_png(10)
    (out,) = _pre().run([_req(a, b)])
    np.testing.assert_array_equal(out, np.stack([preprocess_bytes(a, CFG), preprocess_bytes(b, CFG)]))


def test_exif_orientation_is_applied():
    upright = Image.open(io.BytesIO(scene_png(11))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down, "rotate 180 to view"
    stored = _encoded(upright.rotate(180), "PNG", exif=exif)
    (out,) = _pre().run([_req(stored)])
    np.testing.assert_array_equal(out[0], preprocess_bytes(_encoded(upright, "PNG"), CFG))


def test_transparent_and_palette_images_are_accepted():
    rgba = Image.open(io.BytesIO(scene_png(12))).convert("RGBA")
    pal = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    out = _pre().run([_req(_encoded(rgba, "PNG")), _req(_encoded(pal, "PNG"))])
    assert all(not isinstance(o, Rejected) and o.shape == (1, 3, 32, 32) for o in out)


def test_bad_parameters_are_refused_before_the_image_is_decoded():
    out = _pre().run([_req(b""), _req(scene_png(13))], ['{"beam_size": 0}', '{"beam_size": 2}'])
    assert out[0] == Rejected("bad_parameter", "beam_size must be in 1..10, got 0")
    assert not isinstance(out[1], Rejected)


def test_an_empty_request_tensor_is_refused():
    (out,) = _pre().run([np.zeros((0, 1), dtype=object)])
    assert out == Rejected("empty", "IMAGE holds no images")


def test_limits_default_to_captioner_preprocess_and_the_config_overrides_them():
    assert limits_from_config({}) == Limits()
    assert limits_from_config({"max_image_bytes": "10", "max_image_pixels": "20"}) == Limits(10, 20)
