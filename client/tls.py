"""gRPC over TLS: which files, and the tritonclient that uses them."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TLSConfig:
    """gRPC over TLS. `root_cert`: PEM file of the CA that signed the server's certificate
    (None: the system's roots). `client_cert` + `client_key`: PEM files for mutual TLS."""

    root_cert: str | os.PathLike | None = None
    client_cert: str | os.PathLike | None = None
    client_key: str | os.PathLike | None = None

    def __post_init__(self):
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        for what, path in (
            ("root certificate", self.root_cert),
            ("client certificate", self.client_cert),
            ("client key", self.client_key),
        ):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"TLS {what} {os.fspath(path)!r} is not a readable file")

    def client_kwargs(self) -> dict:
        """tritonclient.grpc(.aio).InferenceServerClient's TLS arguments (it reads the files)."""
        return {
            "ssl": True,
            "root_certificates": _path_or_none(self.root_cert),
            "private_key": _path_or_none(self.client_key),
            "certificate_chain": _path_or_none(self.client_cert),
        }


def _path_or_none(p) -> str | None:
    return os.fspath(p) if p else None


def make_triton_client(url: str, tls: TLSConfig | None = None):
    """A tritonclient.grpc.aio client for one endpoint (lazy: connects on first use)."""
    import tritonclient.grpc.aio as grpcclient

    return grpcclient.InferenceServerClient(url, **(tls.client_kwargs() if tls else {}))
