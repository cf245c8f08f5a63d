"""Request tracing through the launcher (`python -m launcher --trace-rate N`), for real:

- OpenTelemetry mode: tritonserver exports spans over OTLP/HTTP to a receiver in this test,
  decoded with opentelemetry-proto; one caption request yields a span for the ensemble, one
  for each of its steps (parented to it) and a compute span under each step.
- Triton mode: the trace files bench.trace_summary reads; its breakdown of a request names
  every step and fits inside the time the client waited."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench import trace_summary
from bench.faults.harness import Launcher
from builder.repository_check import check_repository
from captioner.serving import ENSEMBLE

pytestmark = pytest.mark.integration


class OtlpReceiver:
    """POST /v1/traces (OTLP/HTTP, protobuf or JSON) -> decoded spans."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list = []
        self.content_types: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                kind = self.headers.get("Content-Type", "")
                receiver.content_types.add(kind)
                request = ExportTraceServiceRequest()
                if "json" in kind:
                    from google.protobuf import json_format

                    json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), request)
                else:
                    request.ParseFromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", kind or "application/x-protobuf")
                self.end_headers()
                reply = ExportTraceServiceResponse()
                self.wfile.write(json_format.MessageToJson(reply).encode() if "json" in kind else reply.SerializeToString())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _hex_ids_to_base64(doc):
    """OTLP/JSON spells trace and span ids in hex; protobuf's JSON mapping wants base64."""
    if isinstance(doc, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId") and v
            else _hex_ids_to_base64(v)
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_hex_ids_to_base64(v) for v in doc]
    return doc


def _attr(span, key):
    for kv in span.attributes:
        if kv.key == key:
            v = kv.value
            return v.string_value or v.int_value
    return None


def _caption(url: str, n: int = 1) -> float:
    """n captions over gRPC, one after another; the slowest one's wall time in ms."""
    import tritonclient.grpc as grpcclient

    from captioner.scenes import encoded_scenes

    client = grpcclient.InferenceServerClient(url)
    slowest = 0.0
    try:
        for data, _ in encoded_scenes(n, 5):
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
            t0 = time.perf_counter()
            client.infer(ENSEMBLE, [inp])
            slowest = max(slowest, (time.perf_counter() - t0) * 1e3)
    finally:
        client.close()
    return slowest


def _steps(repo) -> list[str]:
    return [s.model_name for s in check_repository(repo)[ENSEMBLE].ensemble_scheduling.step]


def test_one_request_yields_opentelemetry_spans_for_every_ensemble_step(triton_server, tmp_path):
    receiver = OtlpReceiver()
    try:
        extra = ("--trace-rate", "1", "--trace-otlp", receiver.url)
        with Launcher(triton_server.repository, tmp_path, "trace-otlp", extra=extra) as srv:
            _caption(srv.grpc_url)
            steps = _steps(triton_server.repository)
            deadline = time.monotonic() + 30  # the batch span processor exports every few seconds
            root = None
            while time.monotonic() < deadline and root is None:
                # the caption above, or one of the supervisor's probes: every request is traced
                for candidate in [s for s in receiver.spans if _attr(s, "triton.model_name") == ENSEMBLE]:
                    trace = [s for s in receiver.spans if s.trace_id == candidate.trace_id]
                    children = [s for s in trace if s.parent_span_id == candidate.span_id]
                    computes = [s for s in trace if s.name == "compute"]
                    if len(children) >= len(steps) and len(computes) >= len(steps):
                        root = candidate
                        break
                time.sleep(0.5)
    finally:
        receiver.close()
    assert root is not None, f"no complete ensemble trace among {len(receiver.spans)} spans ({receiver.content_types})"
    by_model = {_attr(s, "triton.model_name"): s for s in children}
    assert set(steps) <= set(by_model), f"steps {steps}, spans under the ensemble: {sorted(by_model)}"
    for model in steps:
        step = by_model[model]
        assert root.start_time_unix_nano <= step.start_time_unix_nano <= step.end_time_unix_nano <= root.end_time_unix_nano
        (compute,) = [s for s in computes if s.parent_span_id == step.span_id]
        assert [e.name for e in compute.events] == ["COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"]
        assert {e.name for e in step.events} >= {"REQUEST_START", "QUEUE_START", "REQUEST_END"}


def test_the_trace_summary_breaks_a_real_request_down_per_step(triton_server, tmp_path, capsys):
    trace_file = tmp_path / "trace.json"
    extra = ("--trace-rate", "1", "--trace-file", str(trace_file), "--trace-log-frequency", "1")
    with Launcher(triton_server.repository, tmp_path, "trace-file", extra=extra) as srv:
        _caption(srv.grpc_url, 3)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if len(trace_summary.requests(trace_summary.load(trace_summary.trace_files(trace_file)))) >= 3:
                    break
            except (FileNotFoundError, ValueError):  # not written yet, or being written
                pass
            time.sleep(0.5)
    assert trace_summary.main([str(trace_file)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "traced requests" in out  # the three captions and the supervisor's probes
    reqs = trace_summary.requests(trace_summary.load(trace_summary.trace_files(trace_file)))
    assert len(reqs) >= 3
    for req in reqs:
        assert [c.model for c in req.children] == _steps(triton_server.repository)
        assert 0 < trace_summary.covered_ms(req) <= req.total_ms
        for step in req.children:
            assert all(v is not None and v >= 0 for v in step.phases_ms().values()), step
            assert step.model in out
