"""bench/photos.py: the photo workloads are the bench's scenes at photo size (1024 px JPEG
q90, and a mix with exactly 10 % PNG), the targets are read from one run's rows, and
the variant measured is the one the build serves."""

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from bench import photos
from bench.variants import bench_images


def _img(data):
    return Image.open(io.BytesIO(data))


def test_the_workloads_are_the_same_scenes_at_photo_size():
    small = photos.workload_images("128px-png", n=4)
    assert small == bench_images(4)
    jpeg = photos.workload_images("1024px-jpeg", n=4)
    for s, j in zip(small, jpeg):
        big = _img(j)
        assert big.format == "JPEG" and big.size == (1024, 1024)
        # the same scene: scaled back to 128 px it is the 128 px image up to noise and JPEG
        back = np.asarray(big.convert("RGB").resize((128, 128), Image.Resampling.BOX), np.float32)
        assert np.abs(back - np.asarray(_img(s).convert("RGB"), np.float32)).mean() < 8


def test_the_mix_is_ten_percent_png_at_1024_px():
    mix = photos.workload_images("1024px-mix")
    fmts = [_img(d).format for d in mix]
    assert len(mix) == photos.MIX_IMAGES and fmts.count("PNG") * 10 == len(mix)
    assert all(_img(d).size == (1024, 1024) for d in mix[:12])
    assert mix[:9] == photos.workload_images("1024px-jpeg", n=9), "the JPEGs are the JPEG workload's"
    with pytest.raises(ValueError):
        photos.workload_images("4k")


def _row(model, workload, stack, tput, p99):
    return {
        "model": model,
        "variant": "onnxruntime fp32",
        "workload": workload,
        "stack": stack,
        "decode": "fast",
        "throughput": tput,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "captions_per_s": tput,
    }


def test_targets_are_ratios_to_the_128_px_rows_of_the_same_run():
    rows = [
        _row("default", "128px-png", "triton", 600.0, 90.0),
        _row("default", "1024px-jpeg", "triton", 400.0, 150.0),
        _row("default", "1024px-mix", "triton", 330.0, 240.0),
        _row("seed-inception", "128px-png", "triton", 30.0, 1000.0),
        _row("seed-inception", "1024px-jpeg", "triton", 26.0, 1200.0),
    ]
    t = {x.name.split()[0]: x for x in photos.targets({"photos": rows})}
    assert t["P1"].value == pytest.approx(0.55) and t["P1"].met
    assert t["P2"].value == pytest.approx(240 / 90) and t["P2"].met  # at most 3x
    assert t["P3"].value == pytest.approx(26 / 30) and t["P3"].met is False
    rows[2] = _row("default", "1024px-mix", "triton", 330.0, 280.0)
    assert not photos.targets({"photos": rows})[1].met
    assert all(x.met is None for x in photos.targets({"photos": []}))
    md = photos.markdown({"photos": rows})
    assert "| default | onnxruntime fp32 | fast | 1024 px JPEG q90 | 400.0 | 0.67x |" in md
    assert photos.markdown({}) == ""


def test_the_photo_variant_is_fp32_through_the_chosen_runtime():
    a = argparse.Namespace(photos="on")
    assert photos.wanted(a, "openvino fp32", {"runtime": "openvino", "auto_encoder_runtime": "openvino"})
    assert not photos.wanted(a, "onnxruntime fp32", {"runtime": "onnxruntime", "auto_encoder_runtime": "openvino"})
    assert not photos.wanted(a, "openvino int8", {"runtime": "openvino", "auto_encoder_runtime": "openvino"})
    assert not photos.wanted(
        argparse.Namespace(photos="off"), "openvino fp32", {"runtime": "openvino", "auto_encoder_runtime": "openvino"}
    )


def test_the_decode_served_is_the_flag_else_the_build_else_the_checkpoint():
    build = argparse.Namespace(decode="build")
    assert photos.decode_for(build, {"decode": "fast"}, "exact") == "fast"
    assert photos.decode_for(build, {"decode": None}, "exact") == "exact"
    assert photos.decode_for(argparse.Namespace(decode="exact"), {"decode": "fast"}, "fast") == "exact"


def test_targets_show_each_interleaved_window_and_the_bound_merges_windows():
    from bench.inprocess import InProcessResult, merge_inprocess

    rows = [
        {**_row("default", "128px-png", "triton", 600.0, 90.0), "rounds": [580.0, 620.0, 600.0]},
        {**_row("default", "1024px-mix", "triton", 330.0, 240.0), "rounds": [319.0, 341.0, 330.0]},
    ]
    (p1,) = [t for t in photos.targets({"photos": rows}) if t.name.startswith("P1")]
    assert p1.windows == pytest.approx([0.55, 0.55, 0.55])
    assert "windows 0.55x, 0.55x, 0.55x" in p1.line()
    a = InProcessResult(32, 64, 2.0, 32.0, 5.0, 0.9, 0.0)
    b = InProcessResult(32, 32, 2.0, 16.0, 7.0, 0.7, 0.1)
    m = merge_inprocess([a, b])
    assert (m.captions, m.elapsed_s, m.captions_per_s) == (96, 4.0, 24.0)
    assert m.mean_tokens == pytest.approx((64 * 5 + 32 * 7) / 96) and m.cpu == pytest.approx(0.8)
