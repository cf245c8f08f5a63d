"""Deep health check: one tiny real inference through the `captioner` ensemble.

    python -m client.health [--url HOST:PORT[,...]] [--timeout 5] [TLS flags]
    python -m client health ...          (the same, see client/__main__.py)

Readiness is not enough: a replica whose Python-backend stub died still answers ready
while every request fails. This sends a small valid image (made in memory) and succeeds
only when a caption comes back. One line per endpoint, `ok` with the latency or `FAIL`
with the reason; exit status 0 when every endpoint listed is healthy, 1 otherwise, 2 for
bad usage. No retries: a probe reports what it sees now. Meant for supervisors and
Kubernetes exec liveness probes.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from captioner.cli import env as _env
from client.core import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    CaptionError,
    TLSConfig,
    _image_input,
    _parse_result,
    _requested_outputs,
    _status_text,
    make_triton_client,
    probe_image,
)
from client.endpoints import parse_endpoints
from client.options import add_tls_flags, tls_from_args


@dataclass(frozen=True)
class HealthReport:
    url: str
    ok: bool
    latency_s: float
    caption: str | None = None
    reason: str | None = None  # why it failed; None when ok

    def line(self) -> str:
        if self.ok:
            return f"ok {self.url} {self.latency_s * 1000:.0f} ms caption={self.caption!r}"
        return f"FAIL {self.url} after {self.latency_s * 1000:.0f} ms: {self.reason}"


async def check_async(url: str, *, model: str = DEFAULT_MODEL, timeout: float = 5.0, tls: TLSConfig | None = None,
                      client_factory=None) -> HealthReport:
    """One endpoint (`host:port`): a real inference of a tiny image within `timeout` seconds."""
    from tritonclient.utils import InferenceServerException

    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    client = (client_factory or make_triton_client)(url, tls)
    start = time.monotonic()
    try:
        result = await client.infer(model, [_image_input(probe_image())], outputs=_requested_outputs(),
                                    client_timeout=timeout, timeout=int(timeout * 1e6))
        cap = _parse_result(result, "health")
    except InferenceServerException as e:
        return HealthReport(url, False, time.monotonic() - start,
                            reason=f"{_status_text(e.status())}: {e.message() or 'no details'}")
    except CaptionError as e:
        return HealthReport(url, False, time.monotonic() - start, reason=e.reason)
    finally:
        await client.close()
    if not cap.caption or not cap.caption.strip():
        return HealthReport(url, False, time.monotonic() - start, reason="the server returned an empty caption")
    return HealthReport(url, True, time.monotonic() - start, caption=cap.caption)


def check(url: str, *, model: str = DEFAULT_MODEL, timeout: float = 5.0, tls: TLSConfig | None = None,
          client_factory=None) -> HealthReport:
    """Synchronous `check_async` (not from inside a running event loop)."""
    return asyncio.run(check_async(url, model=model, timeout=timeout, tls=tls, client_factory=client_factory))


def build_parser(prog: str = "python -m client.health") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--url", default=_env("CAPTIONER_URL", DEFAULT_URL),
                   help="Triton gRPC address(es), comma separated: every one is checked [$CAPTIONER_URL]")
    p.add_argument("--model-name", default=_env("CAPTIONER_MODEL_NAME", DEFAULT_MODEL),
                   help="served model [$CAPTIONER_MODEL_NAME]")
    p.add_argument("--timeout", type=float, default=_env("CAPTIONER_HEALTH_TIMEOUT", 5.0, float),
                   help="seconds for the whole check of one endpoint [$CAPTIONER_HEALTH_TIMEOUT]")
    add_tls_flags(p)
    return p


async def _check_all(urls, args, tls, client_factory):
    return await asyncio.gather(*(check_async(u, model=args.model_name, timeout=args.timeout, tls=tls,
                                              client_factory=client_factory) for u in urls))


def main(argv: list[str] | None = None, out=None, client_factory=None, prog: str = "python -m client.health") -> int:
    out = out or sys.stdout
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    try:
        urls = parse_endpoints(args.url)
        tls = tls_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    reports = asyncio.run(_check_all(urls, args, tls, client_factory))
    for r in reports:
        print(r.line(), file=out)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
