"""The request pool: shapes-v1 scenes rendered once, encoded as PNG or JPEG at mixed
sizes (the spec's 64-1024 px range), each kept with its scene so captions can be checked.

The default mix is what other services send, photos rather than thumbnails: sides drawn
from DEFAULT_SIZES (6 in 10 images at 1024 px, one each at 768, 512, 256 and 128 px) and
90 % JPEG (quality 75-95), 10 % PNG. The decode such images cost is most of a caption's
work on CPU (docs/bench.md, photo workloads), so a pool of small images overstates
what a deployment serves. LOADTEST_POOL_SIZES / LOADTEST_JPEG_SHARE change it."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from captioner.scenes import CANVAS, Scene, random_scene, render

DEFAULT_SIZES = (1024, 1024, 1024, 1024, 1024, 1024, 768, 512, 256, 128)
DEFAULT_JPEG_SHARE = 0.9


@dataclass(frozen=True)
class PoolImage:
    data: bytes
    fmt: str  # "png" | "jpeg"
    size: int  # side in pixels
    scene: Scene

    @property
    def label(self) -> str:
        return f"{self.fmt} {self.size}px"


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    if not sizes or any(not 64 <= s <= 1024 for s in sizes):
        raise ValueError(f"pool sizes must be a comma list of sides within 64-1024 px, got {text!r}")
    return sizes


def build_pool(count: int, seed: int = 0, sizes=DEFAULT_SIZES, jpeg_share: float = DEFAULT_JPEG_SHARE) -> list[PoolImage]:
    if count < 1:
        raise ValueError(f"pool size must be >= 1, got {count}")
    if not 0.0 <= jpeg_share <= 1.0:
        raise ValueError(f"jpeg share must be within [0, 1], got {jpeg_share}")
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        scene = random_scene(rng)
        img = render(scene, nrng)
        size = rng.choice(list(sizes))
        if size != CANVAS:
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        if rng.random() < jpeg_share:
            fmt = "jpeg"
            img.save(buf, format="JPEG", quality=rng.randint(75, 95))
        else:
            fmt = "png"
            img.save(buf, format="PNG", compress_level=1)  # fast to build; size is not what is under test
        pool.append(PoolImage(buf.getvalue(), fmt, size, scene))
    return pool
