"""shapes-v1: scenes drawn to the dataset spec (docs/shapes-v1.md), their captions,
and the spec's definition of a correct caption.

The generator is one implementation of the spec, not its definition; the
checker (`caption_is_correct`) is what every quality figure in the project uses.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 128
MARGIN = 4
MIN_GAP = 6
MIN_DOMINANT = 30
DOMINANT_RATIO = 1.5
NOISE_SIGMA = 6.0
BG_RANGE = (200, 250)
COLOUR_JITTER = 15

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (18, 26), "large": (38, 50)}

ONE_OBJECT_TEMPLATES = (
    "a {c} {p}",
    "a {s} {c} {p}",
    "there is a {s} {c} {p}",
    "a single {c} {p}",
    "one {s} {c} {p}",
)
TWO_OBJECT_TEMPLATES = (
    "a {cA} {pA} {rel} a {cB} {pB}",
    "a {cB} {pB} {inv} a {cA} {pA}",
    "a {sA} {cA} {pA} {rel} a {sB} {cB} {pB}",
    "a {sB} {cB} {pB} {inv} a {sA} {cA} {pA}",
    "a {cA} {pA} and a {cB} {pB}",
)
SAME_TWO_TEMPLATE = "two {c} {p}s"
RELATIONS = {"horizontal": ("to the left of", "to the right of"), "vertical": ("above", "below")}
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), side = x1 - x0
    rgb: tuple[int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"background": list(self.background), "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(d: dict) -> Scene:
        objs = tuple(SceneObject(o["shape"], o["colour"], o["size"], tuple(o["box"]), tuple(o["rgb"])) for o in d["objects"])
        return Scene(objs, tuple(d["background"]))


def _boxes_ok(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Spec: no overlap, >= 6 px apart, and a dominant axis between centres."""
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    if max(gap_x, gap_y) < MIN_GAP:
        return False
    dx = abs((a[0] + a[2]) - (b[0] + b[2])) / 2.0
    dy = abs((a[1] + a[3]) - (b[1] + b[3])) / 2.0
    big, small = max(dx, dy), min(dx, dy)
    return big >= MIN_DOMINANT and big >= DOMINANT_RATIO * small


def _random_object(rng: random.Random) -> SceneObject:
    shape = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    size = rng.choice(list(SIZES))
    side = rng.randint(*SIZES[size])
    x0 = rng.randint(MARGIN, CANVAS - MARGIN - side)
    y0 = rng.randint(MARGIN, CANVAS - MARGIN - side)
    r, g, b = COLOURS[colour]

    def jitter(v: int) -> int:
        return int(np.clip(v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER), 0, 255))

    rgb = (jitter(r), jitter(g), jitter(b))
    return SceneObject(shape, colour, size, (x0, y0, x0 + side, y0 + side), rgb)


def random_scene(rng: random.Random) -> Scene:
    background = (rng.randint(*BG_RANGE), rng.randint(*BG_RANGE), rng.randint(*BG_RANGE))
    first = _random_object(rng)
    if rng.random() < 0.5:
        return Scene((first,), background)
    while True:
        second = _random_object(rng)
        if _boxes_ok(first.box, second.box):
            return Scene((first, second), background)


def relation(scene: Scene) -> tuple[SceneObject, SceneObject, str, str]:
    """(A, B, rel, inv) with A left of / above B, per the dominant axis."""
    a, b = scene.objects
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        first, second = (a, b) if ax < bx else (b, a)
        rel, inv = RELATIONS["horizontal"]
    else:
        first, second = (a, b) if ay < by else (b, a)
        rel, inv = RELATIONS["vertical"]
    return first, second, rel, inv


def all_captions(scene: Scene) -> list[str]:
    if len(scene.objects) == 1:
        o = scene.objects[0]
        caps = [t.format(s=o.size, c=o.colour, p=o.shape) for t in ONE_OBJECT_TEMPLATES]
    else:
        a, b, rel, inv = relation(scene)
        fields = dict(cA=a.colour, pA=a.shape, sA=a.size, cB=b.colour, pB=b.shape, sB=b.size, rel=rel, inv=inv)
        templates = list(TWO_OBJECT_TEMPLATES)
        if a.colour == b.colour and a.shape == b.shape:
            templates[-1] = SAME_TWO_TEMPLATE.replace("{c}", "{cA}").replace("{p}", "{pA}")
        caps = [t.format(**fields) for t in templates]
    return list(dict.fromkeys(caps))  # distinct, order kept


def scene_captions(scene: Scene, rng: random.Random) -> list[str]:
    caps = all_captions(scene)
    rng.shuffle(caps)
    return caps[:CAPTIONS_PER_IMAGE]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Flat fills on a flat background, then per-pixel Gaussian noise, clipped."""
    img = Image.new("RGB", (CANVAS, CANVAS), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=o.rgb)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=o.rgb)
        else:
            draw.polygon([((x0 + x1 - 1) / 2.0, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=o.rgb)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, NOISE_SIGMA, (CANVAS, CANVAS, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def encoded_scenes(n: int, seed: int, fmt: str = "PNG", **save_args) -> list[tuple[bytes, Scene]]:
    """`n` scenes rendered and encoded in memory, with their ground truth: what a
    client sends (samples, benchmarks, measurements)."""
    import io

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        buf = io.BytesIO()
        render(scene, nrng).save(buf, fmt, **save_args)
        out.append((buf.getvalue(), scene))
    return out


def generate_split(out_dir: str | Path, split: str, count: int, seed: int, progress: bool = True) -> Path:
    """Write `<out>/<split>/NNNNNN.png` and `<out>/captions_<split>.json` (COCO captions layout,
    plus a `scenes` list so tests and evaluation can check captions against ground truth)."""
    from .progress import bar

    out = Path(out_dir)
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    images: list[dict] = []
    annotations: list[dict] = []
    scenes: list[dict] = []
    for i in bar(range(count), desc=f"shapes-v1 {split}", disable=not progress, unit="img"):
        scene = random_scene(rng)
        name = f"{i:06d}.png"
        render(scene, nrng).save(img_dir / name, compress_level=1)
        images.append({"id": i, "file_name": f"{split}/{name}", "width": CANVAS, "height": CANVAS})
        for cap in scene_captions(scene, rng):
            annotations.append({"id": len(annotations), "image_id": i, "caption": cap})
        scenes.append({"image_id": i, **scene.to_json()})
    ann_path = out / f"captions_{split}.json"
    ann_path.write_text(
        json.dumps(
            {
                "info": {"description": "shapes-v1", "split": split, "seed": seed, "count": count},
                "images": images,
                "annotations": annotations,
                "scenes": scenes,
            }
        )
    )
    return ann_path


# --- the correctness rule (docs/shapes-v1.md, "When a caption is correct") ---------

_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_PHRASE = re.compile(
    rf"^(?:there is a|a single|a|one)\s+(?:(?P<size>small|large)\s+)?(?P<colour>{_COLOUR_RE})\s+(?P<shape>{_SHAPE_RE})$"
)
_TWO = re.compile(rf"^two\s+(?P<colour>{_COLOUR_RE})\s+(?P<shape>{_SHAPE_RE})s$")
_REL_SPLIT = re.compile(r"\s+(to the left of|to the right of|above|below|and)\s+")


def parse_caption(caption: str) -> tuple[list[dict], str | None] | None:
    """Named objects (colour, shape, size or None) and the joining word; None if unparseable."""
    text = " ".join(caption.strip().lower().split())
    two = _TWO.match(text)
    if two:
        one = {"colour": two["colour"], "shape": two["shape"], "size": None}
        return [one, dict(one)], "and"
    parts = _REL_SPLIT.split(text)
    if len(parts) not in (1, 3):
        return None
    phrases = [parts[0]] if len(parts) == 1 else [parts[0], parts[2]]
    named: list[dict] = []
    for p in phrases:
        m = _PHRASE.match(p)
        if not m:
            return None
        named.append({"colour": m["colour"], "shape": m["shape"], "size": m["size"]})
    return named, (parts[1] if len(parts) == 3 else None)


def _relation_holds(first: SceneObject, second: SceneObject, word: str) -> bool:
    (fx, fy), (sx, sy) = first.centre, second.centre
    horizontal = abs(fx - sx) >= abs(fy - sy)
    return {
        "to the left of": horizontal and fx < sx,
        "to the right of": horizontal and fx > sx,
        "above": not horizontal and fy < sy,
        "below": not horizontal and fy > sy,
        "and": True,
    }[word]


def caption_is_correct(caption: str, scene: Scene) -> bool:
    parsed = parse_caption(caption)
    if parsed is None:
        return False
    named, word = parsed
    if len(named) != len(scene.objects):
        return False
    for perm in itertools.permutations(scene.objects):
        if all(
            n["colour"] == o.colour and n["shape"] == o.shape and (n["size"] is None or n["size"] == o.size)
            for n, o in zip(named, perm)
        ) and (word is None or _relation_holds(perm[0], perm[1], word)):
            return True
    return False
