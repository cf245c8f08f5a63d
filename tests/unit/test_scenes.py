"""The generator against the spec (docs/shapes-v1.md), read independently here
and in spec_renderer.py, and the spec's correctness rule."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from spec_renderer import PALETTE, SpecRenderer, spec_violations

from captioner import scenes as sc
from captioner.scenes import Scene, SceneObject, all_captions, caption_is_correct, parse_caption

N_SCENES = 3000


@pytest.fixture(scope="module")
def generated():
    rng = random.Random(2024)
    return [sc.random_scene(rng) for _ in range(N_SCENES)]


def spec_captions(scene: Scene) -> set[str]:
    """Every caption the spec's templates allow for a scene, written from the spec."""
    if len(scene.objects) == 1:
        (o,) = scene.objects
        s, c, p = o.size, o.colour, o.shape
        return {f"a {c} {p}", f"a {s} {c} {p}", f"there is a {s} {c} {p}", f"a single {c} {p}", f"one {s} {c} {p}"}
    a, b = scene.objects
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) > abs(ay - by):
        first, second = (a, b) if ax < bx else (b, a)
        rel, inv = "to the left of", "to the right of"
    else:
        first, second = (a, b) if ay < by else (b, a)
        rel, inv = "above", "below"
    A = f"{first.colour} {first.shape}"
    B = f"{second.colour} {second.shape}"
    sA, sB = f"{first.size} {A}", f"{second.size} {B}"
    last = f"two {first.colour} {first.shape}s" if A == B else f"a {A} and a {B}"
    return {f"a {A} {rel} a {B}", f"a {B} {inv} a {A}", f"a {sA} {rel} a {sB}", f"a {sB} {inv} a {sA}", last}


def obj(shape="circle", colour="red", size="small", x=10, y=10, side=20):
    return SceneObject(shape, colour, size, (x, y, x + side, y + side), PALETTE[colour])


def test_generated_scenes_follow_the_spec(generated):
    bad = [(s, v) for s in generated if (v := spec_violations(s))]
    assert not bad, f"{len(bad)} of {len(generated)} scenes break the spec, e.g. {bad[:2]}"


def test_attributes_are_drawn_evenly(generated):
    counts = Counter(len(s.objects) for s in generated)
    assert 0.45 < counts[1] / N_SCENES < 0.55
    objects = [o for s in generated for o in s.objects]
    singles = [s.objects[0] for s in generated if len(s.objects) == 1]
    # Placement rejects more large second objects, so sizes are even only before it.
    for attr, values, pool in (
        ("shape", sc.SHAPES, objects),
        ("colour", list(PALETTE), objects),
        ("size", ("small", "large"), singles),
    ):
        seen = Counter(getattr(o, attr) for o in pool)
        assert set(seen) == set(values)
        share = min(seen.values()) / max(seen.values())
        assert share > 0.8, f"{attr} is drawn unevenly: {seen}"
    sides = {o.box[2] - o.box[0] for o in objects}
    assert sides == set(range(18, 27)) | set(range(38, 51)), "every integer side in both ranges occurs"
    jitter = {o.rgb[0] - PALETTE[o.colour][0] for o in objects if o.colour != "yellow"}
    assert jitter == set(range(-15, 16))


def test_both_axes_and_tight_pairs_occur(generated):
    pairs = [s for s in generated if len(s.objects) == 2]
    rels = Counter(sc.relation(s)[2] for s in pairs)
    assert rels["to the left of"] > 0.3 * len(pairs) and rels["above"] > 0.3 * len(pairs)

    # The rules bind: some pairs sit close to the limits.
    def gap(s):
        a, b = (o.box for o in s.objects)
        return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])

    assert min(gap(s) for s in pairs) <= 8


def test_captions_are_the_spec_templates(generated):
    rng = random.Random(7)
    for s in generated:
        caps = sc.scene_captions(s, rng)
        allowed = spec_captions(s)
        assert len(caps) == len(set(caps)) == min(5, len(allowed))
        assert set(caps) <= allowed, (caps, allowed)
        assert set(all_captions(s)) == allowed
        for c in caps:
            assert c == c.lower() and " ".join(c.split()) == c and c.replace(" ", "").isalpha()


def test_same_colour_and_shape_pair_uses_two_template():
    s = Scene((obj("square", "blue", "small", 10, 50), obj("square", "blue", "large", 60, 40, 40)), (220, 220, 220))
    caps = all_captions(s)
    assert "two blue squares" in caps
    assert not any(" and " in c for c in caps)
    assert "a small blue square to the left of a large blue square" in caps
    assert len(caps) == 5


def test_relation_follows_the_dominant_axis_and_image_y_downwards():
    top = obj("circle", "red", "small", 50, 10)
    bottom = obj("triangle", "green", "small", 52, 80)
    s = Scene((bottom, top), (210, 210, 210))  # listed bottom first on purpose
    assert "a red circle above a green triangle" in all_captions(s)
    assert "a green triangle below a red circle" in all_captions(s)
    left = obj("square", "black", "large", 6, 40, 40)
    right = obj("circle", "yellow", "small", 90, 60)
    assert "a black square to the left of a yellow circle" in all_captions(Scene((right, left), (210, 210, 210)))


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = sc.generate_split(tmp_path / "a", "test", 12, seed=5, progress=False)
    b = sc.generate_split(tmp_path / "b", "test", 12, seed=5, progress=False)
    c = sc.generate_split(tmp_path / "c", "test", 12, seed=6, progress=False)
    assert a.read_text() == b.read_text()
    for i in range(12):
        name = f"test/{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))
    assert a.read_text() != c.read_text()


def test_split_file_is_coco_captions_with_scenes(tmp_path):
    path = sc.generate_split(tmp_path, "val", 30, seed=9, progress=False)
    raw = json.loads(path.read_text())
    assert [im["id"] for im in raw["images"]] == list(range(30))
    assert all((tmp_path / im["file_name"]).is_file() for im in raw["images"])
    assert {im["width"] for im in raw["images"]} == {im["height"] for im in raw["images"]} == {128}
    per_image = Counter(a["image_id"] for a in raw["annotations"])
    assert set(per_image) == set(range(30))
    scenes = {s["image_id"]: Scene.from_json(s) for s in raw["scenes"]}
    for a in raw["annotations"]:
        assert caption_is_correct(a["caption"], scenes[a["image_id"]])
    for i, s in scenes.items():
        assert per_image[i] == min(5, len(spec_captions(s)))
        assert Scene.from_json(s.to_json()) == s


# --- pixels ----------------------------------------------------------------------


def patch_mean(arr, cx, cy, half):
    cx, cy = int(cx), int(cy)
    return arr[cy - half : cy + half + 1, cx - half : cx + half + 1].reshape(-1, 3).mean(0)


@pytest.mark.parametrize("source", ["generator", "spec_renderer"])
def test_rendered_pixels_match_the_scene(source):
    """Object colour at its centre, background elsewhere, noise of sigma ~6, and the
    shape's area and orientation, measured on the image."""
    nrng, rng, renderer = np.random.default_rng(3), random.Random(3), SpecRenderer(3)
    for _ in range(150):
        if source == "generator":
            s = sc.random_scene(rng)
            img = sc.render(s, nrng)
        else:
            img, s = renderer.sample()
        assert img.size == (128, 128) and img.mode == "RGB"
        arr = np.asarray(img).astype(np.float64)
        covered = np.zeros((128, 128), bool)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            side = x1 - x0
            covered[y0:y1, x0:x1] = True
            cx, cy = o.centre
            # Mean over a patch inside the shape: noise averages to within a few levels.
            half = 1 if o.shape == "triangle" else 3
            centre_rgb = patch_mean(arr, cx - 0.5, cy, half)
            assert np.all(np.abs(centre_rgb - np.asarray(o.rgb)) < 7), (source, o, centre_rgb)
            assert np.all(np.abs(np.asarray(o.rgb) - np.asarray(PALETTE[o.colour])) <= 15)
            # Pixels nearer the object's colour than the background's, inside its box.
            box = arr[y0:y1, x0:x1]
            d_obj = np.linalg.norm(box - np.asarray(o.rgb), axis=-1)
            d_bg = np.linalg.norm(box - np.asarray(s.background), axis=-1)
            mine = d_obj < d_bg
            area = mine.sum() / side**2
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[o.shape]
            assert abs(area - expected) < 0.12, (source, o.shape, side, area)
            if o.shape == "triangle":  # apex at the top, base at the bottom
                assert mine[: side // 4].mean() < 0.25 and mine[-max(2, side // 8) :].mean() > 0.8
        bg = arr[~covered]
        assert np.all(np.abs(bg.mean(0) - np.asarray(s.background)) < 2.5)
        # Flat background + N(0, 6) noise; clipping at 255 only lowers the spread.
        assert np.all((bg.std(0) > 4.0) & (bg.std(0) < 7.0)), bg.std(0)


def test_spec_renderer_scenes_follow_the_spec():
    r = SpecRenderer(11)
    scenes = [r.scene() for _ in range(1000)]
    assert not [v for s in scenes if (v := spec_violations(s))]
    assert 0.42 < sum(len(s.objects) == 1 for s in scenes) / 1000 < 0.58


def test_spec_violations_catches_broken_scenes():
    """The independent rule reader must be able to fail."""
    bg = (220, 220, 220)
    assert spec_violations(Scene((obj(x=2),), bg))  # margin
    assert spec_violations(Scene((obj(side=30),), bg))  # neither small nor large
    assert spec_violations(Scene((SceneObject("circle", "red", "small", (10, 10, 30, 30), (230, 40, 40)),), bg))
    assert spec_violations(Scene((obj(x=10), obj(x=34)), bg))  # 4 px apart
    assert spec_violations(Scene((obj(x=10, y=10), obj(x=50, y=40)), bg))  # no dominant axis
    assert spec_violations(Scene((obj(x=10),), (190, 220, 220)))
    assert not spec_violations(Scene((obj(x=10), obj(x=50, y=12)), bg))


# --- the correctness rule ---------------------------------------------------------


def test_checker_accepts_every_reference(generated):
    for s in generated[:1000]:
        for c in spec_captions(s):
            assert caption_is_correct(c, s), (c, s)
            assert caption_is_correct("  " + c.upper() + " ", s)  # case and spacing do not matter


@pytest.fixture
def pair():
    return Scene((obj("circle", "red", "small", 10, 50), obj("square", "blue", "large", 60, 40, 40)), (220, 220, 220))


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "a small red circle to the left of a large blue square",
        "a blue square and a red circle",
        "a red circle and a large blue square",
    ],
)
def test_checker_accepts_right_captions(pair, caption):
    assert caption_is_correct(caption, pair)


@pytest.mark.parametrize(
    "caption, why",
    [
        ("a green circle to the left of a blue square", "wrong colour"),
        ("a red triangle and a blue square", "wrong shape"),
        ("a large red circle to the left of a blue square", "wrong size"),
        ("a red circle to the right of a blue square", "wrong relation"),
        ("a red circle above a blue square", "wrong axis"),
        ("a red circle", "an object left out"),
        ("two red circles", "one red circle, not two"),
        ("a red circle and a blue square and a red circle", "extra object"),
        ("a red circle to the left of", "unfinished"),
        ("red circle blue square", "not a caption"),
        ("", "empty"),
    ],
)
def test_checker_rejects_wrong_captions(pair, caption, why):
    assert not caption_is_correct(caption, pair), why


def test_checker_on_one_object_and_same_pairs():
    one = Scene((obj("triangle", "yellow", "large", 30, 30, 44),), (220, 220, 220))
    assert caption_is_correct("there is a large yellow triangle", one)
    assert not caption_is_correct("a small yellow triangle", one)
    assert not caption_is_correct("a yellow triangle above a yellow triangle", one)
    assert not caption_is_correct("two yellow triangles", one)
    same = Scene((obj("square", "blue", "small", 10, 50), obj("square", "blue", "small", 60, 52)), (220, 220, 220))
    assert caption_is_correct("two blue squares", same)
    assert caption_is_correct("a blue square to the left of a blue square", same)
    assert not caption_is_correct("a blue square above a blue square", same)
    assert not caption_is_correct("two blue circles", same)


def test_parse_caption():
    assert parse_caption("there is a small red circle") == ([{"colour": "red", "shape": "circle", "size": "small"}], None)
    named, word = parse_caption("a blue square below a large black triangle")
    assert word == "below" and [n["size"] for n in named] == [None, "large"]
    assert parse_caption("a red circle beside a blue square") is None
