"""`python -m captioner caption` as a user runs it (a subprocess), on the model the
session fixture trained."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.data import CocoCaptions
from captioner.inference import Captioner
from captioner.scenes import Scene, caption_is_correct

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, env=None):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    full_env = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "captioner", "caption", *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def scenes(shapes_data):
    data = CocoCaptions(shapes_data / "memo_val.json")
    return [(it.path, Scene.from_json(data.scenes[it.image_id])) for it in data.items[:6]]


def test_good_images_are_captioned_and_a_bad_one_is_reported(memorised_run, scenes, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a png")
    missing = tmp_path / "missing.jpg"
    paths = [p for p, _ in scenes]
    r = run_cli("--model", memorised_run, paths[0], paths[1], bad, paths[2], missing, *paths[3:])
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(p) for p in paths], "one line per good image, in order"
    assert all(ln.count("\t") == 1 for ln in lines)
    texts = [ln.split("\t")[1] for ln in lines]
    # The same captions as in-process inference, and right for the scenes this model learned.
    assert texts == [c.text for c in Captioner(memorised_run).caption_images(paths)]
    assert sum(caption_is_correct(t, s) for t, (_, s) in zip(texts, scenes)) >= 4
    err = r.stderr.splitlines()
    assert any(str(bad) in ln and "error" in ln for ln in err), r.stderr
    assert any(str(missing) in ln and "error" in ln for ln in err), r.stderr
    assert "Traceback" not in r.stderr


def test_beam_and_environment_defaults(memorised_run, scenes):
    paths = [p for p, _ in scenes[:3]]
    r = run_cli("--beam", "3", *paths, env={"CAPTIONER_MODEL": str(memorised_run)})
    assert r.returncode == 0, r.stderr
    assert [ln.split("\t")[1] for ln in r.stdout.splitlines()] == [
        c.text for c in Captioner(memorised_run).caption_images(paths, beam_size=3)
    ]


def test_bad_arguments_are_one_line_errors(memorised_run, scenes, tmp_path):
    r = run_cli("--model", memorised_run, "--beam", "0", scenes[0][0])
    assert r.returncode == 2 and "beam_size must be in 1..10" in r.stderr and not r.stdout
    r = run_cli("--model", tmp_path / "no-model-here", scenes[0][0])
    assert r.returncode == 2 and "cannot load the model" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", memorised_run)
    assert r.returncode == 2 and "IMAGE" in r.stderr


def test_only_bad_images(memorised_run, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    r = run_cli("--model", memorised_run, tmp_path / "empty.png", tmp_path)
    assert r.returncode == 1 and not r.stdout
    assert "empty" in r.stderr and str(tmp_path) in r.stderr
