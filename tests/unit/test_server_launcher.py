"""launcher.tritonserver (the tritonserver launcher) and launcher's staleness check,
against stand-in binaries: no real server here (tests/integration starts one)."""

import os
import stat
import sys
import textwrap

import pytest

from launcher import tritonserver as srv
from launcher.tritonserver import ServerError, TritonServer


def _fake_triton(bin_dir, body: str):
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "tritonserver"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "repo" / "captioner").mkdir(parents=True)
    (tmp_path / "repo" / "captioner" / "config.pbtxt").write_text('name: "captioner"')
    return tmp_path / "repo"


HEALTHY = """
import http.server, signal, sys, threading
port = int([a for a in sys.argv if a.startswith("--http-port=")][0].split("=")[1])
print("args", " ".join(sys.argv[1:]), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404); self.end_headers()
    def log_message(self, *a): pass
httpd = http.server.HTTPServer(("127.0.0.1", port), H)
def bye(*a):
    print("got SIGTERM, shutting down", flush=True)
    threading.Thread(target=httpd.shutdown).start()
signal.signal(signal.SIGTERM, bye)
httpd.serve_forever()
"""


def test_a_tritonserver_on_path_is_preferred_and_run_without_the_wheel_backend(tmp_path, repo, monkeypatch):
    exe = _fake_triton(tmp_path / "bin", HEALTHY)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "logs" / "triton.log"
    with TritonServer(repo, log_file=log) as server:
        assert server.binary == srv.Binary(exe, None)
        assert server.is_ready()
        ports = set(server.ports.values())
        assert len(ports) == 3 and all(p > 0 for p in ports)
        assert server.grpc_url == f"127.0.0.1:{server.ports['grpc']}"
        assert server.metrics_url == f"http://127.0.0.1:{server.ports['metrics']}/metrics"
        process = server.process
    assert process.poll() is not None and not server.running()
    text = log.read_text()
    assert "--model-control-mode=none" in text and f"--model-repository={repo}" in text
    assert "--http-address=127.0.0.1" in text and "--backend-directory" not in text
    assert "got SIGTERM" in text  # asked to drain and stop in order, not killed


def test_a_server_that_dies_at_startup_reports_its_log(tmp_path, repo, monkeypatch):
    exe = _fake_triton(tmp_path / "bin", 'import sys\nprint("E model load failed: boom", flush=True)\nsys.exit(3)\n')
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    server = TritonServer(repo)
    with pytest.raises(ServerError, match=r"(?s)exited with code 3.*boom"):
        server.start(timeout_s=20)
    assert not server.running()
    server.close()


def test_log_file_dash_sends_the_server_log_to_standard_output(tmp_path, repo, monkeypatch):
    """`--log-file -` (containers: `kubectl logs`): tritonserver inherits our stdout; no
    file is written, and a failed start says where its log went."""
    import subprocess

    exe = _fake_triton(tmp_path / "bin", HEALTHY)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    code = textwrap.dedent(f"""
        from launcher.tritonserver import TritonServer
        with TritonServer({str(repo)!r}, log_file="-") as server:
            assert server.log_file is None and server.is_ready()
            print("tail:", server.log_tail())
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.returncode == 0, out.stderr
    assert f"--model-repository={repo}" in out.stdout  # the server's own output
    assert "got SIGTERM" in out.stdout
    assert "tail: (tritonserver's log is on standard output" in out.stdout
    from launcher.cli import replica_log

    assert replica_log("-", 1) == "-" and replica_log("logs/t.log", 1) == "logs/t-1.log"


def test_a_directory_without_the_captioner_repository_is_refused(tmp_path):
    server = TritonServer(tmp_path)
    with pytest.raises(ServerError, match="no captioner model repository"):
        with server:
            pass
    assert not server._tmp.exists()  # a failed start in `with` leaves no temp dir behind


def test_the_wheel_binary_gets_a_backend_directory_and_its_libraries(tmp_path, repo, monkeypatch):
    monkeypatch.setattr(srv.shutil, "which", lambda name: None)
    server = TritonServer(repo, host="0.0.0.0", http_port=8000, grpc_port=8001, metrics_port=8002)
    try:
        root = server.binary.wheel_root
        assert root is not None and server.binary.path == root / "bin" / "tritonserver"
        cmd = server.command()
        backend = [a.split("=", 1)[1] for a in cmd if a.startswith("--backend-directory=")][0]
        python_dir = srv.Path(backend) / "python"
        names = {p.name for p in python_dir.iterdir()}
        assert names == {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
        assert all((python_dir / n).resolve().is_file() for n in names)
        v = f"{sys.version_info.major}.{sys.version_info.minor}"
        assert (python_dir / "triton_python_backend_stub").resolve().parent.name == v
        assert "--grpc-address=0.0.0.0" in cmd and "--grpc-port=8001" in cmd and "--metrics-port=8002" in cmd
        env = server.environment()
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(srv.PROJECT_ROOT)
        assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("nvidia_pytriton.libs")
        assert server.grpc_url == "127.0.0.1:8001"  # a wildcard bind is reached through loopback
    finally:
        server.close()


def test_free_ports_are_distinct_and_keep_the_fixed_ones(monkeypatch):
    picks = iter([5000, 5000, 5001, 5002, 6000, 5003])  # the OS may hand a port back twice
    monkeypatch.setattr(srv, "free_port", lambda host="127.0.0.1": next(picks))
    assert srv.free_ports({"http": 0, "grpc": 0, "metrics": 0}) == {"http": 5000, "grpc": 5001, "metrics": 5002}
    # a fixed port stays; a picked one never collides with it
    assert srv.free_ports({"http": 6000, "grpc": 0}) == {"http": 6000, "grpc": 5003}


def test_free_ports_are_bindable():
    import socket

    port = srv.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# --- launcher: when must the repository be rebuilt? --------------------------------


def test_stale_reason(tmp_path):
    from serving_support import tiny_checkpoint

    from builder.export import export_decoder_step, export_encoder
    from builder.repository import assemble
    from captioner import checkpoint
    from launcher.cli import stale_reason

    ck_path = tiny_checkpoint(tmp_path / "ck")
    ck = checkpoint.load(ck_path)
    repo = tmp_path / "repo"
    assert "no model repository" in stale_reason(repo, ck_path, "auto")
    art = {"encoder_onnx": export_encoder(ck, tmp_path / "e.onnx"), "decoder_onnx": export_decoder_step(ck, tmp_path / "d.onnx")}
    assemble(ck, repo, "cpu", art)
    assert stale_reason(repo, ck_path, "auto") is None
    assert stale_reason(repo, ck_path, "cpu") is None
    assert "built for cpu, not gpu" in stale_reason(repo, ck_path, "gpu")
    served = repo / "preprocess" / "1" / "model.py"
    served.write_text(served.read_text() + "\n# edited\n")
    assert "differs from" in stale_reason(repo, ck_path, "auto")
    assemble(ck, repo, "cpu", art)
    (repo / "encoder" / "1" / "model.onnx").unlink()
    assert "incomplete" in stale_reason(repo, ck_path, "auto")
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    assert "another checkpoint" in stale_reason(repo, other, "auto")


def test_a_versioned_repository_holding_the_checkpoint_is_served_as_it_is(tmp_path):
    """After make rollout, make serve with the first checkpoint serves the repository as the
    rollout left it (version 2); it rebuilds only for a checkpoint none of its versions has."""
    import json

    from serving_support import tiny_checkpoint

    from builder import versions
    from builder.export import export_decoder_step, export_encoder
    from builder.repository import assemble
    from captioner import checkpoint
    from launcher.cli import stale_reason

    paths = [tiny_checkpoint(tmp_path / f"ck{i}", seed=i) for i in range(3)]
    cks = [checkpoint.load(p) for p in paths]
    arts = [
        {
            "encoder_onnx": export_encoder(ck, tmp_path / f"e{i}.onnx"),
            "decoder_onnx": export_decoder_step(ck, tmp_path / f"d{i}.onnx"),
        }
        for i, ck in enumerate(cks[:2])
    ]
    repo = assemble(cks[0], tmp_path / "repo", "cpu", arts[0])
    versions.add_version(assemble(cks[1], versions.staging_dir(repo), "cpu", arts[1]), repo)
    records = {str(v): {"checkpoint_sha256": ck.sha256} for v, ck in ((1, cks[0]), (2, cks[1]))}
    (repo / versions.MANIFEST).write_text(json.dumps({"model_versions": records}))
    for m in versions.models(repo):
        versions.set_loaded(repo, m, [2])
    versions.set_serving(repo, 2)
    assert stale_reason(repo, paths[0], "auto") is None and stale_reason(repo, paths[1], "auto") is None
    assert "another checkpoint" in stale_reason(repo, paths[2], "auto")


STUCK_UNLOADING = HEALTHY.replace("threading.Thread(target=httpd.shutdown).start()", "pass  # unloads forever")


def test_stop_kills_a_server_still_unloading_after_wait_s(tmp_path, repo, monkeypatch):
    exe = _fake_triton(tmp_path / "bin", STUCK_UNLOADING)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "triton.log"
    server = TritonServer(repo, log_file=log, exit_timeout_s=60).start()
    process = server.process
    assert server.close(wait_s=0.5) is False  # not the 70 s its exit timeout would allow
    assert process.poll() is not None and "got SIGTERM" in log.read_text()
    healthy = _fake_triton(tmp_path / "bin2", HEALTHY)
    monkeypatch.setenv("PATH", f"{healthy.parent}{os.pathsep}{os.environ['PATH']}")
    with TritonServer(repo, log_file=log) as server:
        assert server.stop(wait_s=30) is True  # exited on its own


def test_only_drained_servers_get_the_short_unload_grace(capsys):
    from launcher import cli as serve

    class Server:
        grpc_url = "127.0.0.1:1"

        def __init__(self, exits):
            self.exits, self.waits = exits, []

        def close(self, wait_s=None):
            self.waits.append(wait_s)
            return self.exits

    drained, stuck, undrained = Server(True), Server(False), Server(True)
    serve.stop_all([drained, stuck, undrained], {drained, stuck})
    assert drained.waits == stuck.waits == [serve.UNLOAD_GRACE_S]
    assert undrained.waits == [None]  # requests may be in flight: Triton's own exit timeout
    assert "still unloading" in capsys.readouterr().out


# --- launcher: what decides its exit status and how it reaches its own server -------------


def test_a_supervisor_giving_up_is_told_apart_from_a_signal():
    import signal

    from launcher.cli import Stop

    signalled = Stop()
    signalled(signal.SIGTERM)
    assert signalled.is_set() and signalled.reason == "SIGTERM" and not signalled.gave_up  # exit 0
    gave_up = Stop()
    gave_up.give_up()
    assert gave_up.event.is_set() and gave_up.gave_up  # exit 1: the process manager takes over


@pytest.mark.parametrize("tls", [True, False])
def test_sample_captions_go_over_grpc_unless_grpc_is_tls_only(monkeypatch, capsys, tls):
    from types import SimpleNamespace

    import numpy as np
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    from launcher import cli

    used = []

    class Client:
        def __init__(self, url, **kwargs):
            used.append(url)

        def infer(self, model, inputs):
            return SimpleNamespace(as_numpy=lambda name: np.array([[b"a red circle"]], dtype=np.object_))

        def close(self):
            pass

    monkeypatch.setattr(http_client, "InferenceServerClient", Client)
    monkeypatch.setattr(grpc_client, "InferenceServerClient", Client)
    cli.caption_samples(SimpleNamespace(http_url="127.0.0.1:8000", grpc_url="127.0.0.1:8001"), 1, tls=tls)
    assert used == (["127.0.0.1:8000"] if tls else ["127.0.0.1:8001"])
    assert ("over HTTP (gRPC is TLS-only)" in capsys.readouterr().out) == tls
