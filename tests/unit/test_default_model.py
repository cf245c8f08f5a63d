"""The shipped default model (models/default) on scenes it has never seen, drawn by the
project's generator with a new seed AND by an independent program (spec_renderer.py),
as PNG and as a user might send them: JPEG quality 75, resized to 64 / 512 / 1024 px,
palette PNG. The bar is the issue's: >= 98% of greedy captions correct by the spec's rule.

CAPTIONER_TEST_MODEL=DIR points these tests at another checkpoint (e.g. runs/default
while training)."""

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from spec_renderer import SpecRenderer

from captioner import scenes as sc
from captioner.checkpoint import DEFAULT_MODEL_DIR, FILENAME
from captioner.evaluate import variant_bytes
from captioner.preprocess import decode_image, prepare
from captioner.scenes import caption_is_correct

REPO = Path(__file__).resolve().parents[2]
OVERRIDE = os.environ.get("CAPTIONER_TEST_MODEL")
MODEL = Path(OVERRIDE) if OVERRIDE else DEFAULT_MODEL_DIR
BAR = 0.98
N = 300  # scenes per source: at the bar, at most 6 wrong
SOURCES = ("generator", "spec_renderer")
VARIANTS = ("png", "jpeg_q75", "resize_64", "resize_512")
# Slower to encode, and the spec's edge cases rather than the bar: the independent
# program's scenes only, fewer of them.
EXTRA = {"palette": 150, "resize_1024": 50}
CASES = [(s, v) for s in SOURCES for v in VARIANTS] + [("spec_renderer", v) for v in EXTRA]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (MODEL / FILENAME).is_file(),
        reason=f"no default model at {MODEL / FILENAME} yet (it ships from `make default-model`)",
    ),
]


def scenes_from(source, n):
    if source == "generator":
        rng, nrng = random.Random(880_001), np.random.default_rng(880_001)
        out = []
        for _ in range(n):
            s = sc.random_scene(rng)
            out.append((sc.render(s, nrng), s))
        return out
    r = SpecRenderer(880_002)
    return [r.sample() for _ in range(n)]


def encode(img, variant):
    if variant == "png":
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    if variant == "palette":
        buf = io.BytesIO()
        img.quantize(colors=256).save(buf, "PNG")
        return buf.getvalue()
    return variant_bytes(img, variant)


@pytest.fixture(scope="module")
def results():
    from captioner.inference import Captioner

    cap = Captioner(MODEL)
    drawn = {source: scenes_from(source, N) for source in SOURCES}
    out = {}
    for source, variant in CASES:
        subset = drawn[source][: EXTRA.get(variant, N)]
        arrays = [prepare(decode_image(encode(img, variant)), cap.cfg) for img, _ in subset]
        texts = []
        for i in range(0, len(arrays), 200):
            texts += [c.text for c in cap.caption_arrays(np.stack(arrays[i : i + 200]))]
        wrong = [(t, s) for t, (_, s) in zip(texts, subset) if not caption_is_correct(t, s)]
        out[source, variant] = (len(subset) - len(wrong), len(subset), wrong[:5])
    return out


@pytest.mark.parametrize("source, variant", CASES)
def test_share_correct_on_fresh_scenes(results, source, variant):
    ok, n, wrong = results[source, variant]
    assert ok / n >= BAR, f"{source} {variant}: {ok}/{n} = {ok / n:.3f} correct, e.g. {wrong}"


def test_the_cli_without_model_flag_on_another_programs_files(tmp_path):
    """The issue's definition of done: `python -m captioner caption` is right on >= 98%
    of scenes that another program draws to the spec."""
    r = SpecRenderer(880_003)
    truth = {}
    for i in range(200):
        img, s = r.sample()
        path = tmp_path / (f"scene{i:03d}.jpg" if i % 4 == 3 else f"scene{i:03d}.png")
        if path.suffix == ".jpg":
            img.save(path, "JPEG", quality=75)
        else:
            img.save(path)
        truth[str(path)] = s
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env["PYTHONPATH"] = str(REPO)
    if OVERRIDE:
        env["CAPTIONER_MODEL"] = OVERRIDE
    proc = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", *truth], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split("\t") for ln in proc.stdout.splitlines()]
    assert [p for p, _ in lines] == list(truth)
    wrong = [(p, c) for p, c in lines if not caption_is_correct(c, truth[p])]
    assert 1 - len(wrong) / len(lines) >= BAR, wrong[:5]
