"""Failover against real tritonservers: a replica of the session's repository next to the
session's own server, the replica broken while the CLI captions 1,000 images over both;
no image may be lost. (The session server only takes traffic, so other tests can share it.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from captioner.scenes import random_scene, render
from launcher.tritonserver import TritonServer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 1000


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("failover_images")
    rng, nrng = random.Random(11), np.random.default_rng(11)
    for i in range(N_IMAGES):
        render(random_scene(rng), nrng).resize((64, 64)).save(d / f"{i:04d}.png", compress_level=1)
    return d


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (the server's stubs share its group)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


def stub_pids(server_pid: int, model: str) -> list[int]:
    """Python-backend stubs of one server for one model (their command line names both)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            args
            and args[0].endswith(b"triton_python_backend_stub")
            and str(server_pid).encode() in args
            and any(f"{model}_".encode() in a for a in args)
        ):
            found.append(int(entry))
    return found


def caption_while(urls: str, image_dir: Path, fault, after: int, *flags: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI over every image; call `fault()` once `after` captions have been printed."""
    cmd = [sys.executable, "-m", "client", str(image_dir), "--url", urls, "--concurrency", "16", "--stats", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_chunks: list[str] = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if len(lines) == after:
            fault()
    code = proc.wait(timeout=300)
    reader.join(timeout=10)
    return subprocess.CompletedProcess(cmd, code, "\n".join(lines), "".join(err_chunks)), lines


def health(urls: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", "health", "--url", urls, "--timeout", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_all_captioned(proc, lines, image_dir):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [ln.split("\t")[0] for ln in lines] == [str(image_dir / f"{i:04d}.png") for i in range(N_IMAGES)]
    assert all(len(ln.split("\t")) == 2 and ln.split("\t")[1] for ln in lines)
    assert f"stats: {N_IMAGES} of {N_IMAGES} images captioned" in proc.stderr


def endpoint_stats(stderr: str, url: str) -> str:
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith(f"stats: {url}:")]
    return line


def test_sigkill_of_one_replica_loses_no_image(triton_server, image_dir, tmp_path):
    a = TritonServer(triton_server.repository, log_file=tmp_path / "a.log", exit_timeout_s=1)  # throwaway: quick stop
    b = triton_server
    try:
        a.start()
        urls = f"{a.grpc_url},{b.grpc_url}"
        ok = health(urls)  # also warms both replicas up
        assert ok.returncode == 0 and [ln.split()[:2] for ln in ok.stdout.splitlines()] == [
            ["ok", a.grpc_url],
            ["ok", b.grpc_url],
        ], ok.stdout + ok.stderr
        a_pid = a.process.pid
        t0 = time.monotonic()
        proc, lines = caption_while(urls, image_dir, lambda: os.kill(a_pid, signal.SIGKILL), after=300)
        print(f"{time.monotonic() - t0:.1f} s\n{proc.stderr}")  # the per-endpoint figures, for `pytest -s`
        check_all_captioned(proc, lines, image_dir)
        a_line = endpoint_stats(proc.stderr, a.grpc_url)
        assert " 0 failed" not in a_line and "set aside now" in a_line  # the kill was seen, and acted on
        assert "needed more than one attempt" in proc.stderr
        down = health(urls)
        assert down.returncode == 1, down.stdout + down.stderr
        assert down.stdout.splitlines()[0].startswith(f"FAIL {a.grpc_url} ") and "UNAVAILABLE" in down.stdout
        assert down.stdout.splitlines()[1].startswith(f"ok {b.grpc_url} ")
    finally:
        a.stop()  # a killpg of the dead server's group: its Python stubs outlive a SIGKILL
        a.close()
    deadline = time.monotonic() + 10  # the stubs' exits are reaped by init: give it a moment
    while group_members(a_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(a_pid) == []


def test_dead_stub_on_one_replica_loses_no_image(triton_server, image_dir, tmp_path):
    """A killed Python stub leaves its replica answering ready while every request through that
    model fails with INTERNAL "Stub process ... is not healthy": retried on the other replica,
    and the broken one stays set aside because its probe is a real inference."""
    a = TritonServer(triton_server.repository, log_file=tmp_path / "a.log", exit_timeout_s=1)  # throwaway: quick stop
    b = triton_server
    try:
        a.start()
        urls = f"{a.grpc_url},{b.grpc_url}"
        assert health(urls).returncode == 0
        stubs = stub_pids(a.process.pid, "encoder")
        assert len(stubs) == 1, stubs

        def kill_stub():
            os.kill(stubs[0], signal.SIGKILL)

        t0 = time.monotonic()
        proc, lines = caption_while(urls, image_dir, kill_stub, after=300)
        print(f"{time.monotonic() - t0:.1f} s\n{proc.stderr}")
        check_all_captioned(proc, lines, image_dir)
        assert a.is_ready()  # the server still says ready: only a real inference tells
        a_line = endpoint_stats(proc.stderr, a.grpc_url)
        assert " 0 failed" not in a_line and "set aside now" in a_line
        # Its last error is the dead stub's, or (CI, loaded machine) a probe that expired in
        # the encoder's queue behind requests waiting for that stub; the health check below
        # must name the stub either way.
        assert "Stub process 'encoder_0_0' is not healthy" in a_line or "Request timeout expired" in a_line, a_line
        # Requests the CLI gave up on there may still sit in that encoder's queue (they are not
        # cancelled), so a probe right away can expire behind them: it must fail every time,
        # and name the dead stub once the queue has drained.
        seen, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            down = health(a.grpc_url)
            seen.append(down.stdout.strip())
            assert down.returncode == 1, seen
            if "Stub process 'encoder_0_0' is not healthy" in down.stdout:
                break
            assert "UNAVAILABLE" in down.stdout, seen  # shed behind them: "Request timeout expired", or a full queue
            time.sleep(1)
        print("health after the run:", seen)
        assert "Stub process 'encoder_0_0' is not healthy" in seen[-1], seen
    finally:
        a.close()


def test_stopped_replica_costs_one_attempt_timeout(triton_server, image_dir, tmp_path):
    """SIGSTOP: the connection stays open and nothing answers. With --attempt-timeout the
    images held there are retried on the other replica instead of waiting out their deadline."""
    a = TritonServer(triton_server.repository, log_file=tmp_path / "a.log", exit_timeout_s=1)  # throwaway: quick stop
    try:
        a.start()
        urls = f"{a.grpc_url},{triton_server.grpc_url}"
        assert health(urls).returncode == 0
        t0 = time.monotonic()
        proc, lines = caption_while(
            urls, image_dir, lambda: os.kill(a.process.pid, signal.SIGSTOP), 300, "--timeout", "30", "--attempt-timeout", "1"
        )
        took = time.monotonic() - t0
        print(f"{took:.1f} s\n{proc.stderr}")
        check_all_captioned(proc, lines, image_dir)
        a_line = endpoint_stats(proc.stderr, a.grpc_url)
        # Without the attempt timeout the images held there fail after 30 s: exit 1 above.
        assert " 0 failed" not in a_line and "Deadline Exceeded" in a_line
    finally:
        if a.process is not None:
            os.kill(a.process.pid, signal.SIGCONT)
        a.close()
