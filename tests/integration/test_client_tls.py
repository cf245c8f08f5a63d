"""The client's TLS options against a real tritonserver serving gRPC with mutual TLS
(certificates from a throwaway CA made with the openssl CLI), started with the flags
`make serve` derives from its own options (TLS and a restricted-API key)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client import CaptionClient, TLSConfig
from client.health import check
from launcher import cli as serve
from launcher.tritonserver import TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")]
ROOT = Path(__file__).resolve().parents[2]
KEY = ("admin-key", "s3cret")  # the restricted-API header of the fixture's server


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(d: Path, name: str, subject: str, ext: str) -> None:
    """A key and a certificate signed by the CA in `d`."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=captioner test CA",
        cwd=d,
    )
    issue(d, "server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    issue(d, "client", "/CN=captioner client", "extendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture(scope="module")
def mtls_server(triton_server, pki, tmp_path_factory):
    launcher = serve.parse_args(
        [
            "--no-build",
            "--grpc-ssl-cert",
            str(pki / "server.pem"),
            "--grpc-ssl-key",
            str(pki / "server.key"),
            "--grpc-ssl-root-cert",
            str(pki / "ca.pem"),
            "--restricted-key",
            f"{KEY[0]}={KEY[1]}",
        ]
    )
    server = TritonServer(
        triton_server.repository, log_file=tmp_path_factory.mktemp("tls") / "triton.log", extra_args=serve.server_args(launcher)
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def tls_flags(pki: Path, client_cert: bool = True) -> list[str]:
    flags = ["--tls-root-cert", str(pki / "ca.pem")]
    if client_cert:
        flags += ["--tls-client-cert", str(pki / "client.pem"), "--tls-client-key", str(pki / "client.key")]
    return flags


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_library_captions_over_mutual_tls(mtls_server, pki, tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "w.png")
    tls = TLSConfig(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    with CaptionClient(mtls_server.grpc_url, tls=tls) as c:
        r = c.caption_one(str(tmp_path / "w.png"))
    assert r.ok and r.caption
    report = check(mtls_server.grpc_url, tls=tls, timeout=10)
    assert report.ok and report.caption, report


def test_cli_and_health_over_mutual_tls(mtls_server, pki, tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "w.png")
    proc = cli(str(tmp_path / "w.png"), "--url", mtls_server.grpc_url, *tls_flags(pki))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{tmp_path / 'w.png'}\t")
    env = dict(
        os.environ,
        CAPTIONER_TLS_ROOT_CERT=str(pki / "ca.pem"),
        CAPTIONER_TLS_CLIENT_CERT=str(pki / "client.pem"),
        CAPTIONER_TLS_CLIENT_KEY=str(pki / "client.key"),
        CAPTIONER_URL=mtls_server.grpc_url,
    )
    ok = cli("health", env=env)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok {mtls_server.grpc_url} "), ok.stdout + ok.stderr


@pytest.mark.parametrize("flags", [[], ["root-only"]], ids=["plaintext", "no-client-cert"])
def test_without_the_right_credentials_nothing_is_captioned(mtls_server, pki, tmp_path, flags):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "w.png")
    extra = tls_flags(pki, client_cert=False) if flags else []
    proc = cli(str(tmp_path / "w.png"), "--url", mtls_server.grpc_url, "--retries", "1", "--timeout", "10", *extra)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"{tmp_path / 'w.png'}: server unavailable after 1 attempt" in proc.stderr, proc.stderr
    down = cli("health", "--url", mtls_server.grpc_url, "--timeout", "10", *extra)
    assert down.returncode == 1 and down.stdout.startswith(f"FAIL {mtls_server.grpc_url} "), down.stdout


def test_admin_apis_need_the_key_while_inference_and_health_stay_open(mtls_server, pki):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(mtls_server.http_url)
    assert http.is_server_ready()  # health: open, what load balancers and probes call
    with pytest.raises(InferenceServerException):
        http.get_model_repository_index()
    assert {m["name"] for m in http.get_model_repository_index(headers={KEY[0]: KEY[1]})} >= {"captioner", "encoder"}
    with pytest.raises(InferenceServerException):
        http.get_inference_statistics()
    grpc = grpcclient.InferenceServerClient(
        mtls_server.grpc_url,
        ssl=True,
        root_certificates=str(pki / "ca.pem"),
        private_key=str(pki / "client.key"),
        certificate_chain=str(pki / "client.pem"),
    )
    with pytest.raises(InferenceServerException):
        grpc.get_model_config("captioner")
    header = {f"triton-grpc-protocol-{KEY[0]}": KEY[1]}
    assert grpc.get_model_config("captioner", headers=header).config.name == "captioner"
    assert grpc.is_model_ready("captioner")  # health over gRPC: open
    grpc.close()
    http.close()
