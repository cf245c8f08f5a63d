"""launcher.control.ModelControl against a local HTTP server that answers as Triton's
model-control API does, and one that never answers (a wedged tritonserver)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from launcher.control import ControlError, ModelControl, ServerGone
from launcher.tritonserver import TritonServer


@pytest.fixture
def triton_api():
    seen: list[tuple[str, str | None]] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((self.path, self.headers.get("key")))
            if self.path == "/v2/repository/index":
                self._answer(200, [{"name": "captioner", "version": "1", "state": "READY"}])
            elif self.path == "/v2/repository/models/broken/load":
                self._answer(400, {"error": "load failed for model 'broken': no version"})
            elif self.path == "/v2/repository/models/wedged/load":
                release.wait(60)  # a server that took the request and never answers
            else:
                self._answer(200, None)

        def _answer(self, status, body):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_load_unload_and_the_index_reach_triton_with_the_control_headers(triton_api):
    url, seen = triton_api
    c = ModelControl(url, 5.0)
    c.unload_model("preprocess", headers={"key": "v"})
    c.load_model("preprocess", headers={"key": "v"})
    assert c.get_model_repository_index() == [{"name": "captioner", "version": "1", "state": "READY"}]
    assert seen == [
        ("/v2/repository/models/preprocess/unload", "v"),
        ("/v2/repository/models/preprocess/load", "v"),
        ("/v2/repository/index", None),
    ]


def test_an_error_status_raises_with_tritons_message(triton_api):
    url, _ = triton_api
    with pytest.raises(ControlError, match=r"\[400\] load failed for model 'broken'"):
        ModelControl(url, 5.0).load_model("broken")


def test_a_call_to_a_server_that_stops_serving_is_given_up_not_waited_out(triton_api):
    """The wedged server's load never answers; once `serving()` says no, the call ends
    with ServerGone long before its 60 s timeout would."""
    url, _ = triton_api
    asked = []

    def serving():
        asked.append(1)
        return len(asked) < 3

    with pytest.raises(ServerGone, match="stopped serving"):
        ModelControl(url, 60.0, serving=serving, poll_s=0.05).load_model("wedged")
    assert len(asked) == 3


def test_a_call_that_gets_no_answer_times_out(triton_api):
    url, _ = triton_api
    with pytest.raises(TimeoutError, match="no answer within 0.3 s"):
        ModelControl(url, 0.3, serving=lambda: True, poll_s=0.05).load_model("wedged")


def test_a_server_is_listening_until_its_endpoint_closes():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = SimpleNamespace(host="0.0.0.0", ports={"http": sock.getsockname()[1]})
    assert TritonServer.listening(server) is True  # type: ignore[arg-type]
    sock.close()
    assert TritonServer.listening(server) is False  # type: ignore[arg-type]
