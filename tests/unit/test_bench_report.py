"""Ratios, target verdicts and plots of a bench run, from a hand-made results dict."""

from __future__ import annotations

import pytest

from bench import plots, report
from bench.run import _kv, parse_args


def _level(model, stack, variant, c, tput):
    return dict(
        model=model,
        stack=stack,
        variant=variant,
        concurrency=c,
        throughput=tput,
        completed=10,
        errors=0,
        elapsed_s=1.0,
        p50_ms=10.0 * c,
        p95_ms=12.0 * c,
        p99_ms=13.0 * c,
        mean_ms=10.0,
        client_cpu=0.05,
        server_cpu=0.9,
        other_cpu=0.0,
    )


@pytest.fixture
def results():
    return {
        "config": {"threads": 2, "triton": {"seed fp32": "encoder (2 inst)"}},
        "inprocess": [
            dict(model="seed-inception", variant="fp32", batch_size=1, captions_per_s=10.0, mean_tokens=20.0),
            dict(model="seed-inception", variant="fp32", batch_size=32, captions_per_s=20.0, mean_tokens=20.0),
            dict(model="default", variant="fp32", batch_size=32, captions_per_s=400.0, mean_tokens=5.0),
        ],
        "levels": [
            _level("seed-inception", "triton", "fp32", 1, 9.0),
            _level("seed-inception", "triton", "fp32", 16, 19.0),
            _level("seed-inception", "naive", "torch fp32", 16, 5.0),
            _level("default", "triton", "fp32", 32, 290.0),
            _level("default", "naive", "torch fp32", 32, 100.0),
        ],
    }


def test_ratios_use_the_best_inprocess_batch_and_the_naive_level_at_the_same_concurrency(results):
    rows = {(r["model"], r["concurrency"]): r for r in report.ratio_rows(results)}
    assert set(rows) == {("seed-inception", 1), ("seed-inception", 16), ("default", 32)}
    r = rows[("seed-inception", 16)]
    assert r["inprocess"] == 20.0 and r["vs_inprocess"] == pytest.approx(0.95) and r["vs_naive"] == pytest.approx(3.8)
    assert rows[("seed-inception", 1)]["vs_naive"] is None  # no naive level at 1 client
    assert rows[("default", 32)]["vs_naive"] == pytest.approx(2.9)


def test_targets_report_met_and_missed(results):
    verdicts = {t.name.split(" (")[0]: t for t in report.targets(results, "default")}
    r1 = verdicts["R1 seed-inception best Triton variant / in-process fp32 bound"]
    assert r1.value == pytest.approx(0.95) and r1.met is False and "MISSED" in r1.line()
    # R2 and R3 gave way to T1 and T2 against the peers (issue 21); no peer ran here
    assert set(verdicts) == {"R1 seed-inception best Triton variant / in-process fp32 bound"}


def test_r1_takes_the_best_variant_over_the_onnxruntime_fp32_bound(results):
    results["inprocess"] += [
        dict(model="seed-inception", variant="onnxruntime fp32", batch_size=16, captions_per_s=30.0, mean_tokens=20.0),
        dict(model="default", variant="openvino fp32", batch_size=32, captions_per_s=500.0, mean_tokens=5.0),
    ]
    results["levels"] += [
        _level("seed-inception", "triton", "openvino int8", 16, 95.0),
        _level("seed-inception", "triton", "openvino int8", 64, 100.0),
        _level("default", "triton", "openvino fp32", 32, 470.0),
        _level("default", "triton", "openvino int8", 32, 900.0),
    ]
    verdicts = {t.name.split(" (")[0]: t for t in report.targets(results, "default")}
    r1 = verdicts["R1 seed-inception best Triton variant / in-process onnxruntime fp32 bound"]
    assert r1.value == pytest.approx(100.0 / 30.0) and r1.met and "openvino int8, 64 clients" in r1.name


def test_markdown_holds_every_table_and_the_config(results):
    md = report.markdown(results, "default")
    for needle in (
        "## Ratios",
        "## Targets",
        "## In-process bound",
        "## Load levels",
        "triton.seed fp32: encoder (2 inst)",
        "0.95x",
        "3.80x",
    ):
        assert needle in md


def test_plots_are_png_files(results, tmp_path):
    for fn in (plots.throughput_plot, plots.latency_plot):
        path = fn(results, tmp_path / f"{fn.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_parses_tuning_and_refuses_unknown_names():
    assert _kv("encoder=2, preprocess=1") == {"encoder": 2, "preprocess": 1}
    a = parse_args(
        ["--quick", "--models", "seed-inception", "--instances", "encoder=2", "--variants", "openvino:int8,onnxruntime:fp32"]
    )
    assert a.models == ["seed-inception"] and a.instances == {"encoder": 2} and a.duration < 6
    assert a.variants == [("openvino", "int8"), ("onnxruntime", "fp32")]
    for bad in (["--models", "resnet"], ["--variants", "tensorrt:fp32"], ["--variants", "openvino:fp8"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
