"""Images in, bytes out: what the client accepts as an image and how it goes on the wire."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from client.results import CaptionError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


def probe_image() -> bytes:
    """A small valid image (a red square on white, 32 px PNG) made in memory, for health
    checks and endpoint probes: one real pass through the whole ensemble, cheaply."""
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste((220, 30, 30), (10, 10, 22, 22))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_name(image: ImageLike, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return getattr(image, "filename", None) or f"<image #{index}>"
    return f"<bytes #{index}>"


def encode_image(image: ImageLike, name: str | None = None) -> bytes:
    """Encoded image file bytes for the wire. Paths are read as they are, bytes pass through
    (the server decodes and validates both), Pillow images are written as PNG."""
    name = name or image_name(image, 0)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise CaptionError(name, f"cannot read file: {e.strerror or e}") from None
    if isinstance(image, Image.Image):
        # PNG keeps every mode the server accepts losslessly; others (CMYK, I;16, ...) go through RGB.
        img = image if image.mode in ("RGB", "RGBA", "L", "LA", "P", "1") else image.convert("RGB")
        buf = io.BytesIO()
        try:
            img.save(buf, format="PNG")
        except (OSError, ValueError) as e:
            raise CaptionError(name, f"cannot encode Pillow image as PNG: {e}") from None
        return buf.getvalue()
    raise CaptionError(name, f"unsupported image type {type(image).__name__} (want a path, bytes or a Pillow image)")


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories walked recursively for image extensions, sorted."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(p)  # a missing file becomes that image's error, not a crash
    return found
