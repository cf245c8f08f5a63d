"""`python -m launcher` (make serve): comes up, shows three captions, stops on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_serve_answers_then_stops_cleanly_on_ctrl_c(triton_server, tmp_path):
    log = tmp_path / "serve" / "tritonserver.log"
    cmd = [sys.executable, "-m", "launcher", "--model", str(triton_server.checkpoint)]
    cmd += ["--repo", str(triton_server.repository), "--log-file", str(log)]
    cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Serving;") or time.monotonic() > deadline:
                break
        output = "\n".join(lines)
        assert "Serving; supervised; Ctrl-C or SIGTERM drains and stops." in output, output
        assert "Building" not in output  # the repository is up to date for this checkpoint
        assert sum(line.strip().startswith("scene ") for line in lines) == 3, output
        assert "Ready. gRPC 127.0.0.1:" in output
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "Stopped." in rest
    assert "Started GRPCInferenceService" in log.read_text()  # the server's log went to the file
