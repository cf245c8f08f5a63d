"""Image decoding and preprocessing: the one definition used by training, export,
the CLI and the Triton `preprocess` model.

`prepare_bytes` / `prepare_path` decode, validate and resize to the model's size (uint8
HWC) the way the config's `decode` says; `normalize` turns a batch of those into the
float tensor the encoder takes. Normalisation lives here, not in the encoder graph, so
there is exactly one place that does it.

Two decode paths (`PreprocessConfig.decode`):
  exact  every image decoded at full size, then resized to the model's side.
  fast   only the work the model needs: a JPEG is decoded at a reduced DCT scale
         (libjpeg-turbo's M/8, M = 1..8, through `simplejpeg`; Pillow's `draft`, 1/2,
         1/4 or 1/8, where simplejpeg is missing or refuses the file), any other format
         is decoded and then box-reduced by an integer factor (`Image.reduce`), both
         only as far as every side stays >= FAST_DECODE_MARGIN x the model's input
         side; the same final antialiased resize follows. An image no reduction fits
         (other formats: under twice that side; a JPEG: under 8/7 of it) is decoded
         exactly as on the exact path. Limits, checks and errors are the same on both
         paths: a JPEG simplejpeg cannot decode without a warning goes to Pillow, which
         accepts or refuses it as the exact path does.

On both paths an 8-bit grey/RGB(A) PNG is decoded by libspng (`pyspng`) when it is
installed: the same pixels as Pillow's decoder at about half its time on photo-sized
files. Inflating the image data is most of that time; where libdeflate (`deflate`) is
installed it inflates a non-interlaced PNG's data (about 3x zlib's speed) and libspng
unfilters the result, handed to it as a stored (uncompressed) stream: the same pixels
again. Without these (a training image may lack them), or with CAPTIONER_PNG_DECODER
set to `libspng` (libspng inflates) or `pillow` (Pillow decodes every PNG) for
before/after measurements, the slower decoders give the same pixels. Likewise
CAPTIONER_JPEG_DECODER=pillow leaves the fast path's JPEGs to Pillow's `draft`.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
from PIL import Image, ImageFile, ImageOps

PNG_DECODERS = ("libdeflate", "libspng", "pillow")
PNG_DECODER = os.environ.get("CAPTIONER_PNG_DECODER", "libdeflate")
if PNG_DECODER not in PNG_DECODERS:
    raise ValueError(f"CAPTIONER_PNG_DECODER must be one of {PNG_DECODERS}, got {PNG_DECODER!r}")
try:
    import pyspng
except ImportError:  # optional: Pillow decodes PNGs without it, to the same pixels
    pyspng = None
try:
    import deflate
except ImportError:  # optional: libspng inflates with zlib without it, to the same pixels
    deflate = None  # type: ignore[assignment]
if PNG_DECODER == "pillow":
    pyspng = None
if PNG_DECODER != "libdeflate":
    deflate = None  # type: ignore[assignment]
JPEG_DECODERS = ("turbojpeg", "pillow")
JPEG_DECODER = os.environ.get("CAPTIONER_JPEG_DECODER", "turbojpeg")
if JPEG_DECODER not in JPEG_DECODERS:
    raise ValueError(f"CAPTIONER_JPEG_DECODER must be one of {JPEG_DECODERS}, got {JPEG_DECODER!r}")
try:
    import simplejpeg
except ImportError:  # optional: the fast path falls back to Pillow's coarser draft scales
    simplejpeg = None
if JPEG_DECODER == "pillow":
    simplejpeg = None

# Decoding a truncated file must fail, never yield a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # well above the 1024 x 1024 the spec asks for, far below a bomb

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
DECODES = ("exact", "fast")
# The fast path's rule: the decoded image keeps every side at least this many times the
# model's input side, so the final antialiased resize still averages at least two
# decoded pixels per output pixel along each axis (its filter, not the cheap reduction
# before it, shapes the result). The model's input is square, so the rule is the same
# whichever way an EXIF orientation turns the image.
FAST_DECODE_MARGIN = 2


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    resize: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # "exact" | "fast" (module docstring). A config saved before the field existed loads
    # as "exact", the path it was made with; the build gates "fast" and records its choice
    # in the repository's preprocess.json (builder/decode_gate.py).
    decode: str = "exact"

    def __post_init__(self):
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(int(d["image_size"]), str(d["resize"]), tuple(d["mean"]), tuple(d["std"]), str(d.get("decode", "exact")))


def decode_side(cfg: PreprocessConfig) -> int | None:
    """The smallest side the config's decode keeps (None: full size, the exact path)."""
    return FAST_DECODE_MARGIN * cfg.image_size if cfg.decode == "fast" else None


class MeanStd(TypedDict):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET: MeanStd = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class ImageError(ValueError):
    """A request's image cannot be used. `reason` is a short metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def decode_image(data: bytes | bytearray | memoryview, limits: Limits | None = None, min_side: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB Pillow image, EXIF-transposed, or ImageError naming the problem.

    min_side: the fast path: decode no larger than needed to keep both sides >= min_side
    (JPEG at a reduced DCT scale, other formats box-reduced after decoding); None decodes
    at full size. The byte and pixel limits apply to the size the header declares."""
    limits = limits or Limits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError("bad_type", f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)  # no copy for bytes
    n = len(data)
    if n == 0:
        raise ImageError("empty", "image is empty (0 bytes)")
    if n > limits.max_bytes:
        raise ImageError("too_large", f"image is {n} bytes, over the limit of {limits.max_bytes}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow raises several types for junk
        # Pillow refuses 0-pixel images and huge ones (DecompressionBombError) before we can
        # look at their size; the header still tells the client what is wrong.
        size = _declared_size(data)
        if size is not None and (size[0] == 0 or size[1] == 0):
            raise ImageError("zero_size", f"image has no pixels ({size[0]}x{size[1]})") from None
        if isinstance(e, Image.DecompressionBombError):
            what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else str(e)
            raise ImageError("too_many_pixels", f"image is {what}, over the limit of {limits.max_pixels}") from None
        raise ImageError("not_an_image", f"bytes are not a decodable image ({type(e).__name__})") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError("zero_size", f"image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels:
        raise ImageError("too_many_pixels", f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
    fmt = img.format
    try:
        if fmt == "PNG" and (spng := _spng_plan(data, img))[0]:
            if spng[1]:  # libspng, as pyspng sets it up, decodes past bad CRCs
                raise ValueError(spng[1])
            img = Image.fromarray(pyspng.load(_inflated(data) or data))
        elif min_side and fmt in ("JPEG", "MPO") and (scaled := _turbo_scaled(data, img, min_side)) is not None:
            img = scaled
        else:
            if min_side and fmt in ("JPEG", "MPO") and min(w, h) >= 2 * min_side:
                # libjpeg's scaled IDCT: the largest of 1/8, 1/4, 1/2 that keeps both sides
                # >= min_side (Pillow rounds the scale down, so the result never falls short).
                img.draft("RGB", (min_side, min_side))
            img.load()
            img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise ImageError("corrupt", f"image data is truncated or corrupt ({fmt}: {e})") from None
    img = to_rgb(img)
    if min_side:
        k = min(img.size) // min_side
        if k >= 2:
            img = img.reduce(k)  # an integer box: every decoded pixel counted once
    return img


# What ImageOps.exif_transpose does for each EXIF orientation.
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _turbo_scaled(data: bytes, img: Image.Image, min_side: int) -> Image.Image | None:
    """A YCbCr JPEG at the smallest libjpeg-turbo scale (M/8) that keeps both sides >=
    min_side, EXIF-transposed; None (Pillow decodes it) without simplejpeg, for grey or
    CMYK JPEGs, or when libjpeg reports anything at all: Pillow then accepts or refuses
    the file exactly as on the exact path."""
    if simplejpeg is None or img.mode != "RGB" or min(img.size) <= min_side:
        return None
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_side, min_width=min_side, strict=True)
    except Exception:  # ValueError for anything libjpeg reports; whatever it is, Pillow decides
        return None
    # Pillow's own reading of the orientation (EXIF, else XMP), as exif_transpose uses it.
    method = _EXIF_TRANSPOSE.get(img.getexif().get(0x0112, 1))
    out = Image.fromarray(arr)
    return out.transpose(method) if method is not None else out


# PNG colour types libspng hands back as Pillow's own modes: grey, RGB, RGBA (pyspng has no
# grey+alpha output).
_SPNG_COLOUR_TYPES = (0, 2, 6)
# Where a PNG can say how it is oriented (Pillow's exif_transpose reads all three): an eXIf
# chunk, or a text chunk with one of these keywords.
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PNG_ORIENTATION_KEYS = (b"Raw profile type exif", b"XML:com.adobe.xmp")


def _png_walk(data: bytes) -> tuple[bool, str | None]:
    """One walk over a PNG's chunks up to IEND: (whether one can carry an orientation, what
    is wrong with the file: a chunk cut short or with a bad CRC; None when nothing)."""
    view, i, oriented = memoryview(data), 8, False
    while True:
        if i + 12 > len(data):
            return oriented, "truncated before IEND"
        (length,) = struct.unpack_from(">I", data, i)
        end = i + 8 + length
        kind = data[i + 4 : i + 8]
        if end + 4 > len(data):
            return oriented, f"truncated {kind!r} chunk"
        if kind == b"eXIf" or (
            kind in _PNG_TEXT_CHUNKS and bytes(view[i + 8 : min(end, i + 88)]).split(b"\0", 1)[0] in _PNG_ORIENTATION_KEYS
        ):
            oriented = True
        if zlib.crc32(view[i + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return oriented, f"bad CRC in {kind!r} chunk"
        if kind == b"IEND":
            return oriented, None
        i = end + 4


def _spng_plan(data: bytes, img: Image.Image) -> tuple[bool, str | None]:
    """(whether libspng decodes this PNG to exactly Pillow's pixels, what is wrong with the
    file or None). libspng takes 8 bits per sample, no palette, no tRNS colour key, and
    no chunk that could carry an orientation (Pillow handles those); only then are the
    chunks walked."""
    if pyspng is None or len(data) < 29 or data[24] != 8 or data[25] not in _SPNG_COLOUR_TYPES or "transparency" in img.info:
        return False, None
    oriented, problem = _png_walk(data)
    return not oriented, problem


# Samples per pixel of the colour types libspng takes.
_CHANNELS = {0: 1, 2: 3, 6: 4}


def _inflated(data: bytes) -> bytes | None:
    """An 8-bit, non-interlaced PNG whose chunks `_png_walk` found whole and sound, re-made
    as signature, IHDR, one IDAT holding its filtered rows inflated by libdeflate and
    stored uncompressed, and IEND: for libspng to unfilter, the same pixels as the
    original (tested). None, and libspng decodes the original and accepts or refuses it
    as before, without libdeflate, for an interlaced PNG, or when the data does not
    inflate to exactly the rows the header declares."""
    if deflate is None or data[28] != 0:
        return None
    width, height = struct.unpack_from(">II", data, 16)
    rows = height * (1 + width * _CHANNELS[data[25]])  # a filter byte, then the samples
    view, i, parts = memoryview(data), 8, []
    while (kind := data[i + 4 : i + 8]) != b"IEND":
        (length,) = struct.unpack_from(">I", data, i)
        if kind == b"IDAT":
            parts.append(view[i + 8 : i + 8 + length])
        i += 12 + length
    try:
        raw = memoryview(deflate.zlib_decompress(b"".join(parts), rows))  # at most `rows` bytes
    except Exception:  # deflate.DeflateError for a bad stream or one longer than the rows
        return None
    if len(raw) != rows:
        return None
    # A zlib stream of stored deflate blocks (at most 65,535 bytes each), checksummed with
    # libdeflate's adler32 and crc32; the only copy of the rows is the final join.
    body: list[bytes | memoryview] = [b"IDAT", b"\x78\x01"]
    for start in range(0, len(raw), _STORED_MAX):
        block = raw[start : start + _STORED_MAX]
        last = start + _STORED_MAX >= len(raw)
        body += [struct.pack("<BHH", last, len(block), 0xFFFF ^ len(block)), block]
    body.append(struct.pack(">I", deflate.adler32(raw)))
    crc = 0
    for piece in body:
        crc = deflate.crc32(piece, crc)
    length = sum(len(piece) for piece in body) - 4
    return b"".join((data[:33], struct.pack(">I", length), *body, struct.pack(">I", crc), _IEND))


_STORED_MAX = 65535
_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, BMP or JPEG header, without decoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:2] == b"\xff\xd8":  # JPEG: walk the segments to the frame header (SOFn)
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Transparent pixels are composited on white, not left as their hidden colour."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def prepare(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image -> uint8 [S, S, 3] at the model's size."""
    img = to_rgb(img)
    s = cfg.image_size
    if img.size != (s, s):
        img = img.resize((s, s), _RESAMPLE[cfg.resize])
    return np.asarray(img, dtype=np.uint8)


def normalize(batch_hwc: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 [N, S, S, 3] (or one [S, S, 3]) -> float32 [N, 3, S, S] (or [3, S, S])."""
    x = batch_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def normalize_tensor(batch_nhwc, cfg: PreprocessConfig, channels_last: bool = False):
    """`normalize` for a uint8 [N, S, S, 3] torch tensor on any device, with the same
    float32 arithmetic: images travel to a GPU as bytes and are normalised there.
    channels_last keeps the NHWC layout in memory (what cuDNN's fastest convolutions
    read); otherwise the result is contiguous NCHW."""
    import torch

    x = batch_nhwc.to(torch.float32) / 255.0
    x = (x - torch.tensor(cfg.mean, dtype=torch.float32, device=x.device)) / torch.tensor(
        cfg.std, dtype=torch.float32, device=x.device
    )
    x = x.permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def prepare_bytes(data: bytes | bytearray | memoryview, cfg: PreprocessConfig, limits: Limits | None = None) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3], decoded the way `cfg.decode` says."""
    return prepare(decode_image(data, limits, decode_side(cfg)), cfg)


def preprocess_bytes(data: bytes, cfg: PreprocessConfig, limits: Limits | None = None) -> np.ndarray:
    """Encoded image -> float32 [3, S, S]: what the encoder takes."""
    return normalize(prepare_bytes(data, cfg, limits), cfg)


def read_path(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ImageError("unreadable", f"cannot read {path}: {e.strerror or e}") from None


def load_path(path: str | Path, limits: Limits | None = None, min_side: int | None = None) -> Image.Image:
    return decode_image(read_path(path), limits, min_side)


def prepare_path(path: str | Path, cfg: PreprocessConfig, limits: Limits | None = None) -> np.ndarray:
    """An image file -> uint8 [S, S, 3], decoded the way `cfg.decode` says."""
    return prepare_bytes(read_path(path), cfg, limits)
