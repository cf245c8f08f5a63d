"""captioner.preprocess: every way an image can be refused, and the conversions that must
happen before the model sees it."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner.preprocess import (
    DEFAULT_MAX_BYTES,
    ImageError,
    Limits,
    PreprocessConfig,
    decode_image,
    load_path,
    normalize,
    prepare,
    preprocess_bytes,
)


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def handmade_png(width, height, bit_depth=1, colour_type=0):
    """A valid greyscale PNG of any size: rows of zeros compress ~1000:1, so a
    20000 x 20000 image (a decompression bomb) is ~50 KB on the wire."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    row = b"\0" * (1 + (width * bit_depth + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def noisy(size=(64, 48), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def reason(data, limits=None):
    with pytest.raises(ImageError) as e:
        decode_image(data, limits)
    assert str(e.value), "every refusal says why"
    return e.value.reason


def test_empty():
    assert reason(b"") == "empty"


def test_not_bytes():
    assert reason("a.png") == "bad_type"
    assert reason(None) == "bad_type"


@pytest.mark.parametrize("data", [b"hello, world", b"\x89PNG\r\n\x1a\n", bytes(range(256)) * 4, b"GIF89a\xff"])
def test_junk(data):
    assert reason(data) == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = encode(noisy(), fmt)
    assert decode_image(data).size == (64, 48)
    for cut in (len(data) // 2, len(data) - 30):  # (PNG: inside IDAT, past the IEND and CRC)
        assert reason(data[:cut]) == "corrupt", cut


def test_corrupt_png_payload():
    data = bytearray(encode(noisy(), "PNG"))
    i = data.index(b"IDAT") + 40
    data[i : i + 16] = b"\xff" * 16  # damages the deflate stream and the CRC
    assert reason(bytes(data)) in ("corrupt", "not_an_image")


@pytest.mark.parametrize("w, h", [(0, 10), (10, 0)])
def test_zero_pixels(w, h):
    assert reason(handmade_png(w, h)) == "zero_size"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = handmade_png(20000, 20000)
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.reason == "too_many_pixels" and "20000x20000" in str(e.value)
    # The limit is configurable, and a normal image is under it.
    assert reason(handmade_png(300, 300), Limits(max_pixels=300 * 299)) == "too_many_pixels"
    assert decode_image(handmade_png(300, 300), Limits(max_pixels=300 * 300)).size == (300, 300)


def test_too_large_payload():
    data = encode(noisy())
    assert reason(data, Limits(max_bytes=len(data) - 1)) == "too_large"
    assert decode_image(data, Limits(max_bytes=len(data))).size == (64, 48)
    assert reason(b"\0" * (DEFAULT_MAX_BYTES + 1)) == "too_large"


def test_unreadable_path(tmp_path):
    with pytest.raises(ImageError) as e:
        load_path(tmp_path / "nope.png")
    assert e.value.reason == "unreadable" and "nope.png" in str(e.value)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ImageError) as e:
        load_path(tmp_path / "junk.png")
    assert e.value.reason == "not_an_image"


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # hidden colour under full transparency
    rgba[0, 0] = (200, 20, 20, 255)
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black over white
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (200, 20, 20)
    assert np.all(np.abs(out[0, 1].astype(int) - 127) <= 1)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_palette_greyscale_and_cmyk_become_rgb():
    src = Image.new("RGB", (8, 8), (40, 80, 210))
    pal = src.quantize(colors=4)
    assert pal.mode == "P"
    assert np.asarray(decode_image(encode(pal)))[4, 4].tolist() == [40, 80, 210]
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0  # palette index 0 transparent -> white
    out = np.asarray(decode_image(encode(pal_t, transparency=0)))
    assert out[4, 4].tolist() == [255, 255, 255]
    grey = decode_image(encode(Image.new("L", (8, 8), 77)))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]
    la = decode_image(encode(Image.new("LA", (8, 8), (0, 0))))
    assert np.asarray(la)[0, 0].tolist() == [255, 255, 255]
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[4, 4, 0] > 200 and np.asarray(cmyk)[4, 4, 1] < 60


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with orientation 6 ("rotate 90 CW to view")."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    # Rotating 90 degrees clockwise puts the stored left half on top.
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_prepare_resizes_to_the_model_size():
    cfg = PreprocessConfig(image_size=32)
    arr = prepare(noisy((100, 60)), cfg)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    same = noisy((32, 32))
    assert np.array_equal(prepare(same, cfg), np.asarray(same)), "no resampling at the model size"
    assert prepare(Image.new("L", (10, 10), 9), cfg).shape == (32, 32, 3)


def test_normalize_batch_and_single():
    cfg = PreprocessConfig(image_size=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    img = np.array([[[255, 0, 51], [0, 255, 102]], [[128, 64, 0], [255, 255, 255]]], np.uint8)
    one = normalize(img, cfg)
    assert one.shape == (3, 2, 2) and one.dtype == np.float32
    np.testing.assert_allclose(one[:, 0, 0], [1.0, -1.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(one[:, 0, 1], [-1.0, 3.0, 0.4], atol=1e-6)
    batch = normalize(np.stack([img, img]), cfg)
    assert batch.shape == (2, 3, 2, 2) and np.array_equal(batch[1], one) and batch.flags.c_contiguous


def test_preprocess_bytes_end_to_end():
    cfg = PreprocessConfig(image_size=16)
    x = preprocess_bytes(encode(Image.new("RGB", (50, 50), (255, 0, 128))), cfg)
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[:, 8, 8], [1.0, -1.0, (128 / 255 - 0.5) / 0.5], atol=1e-6)
    with pytest.raises(ImageError):
        preprocess_bytes(b"junk", cfg)


def test_config_round_trip():
    cfg = PreprocessConfig(299, "bicubic", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
