"""shapes-v1 scenes re-encoded the way other services send images: photo-sized (the
128 px canvas upscaled to about 1024 px), as JPEG at quality 90 or as PNG, some stored
turned with an EXIF orientation tag, as phone cameras write them. The scene the tag
shows is the drawn one, so its ground truth still holds (docs/shapes-v1.md: the served
model must accept any side from 64 to 1024 px, JPEG at quality 75 or better).

Used by the build's decode gate (builder/decode_gate.py), the benchmark's photo
workloads (bench/photos.py) and the tests."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import Scene, random_scene, render

PHOTO_SIDE = 1024
JPEG_QUALITY = 90
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that turns the displayed picture into the stored
# one (the inverse of what a viewer, or ImageOps.exif_transpose, applies).
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
FORMATS = ("jpeg", "png")


@dataclass(frozen=True)
class Photo:
    data: bytes
    fmt: str  # "jpeg" | "png"
    side: int
    orientation: int  # EXIF orientation tag, 1 = none
    scene: Scene

    @property
    def label(self) -> str:
        turned = f", EXIF orientation {self.orientation}" if self.orientation != 1 else ""
        return f"{self.side} px {self.fmt}{turned}"


def encode_photo(
    img: Image.Image,
    fmt: str = "jpeg",
    side: int = PHOTO_SIDE,
    quality: int = JPEG_QUALITY,
    orientation: int = 1,
    png_compress_level: int = 6,
) -> bytes:
    """`img` upscaled to side x side (bicubic) and encoded; with `orientation` != 1 the
    pixels are stored turned and the EXIF tag says how to turn them back."""
    if fmt not in FORMATS:
        raise ValueError(f"photo format must be one of {FORMATS}, got {fmt!r}")
    if orientation != 1 and orientation not in _STORE:
        raise ValueError(f"EXIF orientation must be 1-8, got {orientation}")
    big = img.resize((side, side), Image.Resampling.BICUBIC) if img.size != (side, side) else img
    kw: dict = {}
    if orientation != 1:
        big = big.transpose(_STORE[orientation])
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    if fmt == "jpeg":
        big.save(buf, "JPEG", quality=quality, **kw)
    else:
        big.save(buf, "PNG", compress_level=png_compress_level, **kw)
    return buf.getvalue()


def photos(
    n: int,
    seed: int,
    fmt: str = "jpeg",
    side: int = PHOTO_SIDE,
    quality: int = JPEG_QUALITY,
    orientations: tuple[int, ...] = (1,),
    png_compress_level: int = 6,
) -> list[Photo]:
    """`n` fresh scenes (drawn as captioner.scenes.encoded_scenes draws them for the same
    seed), each encoded as one photo; orientations cycle over the images."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        o = orientations[i % len(orientations)]
        data = encode_photo(render(scene, nrng), fmt, side, quality, o, png_compress_level)
        out.append(Photo(data, fmt, side, o, scene))
    return out
