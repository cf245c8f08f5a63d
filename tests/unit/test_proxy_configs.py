"""deploy/proxy: the nginx and Envoy gRPC balancers as `make serve-containers` renders them.
nginx's is checked by nginx itself (`nginx -t`, Debian's package); Envoy's structure only
(Envoy is not in Debian 12 and was not run here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.serve_containers import BODY_MARGIN_BYTES, MAX_FAILS, render, render_envoy

UPSTREAMS = ["127.0.0.1:18001", "127.0.0.1:18011", "127.0.0.1:18021"]
MAX_BODY = 32 * (20 * 2**20 + 4) + BODY_MARGIN_BYTES
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _locations(conf: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"location (\S+) \{(.*?)\}", conf, re.S)}


def test_nginx_balances_each_call_over_every_replica_and_retries_only_inference(tmp_path):
    conf = render(UPSTREAMS, "127.0.0.1:8001", MAX_BODY)
    upstream = re.search(r"upstream captioner \{(.*?)\}", conf, re.S)[1]
    servers = re.findall(r"^\s*server (\S+) max_fails=(\d+) fail_timeout=(\d+)s;", upstream, re.M)
    assert [s[0] for s in servers] == UPSTREAMS and all(int(s[1]) == MAX_FAILS for s in servers)
    assert re.search(r"listen 127\.0\.0\.1:8001 http2;", conf)
    assert re.search(rf"client_max_body_size {MAX_BODY};", conf)
    locations = _locations(conf)
    assert set(locations) == {INFER, "/"}
    for body in locations.values():
        assert "grpc_pass grpc://captioner;" in body
    # Only inference (idempotent) is passed on after it reached a replica.
    assert "non_idempotent" in locations[INFER] and "non_idempotent" not in locations["/"]

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if nginx is None:
        pytest.skip("nginx is not installed: the rendered config was NOT checked by nginx -t (apt-get install nginx)")
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / d).mkdir(parents=True)
    (tmp_path / "nginx.conf").write_text(conf)
    out = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr


def test_envoy_retries_inference_on_another_replica_and_ejects_failing_ones():
    doc = yaml.safe_load(render_envoy(UPSTREAMS, "127.0.0.1:8001", MAX_BODY))["static_resources"]
    (listener,) = doc["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8001}
    (cluster,) = doc["clusters"]
    endpoints = [e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [f"{e['address']}:{e['port_value']}" for e in endpoints] == UPSTREAMS
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]  # gRPC to the replicas
    assert cluster["outlier_detection"]["consecutive_gateway_failure"] >= 1
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    infer = next(r for r in routes if r["match"].get("path") == INFER)
    retry_on = set(infer["route"]["retry_policy"]["retry_on"].split(","))
    assert {"reset", "connect-failure", "unavailable"} <= retry_on
    assert infer["per_request_buffer_limit_bytes"] == MAX_BODY  # the body is kept, so a retry can resend it
    assert all("retry_policy" not in r["route"] for r in routes if r is not infer)
