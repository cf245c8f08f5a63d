"""captioner.preprocess's fast decode path: it decodes no more than the model needs (the
rule: every side stays >= FAST_DECODE_MARGIN x the model's side), keeps EXIF
orientation, refuses what the exact path refuses for the same reason, and prepares
nearly the same tensor."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner.photos import encode_photo
from captioner.preprocess import (
    FAST_DECODE_MARGIN,
    ImageError,
    Limits,
    PreprocessConfig,
    decode_image,
    decode_side,
    prepare_bytes,
    preprocess_bytes,
)
from captioner.serving.preprocess import Preprocessor

EXACT, FAST = PreprocessConfig(64), PreprocessConfig(64, decode="fast")
MIN_SIDE = decode_side(FAST)


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth(w, h=None):
    """Gradients and one slow wave: no detail finer than a few percent of the side."""
    h = h or w
    y, x = np.mgrid[0:h, 0:w]
    x, y = x / w, y / h
    r = 128 + 100 * np.sin(2 * np.pi * x * 1.5) * np.cos(2 * np.pi * y)
    return Image.fromarray(np.clip(np.stack([r, 255 * x, 200 * (1 - y) + 20], -1), 0, 255).astype(np.uint8))


def reasons(data, limits=None):
    """The refusal reason on the exact and on the fast path."""
    out = []
    for side in (None, MIN_SIDE):
        with pytest.raises(ImageError) as e:
            decode_image(data, limits, side)
        assert str(e.value)
        out.append(e.value.reason)
    return out


def test_the_side_the_fast_path_keeps():
    assert decode_side(EXACT) is None
    assert MIN_SIDE == FAST_DECODE_MARGIN * 64 == 128
    assert decode_side(PreprocessConfig(299, decode="fast")) == 598


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("w, h", [(1024, 1024), (1000, 1000), (768, 768), (1024, 300), (300, 1024), (2000, 260), (4096, 4096)])
def test_decoded_no_smaller_than_the_rule_and_reduced_when_it_can(fmt, w, h):
    data = encode(smooth(w, h), fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    img = decode_image(data, min_side=MIN_SIDE)
    assert img.mode == "RGB"
    assert min(img.size) >= MIN_SIDE, img.size
    # Reduced as far as the rule allows: by an integer factor >= 2 whenever both sides
    # hold twice the minimum; JPEG by at most 8 through its DCT scale, then any other
    # format's box reduction continues.
    factor = w / img.size[0]
    assert factor == pytest.approx(h / img.size[1], rel=0.02)
    assert min(w, h) / factor < 2 * MIN_SIDE + factor, (img.size, factor)


def test_jpeg_is_decoded_at_a_reduced_dct_scale_other_formats_box_reduced():
    """1000 px: the JPEG at 1/4 scale (250 px; 1/8 would give 125 < 128), the PNG decoded
    whole and box-reduced by 7 (143 px)."""
    assert decode_image(encode(smooth(1000), "JPEG"), min_side=MIN_SIDE).size == (250, 250)
    assert decode_image(encode(smooth(1000), "PNG", compress_level=1), min_side=MIN_SIDE).size == (143, 143)
    assert decode_image(encode(smooth(1000), "JPEG")).size == (1000, 1000)


@pytest.mark.parametrize("fmt, sides", [("PNG", (128, 200, 255)), ("JPEG", (128, 140))])
def test_images_no_reduction_fits_decode_exactly_as_before(fmt, sides):
    """No integer box (other formats: under 2x the rule) and no M/8 DCT scale (JPEG: under
    8/7 of it) keeps the rule: the fast path is the exact path."""
    for side in sides:
        data = encode(smooth(side), fmt)
        assert np.array_equal(prepare_bytes(data, FAST), prepare_bytes(data, EXACT)), side
        assert decode_image(data, min_side=MIN_SIDE).size == (side, side)


def test_a_small_jpeg_is_decoded_at_the_smallest_m8_scale_the_rule_allows():
    assert decode_image(encode(smooth(200), "JPEG"), min_side=MIN_SIDE).size == (150, 150)  # 6/8
    assert decode_image(encode(smooth(250), "JPEG"), min_side=MIN_SIDE).size == (157, 157)  # 5/8, rounded up


@pytest.mark.parametrize("fmt, kw", [("JPEG", {"quality": 95}), ("PNG", {"compress_level": 1})])
@pytest.mark.parametrize("side", [1024, 1000, 600])
def test_exact_and_fast_prepare_nearly_the_same_tensor_on_a_smooth_image(fmt, kw, side):
    data = encode(smooth(side), fmt, **kw)
    exact = preprocess_bytes(data, EXACT)
    fast = preprocess_bytes(data, FAST)
    assert exact.shape == fast.shape == (3, 64, 64)
    diff = np.abs(exact - fast) * 0.5 * 255  # back to 8-bit levels (std 0.5)
    assert diff.max() <= 3.0 and diff.mean() <= 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_kept_on_the_fast_path(fmt, orientation):
    """A photo stored turned, with the tag saying how to view it: the fast path shows the
    picture as drawn (red square top-left on blue), like the exact path."""
    drawn = Image.new("RGB", (1024, 1024), (0, 0, 255))
    drawn.paste((255, 0, 0), (0, 0, 512, 512))
    data = encode_photo(drawn, fmt, orientation=orientation, png_compress_level=1)
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[0x0112] == orientation
    for side in (None, MIN_SIDE):
        arr = np.asarray(decode_image(data, min_side=side)).astype(int)
        n = arr.shape[0]
        assert arr[n // 8, n // 8, 0] > 200 and arr[n // 8, n // 8, 2] < 60, (side, arr[n // 8, n // 8])
        assert arr[-n // 8, -n // 8, 2] > 200 and arr[-n // 8, -n // 8, 0] < 60, (side, arr[-n // 8, -n // 8])


def test_a_non_square_photo_turned_by_exif_is_turned_on_the_fast_path():
    stored = Image.new("RGB", (1600, 800), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 800, 800))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view: the stored left half ends on top
    img = decode_image(encode(stored, "JPEG", quality=90, exif=exif.tobytes()), min_side=MIN_SIDE)
    assert img.size == (200, 400)  # 1/4 DCT scale of 800 x 1600
    arr = np.asarray(img).astype(int)
    assert arr[50, 100, 0] > 200 and arr[350, 100, 2] > 200


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_the_pixel_limit_is_checked_on_the_declared_size_before_decoding():
    """The fast path decodes a 2000 px JPEG at 250 px, but the limit is on what the file
    declares: the same refusal as on the exact path."""
    data = encode(smooth(2000), "JPEG", quality=80)
    assert reasons(data, Limits(max_pixels=2000 * 2000 - 1)) == ["too_many_pixels"] * 2
    assert decode_image(data, Limits(max_pixels=2000 * 2000), MIN_SIDE).size == (250, 250)
    # A decompression bomb (20000 x 20000 greyscale, ~50 KB) never reaches the decoder.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 20000 // 8)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(z.compress(row) for _ in range(20000)) + z.flush())
        + _chunk(b"IEND", b"")
    )
    assert reasons(bomb) == ["too_many_pixels"] * 2


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_and_corrupt_photos_are_refused_alike(fmt):
    data = encode(smooth(1024), fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    for cut in (len(data) // 2, len(data) - 30):
        assert reasons(data[:cut]) == ["corrupt", "corrupt"], cut
    damaged = bytearray(data)
    i = len(damaged) // 3
    damaged[i : i + 64] = b"\xff" * 64
    got = set()
    for side in (None, MIN_SIDE):
        try:
            decode_image(bytes(damaged), min_side=side)
            got.add("decoded")
        except ImageError as e:
            got.add(e.reason)
    assert len(got) == 1, f"exact and fast disagree on damaged data: {got}"


def test_other_refusals_are_unchanged():
    assert reasons(b"") == ["empty"] * 2
    assert reasons(b"hello, world") == ["not_an_image"] * 2
    data = encode(smooth(600), "JPEG")
    assert reasons(data, Limits(max_bytes=len(data) - 1)) == ["too_large"] * 2
    assert reasons("a.jpg") == ["bad_type"] * 2


def test_transparency_and_palettes_on_the_fast_path():
    rgba = np.zeros((600, 600, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # hidden colour under full transparency: white once composited
    rgba[:300, :300] = (200, 20, 20, 255)
    arr = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA")), min_side=MIN_SIDE))
    assert arr.shape == (150, 150, 3)
    assert arr[10, 10].tolist() == [200, 20, 20] and arr[140, 140].tolist() == [255, 255, 255]
    pal = Image.new("RGB", (600, 600), (40, 80, 210)).quantize(colors=4)
    assert np.asarray(decode_image(encode(pal), min_side=MIN_SIDE))[50, 50].tolist() == [40, 80, 210]


def test_config_carries_the_decode_path():
    fast = PreprocessConfig(299, "bicubic", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), decode="fast")
    assert PreprocessConfig.from_dict(fast.to_dict()) == fast
    old = {"image_size": 64, "resize": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}  # saved before the field
    assert PreprocessConfig.from_dict(old).decode == "exact"
    with pytest.raises(ValueError, match="decode"):
        PreprocessConfig(64, decode="draft")


def test_serving_decodes_the_way_its_config_says():
    """The Triton preprocess model's code path is captioner.preprocess's, per config."""
    data = encode_photo(smooth(128), "jpeg", side=1024)
    for cfg in (EXACT, FAST):
        pre = Preprocessor(cfg, Limits(), normalise=False)
        (got,) = pre.run([np.array([[data]], dtype=np.object_)])
        assert np.array_equal(got[0], prepare_bytes(data, cfg))
    assert not np.array_equal(prepare_bytes(data, EXACT), prepare_bytes(data, FAST)), "the paths do differ on a photo"


def _pillow_only(monkeypatch):
    import captioner.preprocess as pre

    monkeypatch.setattr(pre, "pyspng", None)
    monkeypatch.setattr(pre, "simplejpeg", None)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("side", [None, MIN_SIDE])
def test_libspng_decodes_a_png_to_pillows_pixels(mode, side, monkeypatch):
    """PNGs go through libspng (pyspng, pinned in requirements.txt) where it is installed:
    the pixels must be Pillow's own, on both paths, for every colour type it takes."""
    import captioner.preprocess as pre

    assert pre.pyspng is not None, "pyspng is pinned in requirements.txt: the PNG fast decoder is missing"
    rng = np.random.default_rng(3)
    arr = np.asarray(smooth(700).convert(mode)).copy()
    arr ^= rng.integers(0, 16, arr.shape, dtype=np.uint8)  # detail the filters must carry
    data = encode(Image.fromarray(arr), compress_level=6)
    calls = []
    real = pre.pyspng.load
    monkeypatch.setattr(pre.pyspng, "load", lambda b: calls.append(1) or real(b))
    fast = np.asarray(decode_image(data, min_side=side))
    assert calls, "libspng was not used for an 8-bit PNG"
    _pillow_only(monkeypatch)
    assert np.array_equal(fast, np.asarray(decode_image(data, min_side=side)))


def _rechunked(data: bytes, edit) -> bytes:
    """The PNG with edit(kind, payload) -> payload applied to each chunk, CRCs made valid
    again (so the damage reaches the decoders, not the chunk walk)."""
    out, i = [data[:8]], 8
    while i < len(data):
        (n,) = struct.unpack_from(">I", data, i)
        kind = data[i + 4 : i + 8]
        out.append(_chunk(kind, edit(kind, data[i + 8 : i + 8 + n])))
        i += 12 + n
    return b"".join(out)


def _detailed(mode: str, side: int = 700) -> np.ndarray:
    rng = np.random.default_rng(5)
    arr = np.asarray(smooth(side).convert(mode)).copy()
    arr ^= rng.integers(0, 16, arr.shape, dtype=np.uint8)  # detail the filters must carry
    return arr


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("level", [1, 9])
def test_libdeflate_inflates_and_libspng_unfilters_to_the_same_pixels(mode, level):
    """With libdeflate (deflate, pinned in requirements.txt) installed, a PNG's image data
    (Pillow writes it as many IDAT chunks) is inflated by libdeflate and handed to libspng
    stored: the pixels are the original's, as libspng alone decodes them."""
    import captioner.preprocess as pre

    assert pre.deflate is not None, "deflate is pinned in requirements.txt: the PNG inflater is missing"
    arr = _detailed(mode)
    data = encode(Image.fromarray(arr), compress_level=level)
    assert data.count(b"IDAT") > 1
    remade = pre._inflated(data)
    assert remade is not None and remade.count(b"IDAT") == 1
    assert np.array_equal(pre.pyspng.load(remade), arr)
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(pre.to_rgb(Image.fromarray(arr))))


def test_pngs_libdeflate_cannot_inflate_are_libspngs_to_accept_or_refuse(monkeypatch):
    """A damaged deflate stream (valid CRCs), image data shorter than the header declares,
    or an interlaced PNG: libspng gets the original file and accepts or refuses it exactly
    as without libdeflate."""
    import captioner.preprocess as pre

    data = encode(Image.fromarray(_detailed("RGB", 300)), compress_level=6)

    def damage(kind, payload):
        return payload[:40] + bytes(b ^ 0x5A for b in payload[40:80]) + payload[80:] if kind == b"IDAT" else payload

    damaged = _rechunked(data, damage)
    taller = _rechunked(data, lambda kind, p: p[:4] + struct.pack(">I", 301) + p[8:] if kind == b"IHDR" else p)
    interlaced = _rechunked(data, lambda kind, p: p[:12] + b"\x01" if kind == b"IHDR" else p)
    assert pre._inflated(data) is not None
    for case in (damaged, taller, interlaced):
        assert pre._inflated(case) is None
    with_libdeflate = [reasons(case) for case in (damaged, taller, interlaced)]
    monkeypatch.setattr(pre, "deflate", None)
    assert with_libdeflate == [reasons(case) for case in (damaged, taller, interlaced)]
    assert with_libdeflate[0] == ["corrupt"] * 2 and with_libdeflate[1] == ["corrupt"] * 2


XMP_ORIENTATION_6 = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _text_chunk(key: str, value: str, kind: str = "itxt"):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if kind == "itxt":
        info.add_itxt(key, value)
    else:
        info.add_text(key, value, zip=kind == "ztxt")
    return info


@pytest.mark.parametrize("kind", ["itxt", "text", "ztxt"])
def test_one_chunk_walk_finds_every_place_an_orientation_can_hide_and_every_bad_crc(kind):
    import captioner.preprocess as pre

    plain = encode(smooth(64))
    assert pre._png_walk(plain) == (False, None)
    for key in ("Raw profile type exif", "XML:com.adobe.xmp"):
        assert pre._png_walk(encode(smooth(64), pnginfo=_text_chunk(key, "x", kind)))[0]
    assert pre._png_walk(encode(smooth(64), pnginfo=_text_chunk("Comment", "XML:com.adobe.xmp", kind))) == (False, None)
    bad = bytearray(plain)
    bad[-20] ^= 0xFF  # inside the last IDAT
    assert "bad CRC" in pre._png_walk(bytes(bad))[1]
    assert "truncated" in pre._png_walk(plain[:-5])[1]


def test_pngs_libspng_leaves_to_pillow_decode_as_before(monkeypatch):
    """Palette, 16-bit, grey+alpha, colour-keyed and oriented PNGs are Pillow's: the same result
    with and without libspng."""
    import captioner.preprocess as pre

    exif = Image.Exif()
    exif[0x0112] = 6
    cases = [
        encode(smooth(300).quantize(colors=16)),
        encode(Image.fromarray(np.asarray(smooth(300).convert("L")).astype(np.uint16) * 257), compress_level=1),
        encode(smooth(300).convert("LA")),
        encode(smooth(300), transparency=(0, 0, 0)),
        encode(smooth(300, 200), exif=exif.tobytes()),
        encode(smooth(300, 200), pnginfo=_text_chunk("XML:com.adobe.xmp", XMP_ORIENTATION_6)),
    ]
    got = [np.asarray(decode_image(d, min_side=MIN_SIDE)) for d in cases]
    assert got[4].shape == got[5].shape == (300, 200, 3)  # turned by its EXIF tag, by its XMP
    assert not any(pre._spng_plan(d, Image.open(io.BytesIO(d)))[0] for d in cases)
    _pillow_only(monkeypatch)
    for d, g in zip(cases, got, strict=True):
        assert np.array_equal(g, np.asarray(decode_image(d, min_side=MIN_SIDE)))


def test_jpegs_go_through_libjpeg_turbos_finer_scales(monkeypatch):
    """simplejpeg (pinned) decodes a YCbCr JPEG at libjpeg-turbo's M/8 scales: a 1024 px
    photo for a 299 px model (min side 598) at 5/8 = 640 px, where Pillow's draft (1/2,
    1/4, 1/8 only) must decode it whole. At a scale both have (1/8 for the 64 px model)
    the pixels are Pillow's own."""
    import captioner.preprocess as pre

    assert pre.simplejpeg is not None, "simplejpeg is pinned in requirements.txt: the JPEG fast decoder is missing"
    data = encode_photo(smooth(128), "jpeg", side=1024)
    calls = []
    real = pre.simplejpeg.decode_jpeg
    monkeypatch.setattr(pre.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed_side = decode_side(PreprocessConfig(299, decode="fast"))
    assert decode_image(data, min_side=seed_side).size == (640, 640)
    at_eighth = np.asarray(decode_image(data, min_side=MIN_SIDE))
    assert at_eighth.shape == (128, 128, 3)
    assert len(calls) == 2, "libjpeg-turbo's scaled decode was not used"
    _pillow_only(monkeypatch)
    assert decode_image(data, min_side=seed_side).size == (1024, 1024)
    assert np.array_equal(at_eighth, np.asarray(decode_image(data, min_side=MIN_SIDE)))


def test_the_finer_jpeg_scale_prepares_nearly_the_exact_tensor_for_a_299_px_model():
    data = encode(smooth(1024), "JPEG", quality=95)
    exact, fast = PreprocessConfig(299), PreprocessConfig(299, decode="fast")
    diff = np.abs(preprocess_bytes(data, exact) - preprocess_bytes(data, fast)) * 0.5 * 255
    assert diff.max() <= 3.0 and diff.mean() <= 0.5, (diff.max(), diff.mean())


def test_jpegs_turbojpeg_leaves_to_pillow_decode_as_before(monkeypatch):
    """Grey and CMYK JPEGs, and a JPEG libjpeg warns about, are Pillow's: the same result
    (pixels or refusal) with and without simplejpeg."""
    base = smooth(700)
    damaged = bytearray(encode(base, "JPEG", quality=90))
    damaged[len(damaged) // 2 : len(damaged) // 2 + 8] = b"\x00" * 8
    cases = [encode(base.convert("L"), "JPEG"), encode(base.convert("CMYK"), "JPEG"), bytes(damaged)]

    def outcome(d):
        try:
            return np.asarray(decode_image(d, min_side=MIN_SIDE))
        except ImageError as e:
            return e.reason

    got = [outcome(d) for d in cases]
    _pillow_only(monkeypatch)
    for d, g in zip(cases, got, strict=True):
        want = outcome(d)
        assert type(g) is type(want) and (np.array_equal(g, want) if isinstance(g, np.ndarray) else g == want)
