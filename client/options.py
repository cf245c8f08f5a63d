"""Command-line options shared by `python -m client` and `python -m client.health`."""

from __future__ import annotations

import argparse

from captioner.cli import env as _env
from captioner.cli import flag as _flag
from client.tls import TLSConfig


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """TLS flags shared by the captioning CLI and the health check."""
    g = p.add_argument_group("TLS (gRPC); any certificate flag turns TLS on")
    g.add_argument(
        "--tls",
        action="store_true",
        default=_env("CAPTIONER_TLS", False, _flag),
        help="use TLS with the system's root certificates [$CAPTIONER_TLS]",
    )
    g.add_argument(
        "--tls-root-cert",
        default=_env("CAPTIONER_TLS_ROOT_CERT", None),
        metavar="PEM",
        help="CA certificate that signed the server's [$CAPTIONER_TLS_ROOT_CERT]",
    )
    g.add_argument(
        "--tls-client-cert",
        default=_env("CAPTIONER_TLS_CLIENT_CERT", None),
        metavar="PEM",
        help="client certificate for mutual TLS [$CAPTIONER_TLS_CLIENT_CERT]",
    )
    g.add_argument(
        "--tls-client-key",
        default=_env("CAPTIONER_TLS_CLIENT_KEY", None),
        metavar="PEM",
        help="client private key for mutual TLS [$CAPTIONER_TLS_CLIENT_KEY]",
    )


def tls_from_args(args) -> TLSConfig | None:
    """The TLSConfig the flags ask for (None: plaintext); ValueError for unusable files."""
    if not (args.tls or args.tls_root_cert or args.tls_client_cert or args.tls_client_key):
        return None
    return TLSConfig(args.tls_root_cert, args.tls_client_cert, args.tls_client_key)
