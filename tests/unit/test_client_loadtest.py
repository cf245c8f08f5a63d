"""loadtest without a server: the image pool, run-time parsing, reading Locust's CSVs,
the pass/fail verdict and the plot. (The locustfile itself imports locust, which
monkey-patches the process, so it is exercised in tests/integration/test_loadtest.py.)"""

from __future__ import annotations

import argparse
import csv
import io

import pytest
from PIL import Image

from captioner.scenes import Scene
from loadtest import run
from loadtest.pool import build_pool, parse_sizes

STATS_COLUMNS = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    "50%",
    "66%",
    "75%",
    "80%",
    "90%",
    "95%",
    "98%",
    "99%",
    "99.9%",
    "99.99%",
    "100%",
]
HISTORY_COLUMNS = [
    "Timestamp",
    "User Count",
    "Type",
    "Name",
    "Requests/s",
    "Failures/s",
    "50%",
    "66%",
    "75%",
    "80%",
    "90%",
    "95%",
    "98%",
    "99%",
    "99.9%",
    "99.99%",
    "100%",
    "Total Request Count",
    "Total Failure Count",
]


def test_pool_mixes_formats_and_sizes_and_decodes():
    pool = build_pool(40, seed=3, sizes=(64, 128, 512), jpeg_share=0.5)
    assert len(pool) == 40
    assert {p.fmt for p in pool} == {"png", "jpeg"}
    assert {p.size for p in pool} == {64, 128, 512}
    for p in pool:
        img = Image.open(io.BytesIO(p.data))
        assert img.format == p.fmt.upper() and img.size == (p.size, p.size)
        assert isinstance(p.scene, Scene) and 1 <= len(p.scene.objects) <= 2
        assert p.label == f"{p.fmt} {p.size}px"


def test_pool_is_deterministic_per_seed():
    a, b, c = build_pool(6, seed=9), build_pool(6, seed=9), build_pool(6, seed=10)
    assert [p.data for p in a] == [p.data for p in b]
    assert [p.data for p in a] != [p.data for p in c]


def test_pool_all_png_when_jpeg_share_zero():
    assert {p.fmt for p in build_pool(8, jpeg_share=0.0)} == {"png"}


@pytest.mark.parametrize("bad", [dict(count=0), dict(count=2, jpeg_share=1.5)])
def test_pool_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        build_pool(**bad)


def test_parse_sizes():
    assert parse_sizes("64, 128,1024") == (64, 128, 1024)
    for bad in ["", "32", "64,2048", "a"]:
        with pytest.raises(ValueError):
            parse_sizes(bad)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("2m10s", 130)])
def test_parse_duration(text, seconds):
    assert run.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "10x"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        run.parse_duration(bad)


def write_stats(prefix, rows, exceptions=0):
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STATS_COLUMNS)
        for name, n, fails, p95 in rows:
            w.writerow(
                [
                    "grpc" if name != "Aggregated" else "",
                    name,
                    n,
                    fails,
                    40,
                    45.5,
                    10,
                    900,
                    88,
                    50.0,
                    0.0,
                    40,
                    50,
                    60,
                    70,
                    80,
                    p95,
                    300,
                    400,
                    800,
                    900,
                    900,
                ]
            )
    with open(f"{prefix}_exceptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Count", "Message", "Traceback", "Nodes"])
        if exceptions:
            w.writerow([exceptions, "ZeroDivisionError", "tb", "local"])


def thresholds(**kw):
    return argparse.Namespace(**{"min_requests": 10, "max_failure_ratio": 0.0, "p95_ms": 500.0, **kw})


def test_summary_reads_the_aggregated_row(tmp_path):
    prefix = tmp_path / "lt"
    write_stats(prefix, [("captioner png 128px", 60, 1, 100), ("Aggregated", 100, 2, 250)])
    s = run.read_summary(prefix)
    assert (s.requests, s.failures, s.p95_ms, s.p50_ms, s.user_exceptions) == (100, 2, 250.0, 40.0, 0)
    assert s.failure_ratio == pytest.approx(0.02)


def test_verdict_passes_a_clean_run(tmp_path):
    prefix = tmp_path / "lt"
    write_stats(prefix, [("Aggregated", 100, 0, 250)])
    assert run.verdict(run.read_summary(prefix), thresholds()) == []


@pytest.mark.parametrize(
    "rows, exceptions, kw, expected",
    [
        ([("Aggregated", 100, 1, 250)], 0, {}, "failure ratio 0.0100 (1/100) above 0.0"),
        ([("Aggregated", 100, 0, 600)], 0, {}, "p95 600 ms above the bound of 500 ms"),
        ([("Aggregated", 5, 0, 100)], 0, {}, "5 requests, fewer than the 10 required"),
        ([("Aggregated", 100, 0, 100)], 3, {}, "3 exceptions raised in users"),
        ([("Aggregated", 100, 4, 100)], 0, {"max_failure_ratio": 0.05}, None),
    ],
)
def test_verdict_names_each_problem(tmp_path, rows, exceptions, kw, expected):
    prefix = tmp_path / "lt"
    write_stats(prefix, rows, exceptions)
    problems = run.verdict(run.read_summary(prefix), thresholds(**kw))
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(expected)


def test_plot_from_history(tmp_path):
    history = tmp_path / "lt_stats_history.csv"
    with open(history, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HISTORY_COLUMNS)
        for i in range(10):
            pct = ["N/A"] * 11 if i == 0 else [20 + i, 25, 30, 35, 40, 50 + i, 60, 70, 80, 90, 100]
            w.writerow([1_700_000_000 + i, min(i, 4), "", "Aggregated", 10.0 * i, 0.0, *pct, 10 * i, 0])
    out = tmp_path / "lt.png"
    run.plot_history(history, out, "test")
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 400


def test_plot_refuses_empty_history(tmp_path):
    history = tmp_path / "h.csv"
    history.write_text(",".join(HISTORY_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no Aggregated rows"):
        run.plot_history(history, tmp_path / "x.png", "t")


def test_locust_command_carries_settings_and_extra_flags(tmp_path):
    args, extra = run.build_parser().parse_known_args(
        ["-u", "6", "-r", "3", "-t", "20s", "--reports", str(tmp_path), "--beam-size", "3"]
    )
    cmd = run.locust_command(args, "h:1", extra)
    joined = " ".join(cmd)
    for part in [
        "--headless",
        "-u 6",
        "-r 3.0",
        "-t 20s",
        "--host h:1",
        f"--csv {tmp_path}/loadtest",
        f"--html {tmp_path}/loadtest.html",
        "--beam-size 3",
    ]:
        assert part in joined
    assert cmd[cmd.index("-f") + 1].endswith("loadtest/locustfile.py")


def test_environment_supplies_defaults(monkeypatch):
    monkeypatch.setenv("LOADTEST_USERS", "12")
    monkeypatch.setenv("LOADTEST_RUN_TIME", "2m")
    monkeypatch.setenv("LOADTEST_P95_MS", "750")
    monkeypatch.setenv("CAPTIONER_URL", "envhost:1")
    args, _ = run.build_parser().parse_known_args([])
    assert (args.users, args.run_time, args.p95_ms, args.url) == (12, "2m", 750.0, "envhost:1")


def test_no_server_and_no_start_exits_2(capsys):
    from launcher.tritonserver import free_port

    code = run.main(["--url", f"127.0.0.1:{free_port()}", "--start-server", "never"])
    assert code == 2
    assert "no server answers" in capsys.readouterr().err


def test_missing_repository_exits_2_with_reason(tmp_path, capsys):
    from launcher.tritonserver import free_port

    code = run.main(["--url", f"127.0.0.1:{free_port()}", "--repo", str(tmp_path / "empty"), "--reports", str(tmp_path / "r")])
    assert code == 2
    assert "holds no captioner model repository" in capsys.readouterr().err


def test_server_state_over_several_endpoints(monkeypatch, capsys):
    states = {"a:1": "down", "b:2": "ready", "c:3": "not_ready"}
    monkeypatch.setattr(run, "_one_server_state", lambda url, model, timeout: states[url])
    assert run.server_state("a:1,b:2,c:3", "captioner") == "ready"
    err = capsys.readouterr().err
    assert "endpoint a:1 is down" in err and "endpoint c:3 is not ready" in err
    assert run.server_state("a:1,c:3", "captioner") == "not_ready"
    assert run.server_state("a:1", "captioner") == "down"
    with pytest.raises(ValueError):
        run.server_state("a:1,,b:2", "captioner")
