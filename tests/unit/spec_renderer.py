"""A second, independent program that draws scenes to the dataset spec, docs/shapes-v1.md.

It shares nothing with captioner.scenes but the `Scene` record it returns (so the
spec's checker can judge captions): its own random placement of the objects per the
spec's rules, numpy masks evaluated on a supersampled grid (anti-aliased edges, where
the generator draws hard-edged Pillow shapes), and noise added to the whole image
with different arithmetic. If the default model only knew the generator's pixels,
this is where it would show.

`spec_violations` is an independent reading of the spec's geometric and colour rules,
used to check both programs' scenes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from captioner.scenes import Scene, SceneObject

SIDE = 128
PALETTE = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "black": (30, 30, 30),
}
SHAPE_NAMES = ("circle", "square", "triangle")
SIZE_RANGES = {"small": (18, 26), "large": (38, 50)}
JITTER = 15
EDGE = 4
GAP = 6
SUPERSAMPLE = 4


class SpecRenderer:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    # --- placement ---------------------------------------------------------------

    def _object(self) -> SceneObject:
        r = self.rng
        shape = SHAPE_NAMES[r.integers(len(SHAPE_NAMES))]
        colour = list(PALETTE)[r.integers(len(PALETTE))]
        size = "small" if r.random() < 0.5 else "large"
        lo, hi = SIZE_RANGES[size]
        side = int(r.integers(lo, hi + 1))
        x0 = int(r.integers(EDGE, SIDE - EDGE - side + 1))
        y0 = int(r.integers(EDGE, SIDE - EDGE - side + 1))
        rgb = tuple(int(min(255, max(0, v + r.integers(-JITTER, JITTER + 1)))) for v in PALETTE[colour])
        return SceneObject(shape, colour, size, (x0, y0, x0 + side, y0 + side), rgb)

    def scene(self) -> Scene:
        background = tuple(int(v) for v in self.rng.integers(200, 251, size=3))
        first = self._object()
        if self.rng.random() < 0.5:
            return Scene((first,), background)
        while True:
            second = self._object()
            if not pair_violations(first, second):
                # Random order: which object is drawn/listed first must not matter.
                pair = (first, second) if self.rng.random() < 0.5 else (second, first)
                return Scene(pair, background)

    # --- drawing -----------------------------------------------------------------

    def draw(self, scene: Scene) -> Image.Image:
        k = SUPERSAMPLE
        # Sample points at the centres of k x k sub-pixels; pixel (i, j) covers [j, j+1) x [i, i+1).
        coords = (np.arange(SIDE * k, dtype=np.float64) + 0.5) / k
        ys, xs = np.meshgrid(coords, coords, indexing="ij")
        canvas = np.empty((SIDE, SIDE, 3), np.float64)
        canvas[:] = scene.background
        for o in scene.objects:
            fine = _mask(o, xs, ys)
            cover = fine.reshape(SIDE, k, SIDE, k).mean(axis=(1, 3))[..., None]
            canvas = canvas * (1.0 - cover) + np.asarray(o.rgb, np.float64) * cover
        noise = np.round(self.rng.standard_normal((SIDE, SIDE, 3)) * 6.0).astype(np.int16)
        pixels = np.floor(canvas + 0.5).astype(np.int16) + noise
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    def sample(self) -> tuple[Image.Image, Scene]:
        s = self.scene()
        return self.draw(s), s


def _mask(o: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = o.box
    side = x1 - x0
    if o.shape == "square":
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if o.shape == "circle":
        cx, cy, r = (x0 + x1) / 2.0, (y0 + y1) / 2.0, side / 2.0
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    # Isosceles triangle: apex at the top centre of the box, base along its bottom edge.
    cx = (x0 + x1) / 2.0
    depth = (ys - y0) / side  # 0 at the apex, 1 at the base
    return (ys >= y0) & (ys < y1) & (np.abs(xs - cx) <= depth * side / 2.0)


# --- the spec's rules, read independently ---------------------------------------


def pair_violations(a: SceneObject, b: SceneObject) -> list[str]:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    out = []
    # Boxes are half-open [x0, x1): the empty space between them is the gap.
    horizontal_gap = max(bx0 - ax1, ax0 - bx1)
    vertical_gap = max(by0 - ay1, ay0 - by1)
    if horizontal_gap < GAP and vertical_gap < GAP:
        out.append(f"boxes {a.box} and {b.box} are closer than {GAP} px")
    dx = abs((ax0 + ax1) - (bx0 + bx1)) / 2.0
    dy = abs((ay0 + ay1) - (by0 + by1)) / 2.0
    big, small = max(dx, dy), min(dx, dy)
    if big < 30:
        out.append(f"centre offset ({dx}, {dy}) has no axis of at least 30 px")
    if big < 1.5 * small:
        out.append(f"centre offset ({dx}, {dy}) has no dominant axis (ratio < 1.5)")
    return out


def spec_violations(scene: Scene) -> list[str]:
    out = []
    if not all(200 <= v <= 250 for v in scene.background):
        out.append(f"background {scene.background} outside [200, 250]")
    if len(scene.objects) not in (1, 2):
        out.append(f"{len(scene.objects)} objects")
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        side = x1 - x0
        if y1 - y0 != side:
            out.append(f"{o.box} is not square")
        lo, hi = SIZE_RANGES.get(o.size, (0, -1))
        if not lo <= side <= hi:
            out.append(f"{o.size} object has side {side}")
        if x0 < EDGE or y0 < EDGE or x1 > SIDE - EDGE or y1 > SIDE - EDGE:
            out.append(f"{o.box} breaks the {EDGE} px margin")
        if o.shape not in SHAPE_NAMES:
            out.append(f"unknown shape {o.shape}")
        ref = PALETTE.get(o.colour)
        if ref is None or any(abs(v - r) > JITTER for v, r in zip(o.rgb, ref)):
            out.append(f"{o.colour} rgb {o.rgb} is more than {JITTER} from {ref}")
    if len(scene.objects) == 2:
        out += pair_violations(*scene.objects)
    return out
