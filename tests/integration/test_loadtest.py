"""`python -m loadtest.run` (Locust, headless) against the real server: a short clean run
with reports and plot, and a run whose every request the server rejects."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def loadtest(url: str, reports: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "loadtest.run",
        "--url",
        url,
        "--start-server",
        "never",
        "--reports",
        str(reports),
        "--pool-size",
        "16",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_headless_run_has_no_failures_and_leaves_reports(triton_server, tmp_path):
    proc = loadtest(
        triton_server.grpc_url, tmp_path, "-u", "4", "-r", "4", "-t", "15s", "--min-requests", "30", "--p95-ms", "10000"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "loadtest_summary.json").read_text())
    assert summary["passed"] and summary["problems"] == []
    assert summary["failures"] == 0 and summary["user_exceptions"] == 0
    assert summary["requests"] >= 30
    # Every request's caption was checked against its scene (the count matches Locust's).
    assert summary["quality"]["checked"] == summary["requests"]
    # ... and every answer named the model version that made it: the served repository's version 1
    from captioner.checkpoint import file_sha256

    label = f"1:{file_sha256(triton_server.checkpoint / 'model.pt')[:8]}"
    assert summary["quality"]["model_versions"] == {label: summary["requests"]}

    with open(tmp_path / "loadtest_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Request Count"]) == summary["requests"]
    names = set(rows) - {"Aggregated"}
    assert any(n.startswith("captioner png") for n in names) and any(n.startswith("captioner jpeg") for n in names)
    assert all(int(r["Failure Count"]) == 0 for r in rows.values())
    with open(tmp_path / "loadtest_stats_history.csv", newline="") as f:
        assert sum(1 for r in csv.DictReader(f) if r["Name"] == "Aggregated") >= 5
    assert "<html" in (tmp_path / "loadtest.html").read_text()[:2000].lower()
    assert Image.open(tmp_path / "loadtest.png").format == "PNG"


def test_rejected_requests_are_counted_as_failures(triton_server, tmp_path):
    # beam_size 11 is out of range: the server answers INVALID_ARG to every call.
    proc = loadtest(triton_server.grpc_url, tmp_path, "-u", "2", "-r", "2", "-t", "4s", "--beam-size", "11")
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "loadtest_summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == summary["requests"]
    assert any(p.startswith("failure ratio 1.0000") for p in summary["problems"])
    with open(tmp_path / "loadtest_failures.csv", newline="") as f:
        errors = " ".join(r["Error"] for r in csv.DictReader(f))
    assert "INVALID_ARGUMENT" in errors and "beam_size" in errors


def test_users_fail_over_when_a_replica_is_killed(triton_server, tmp_path):
    """Two endpoints, one SIGKILLed mid-run: the users' requests go to the other, none fails."""
    import os
    import signal
    import threading

    from launcher.tritonserver import TritonServer

    replica = TritonServer(triton_server.repository, log_file=tmp_path / "replica.log")
    try:
        replica.start()
        killer = threading.Timer(6.0, os.kill, (replica.process.pid, signal.SIGKILL))
        killer.start()
        proc = loadtest(
            f"{replica.grpc_url},{triton_server.grpc_url}",
            tmp_path,
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "12s",
            "--p95-ms",
            "10000",
            "--min-requests",
            "30",
        )
        killer.join()
    finally:
        replica.close()  # ends the killed server's Python stubs too
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "loadtest_summary.json").read_text())
    assert summary["failures"] == 0 and summary["passed"]
    failover = summary["failover"]
    assert failover["requests"] == summary["requests"] and failover["failed"] == 0
    killed, alive = failover["endpoints"]
    assert killed["url"] == replica.grpc_url and killed["ok"] > 0 and killed["failed"] > 0 and not killed["up"]
    assert alive["ok"] > 0 and alive["failed"] == 0
    assert failover["retried"] >= 1 and "failover:" in proc.stdout
