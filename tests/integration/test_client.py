"""The client library and CLI against a real tritonserver (the `triton_server` fixture)."""

from __future__ import annotations

import io
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.checkpoint import file_sha256
from captioner.scenes import random_scene, render
from client import AsyncCaptionClient, CaptionClient, CaptionError, RetryPolicy, caption
from launcher.tritonserver import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenes():
    rng, nrng = random.Random(5), np.random.default_rng(5)
    return [render(random_scene(rng), nrng) for _ in range(6)]


def encoded(img: Image.Image, fmt: str, size: int | None = None) -> bytes:
    if size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def assert_captioned(r):
    # Words, not their quality: the session's model may be an untrained one (see conftest).
    assert r.ok, r.error
    assert isinstance(r.caption, str) and r.caption.strip() == r.caption
    assert r.caption == r.caption.lower() and all(w.isalpha() for w in r.caption.split())
    assert math.isfinite(r.score) and r.score <= 0.0  # a total log-probability


def test_good_images_as_paths_bytes_and_pillow(triton_server, scenes, tmp_path):
    png = tmp_path / "scene.png"
    scenes[0].save(png)
    images = [str(png), encoded(scenes[1], "JPEG", 300), scenes[2], encoded(scenes[3], "PNG", 64)]
    with CaptionClient(triton_server.grpc_url, concurrency=2) as c:
        assert c.is_ready()
        results = c.caption(images)
    assert [r.image for r in results] == [str(png), "<bytes #1>", "<image #2>", "<bytes #3>"]
    for r in results:
        assert_captioned(r)


def test_same_image_gives_the_same_answer_in_any_position(triton_server, scenes):
    data = encoded(scenes[4], "PNG")
    results = caption([data, encoded(scenes[5], "PNG"), data, data], url=triton_server.grpc_url, concurrency=4)
    first = results[0]
    assert_captioned(first)
    for r in (results[2], results[3]):
        assert r.caption == first.caption and r.score == pytest.approx(first.score, rel=1e-4)


def test_bad_images_fail_alone_and_name_the_image(triton_server, scenes, tmp_path):
    good = encoded(scenes[0], "PNG")
    truncated = good[: len(good) // 2]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not an image")
    images = [good, b"", str(junk), truncated, str(tmp_path / "missing.jpg"), good]
    with CaptionClient(triton_server.grpc_url, concurrency=3) as c:
        results = c.caption(images)
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    assert_captioned(results[0])
    assert results[5].caption == results[0].caption
    assert results[5].score == pytest.approx(results[0].score, rel=1e-4)
    for r in results[1:4]:
        assert r.error.status == "StatusCode.INVALID_ARGUMENT"
        assert str(r.error).startswith(f"{r.image}: rejected by the server: ")
    assert "empty" in str(results[1].error)
    assert "not a decodable image" in str(results[2].error)
    assert results[4].error.status is None and "cannot read file" in str(results[4].error)


def test_out_of_range_beam_is_rejected_by_the_server(triton_server, scenes):
    with CaptionClient(triton_server.grpc_url) as c:
        ok = c.caption_one(encoded(scenes[0], "PNG"), beam_size=3, name="beam3.png")
        assert_captioned(ok)
        with pytest.raises(CaptionError) as e:
            c.caption_one(encoded(scenes[0], "PNG"), beam_size=11, name="beam11.png")
    assert e.value.status == "StatusCode.INVALID_ARGUMENT"
    assert str(e.value).startswith("beam11.png: rejected by the server:") and "beam_size" in str(e.value)


def test_timeout_is_reported_and_the_client_recovers(triton_server, scenes):
    data = encoded(scenes[1], "PNG", 1024)
    with CaptionClient(triton_server.grpc_url) as c:
        with pytest.raises(CaptionError) as e:
            c.caption_one(data, timeout=0.001, name="slow.png")
        assert e.value.status == "StatusCode.DEADLINE_EXCEEDED"
        assert str(e.value).startswith("slow.png: timed out after 0.001 s")
        assert_captioned(c.caption_one(data, timeout=60))


def test_server_down_is_unavailable_after_retries(scenes):
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    pol = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with CaptionClient(url, retry=pol, timeout=5) as c:
        assert not c.is_ready()
        results = c.caption([encoded(scenes[0], "PNG"), encoded(scenes[1], "PNG")])
    for r in results:
        assert r.error.status == "StatusCode.UNAVAILABLE"
        assert str(r.error).startswith(f"{r.image}: server unavailable after 3 attempts")


def test_async_client_directly(triton_server, scenes):
    import asyncio

    async def go():
        async with AsyncCaptionClient(triton_server.grpc_url, concurrency=4) as c:
            return [r async for r in c.caption_iter([encoded(s, "JPEG") for s in scenes])]

    results = asyncio.run(go())
    assert [r.image for r in results] == [f"<bytes #{i}>" for i in range(len(scenes))]
    for r in results:
        assert_captioned(r)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_captions_a_folder_and_reports_the_bad_file(triton_server, scenes, tmp_path):
    folder = tmp_path / "pics"
    (folder / "nested").mkdir(parents=True)
    scenes[0].save(folder / "b.png")
    (folder / "a.jpg").write_bytes(encoded(scenes[1], "JPEG", 200))
    scenes[2].save(folder / "nested" / "c.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image, not picked up")
    proc = run_cli(str(folder), "--url", triton_server.grpc_url, "--beam", "2", "--concurrency", "2")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "nested" / "c.png")]
    assert all(len(ln.split("\t")) == 2 for ln in lines)
    assert f"{folder / 'broken.png'}: rejected by the server:" in proc.stderr
    assert "1 of 4 images failed" in proc.stderr


def test_cli_all_good_exits_0(triton_server, scenes, tmp_path):
    scenes[3].save(tmp_path / "x.png")
    proc = run_cli(str(tmp_path / "x.png"), "--url", triton_server.grpc_url, "--scores", "--show-version")
    assert proc.returncode == 0, proc.stderr
    path, _caption, score, version = proc.stdout.rstrip("\n").split("\t")
    assert path == str(tmp_path / "x.png") and float(score) <= 0
    # version 1 of the session's repository, built from the session's checkpoint
    assert version == f"1:{file_sha256(triton_server.checkpoint / 'model.pt')[:8]}"


def test_cli_server_down_exits_1_naming_each_image(scenes, tmp_path):
    scenes[0].save(tmp_path / "x.png")
    proc = run_cli(str(tmp_path / "x.png"), "--url", f"127.0.0.1:{free_port()}", "--retries", "2")
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"{tmp_path / 'x.png'}: server unavailable after 2 attempts" in proc.stderr
