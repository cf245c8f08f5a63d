"""Deep health check: one tiny real inference through the `captioner` ensemble.

    python -m client.health [--url HOST:PORT[,...]] [--timeout 5] [TLS flags]
    python -m client health ...          (the same, see client/__main__.py)

Readiness is not enough: a replica whose Python-backend stub died still answers ready
while every request fails. This sends a small valid image (made in memory) and succeeds
only when a caption comes back. One line per endpoint, `ok` with the latency or `FAIL`
with the reason; exit status 0 when every endpoint listed is healthy, 1 otherwise, 2 for
bad usage. No retries: a probe reports what it sees now. Meant for supervisors and
Kubernetes exec liveness probes.

`--overload-ok` (what the liveness probes in deploy/k8s use): a replica that sheds the
probe as overloaded ("Exceeds maximum queue size", "Request timeout expired") is alive
and full, not dead; restarting it would turn overload into an outage, so it passes, with
`ok (overloaded)`. Readiness and the load balancer's routing are what react to load.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from captioner.cli import env as _env
from captioner.cli import flag as _flag
from client.core import DEFAULT_MODEL, DEFAULT_URL
from client.endpoints import Failure, classify, parse_endpoints, status_text
from client.images import probe_image
from client.options import add_tls_flags, tls_from_args
from client.results import CaptionError, parse_result
from client.tls import TLSConfig, make_triton_client
from client.wire import image_input, requested_outputs

# Triton drops the probe itself once it has queued for this share of the timeout, so on
# an overloaded replica the probe is answered "Request timeout expired" before its gRPC
# deadline: a probe that gives up cancels its call (a probe process cannot leave it
# running), and a cancellation racing a response can crash Triton 2.51 (upstream issues
# 7368/8034). Liveness probes run every few seconds, so that race must stay rare.
SERVER_SHARE = 0.8


@dataclass(frozen=True)
class HealthReport:
    url: str
    ok: bool
    latency_s: float
    caption: str | None = None
    reason: str | None = None  # why it failed, or why it passed without a caption (overloaded)

    def line(self) -> str:
        if self.ok and self.reason:
            return f"ok (overloaded) {self.url} {self.latency_s * 1000:.0f} ms: {self.reason}"
        if self.ok:
            return f"ok {self.url} {self.latency_s * 1000:.0f} ms caption={self.caption!r}"
        return f"FAIL {self.url} after {self.latency_s * 1000:.0f} ms: {self.reason}"


async def check_async(
    url: str,
    *,
    model: str = DEFAULT_MODEL,
    timeout: float = 5.0,
    tls: TLSConfig | None = None,
    overload_ok: bool = False,
    client_factory=None,
) -> HealthReport:
    """One endpoint (`host:port`): a real inference of a tiny image within `timeout` seconds;
    with `overload_ok`, an overload refusal passes too."""
    from tritonclient.utils import InferenceServerException

    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    client = (client_factory or make_triton_client)(url, tls)
    start = time.monotonic()
    try:
        result = await client.infer(
            model,
            [image_input(probe_image())],
            outputs=requested_outputs(),
            client_timeout=timeout,
            timeout=int(timeout * SERVER_SHARE * 1e6),
        )
        cap = parse_result(result, "health")
    except InferenceServerException as e:
        overloaded = overload_ok and classify(e.status(), e.message()) is Failure.OVERLOADED
        return HealthReport(
            url, overloaded, time.monotonic() - start, reason=f"{status_text(e.status())}: {e.message() or 'no details'}"
        )
    except CaptionError as e:
        return HealthReport(url, False, time.monotonic() - start, reason=e.reason)
    finally:
        await client.close()
    if not cap.caption or not cap.caption.strip():
        return HealthReport(url, False, time.monotonic() - start, reason="the server returned an empty caption")
    return HealthReport(url, True, time.monotonic() - start, caption=cap.caption)


def check(
    url: str,
    *,
    model: str = DEFAULT_MODEL,
    timeout: float = 5.0,
    tls: TLSConfig | None = None,
    overload_ok: bool = False,
    client_factory=None,
) -> HealthReport:
    """Synchronous `check_async` (not from inside a running event loop)."""
    return asyncio.run(
        check_async(url, model=model, timeout=timeout, tls=tls, overload_ok=overload_ok, client_factory=client_factory)
    )


def build_parser(prog: str = "python -m client.health") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument(
        "--url",
        default=_env("CAPTIONER_URL", DEFAULT_URL),
        help="Triton gRPC address(es), comma separated: every one is checked [$CAPTIONER_URL]",
    )
    p.add_argument(
        "--model-name", default=_env("CAPTIONER_MODEL_NAME", DEFAULT_MODEL), help="served model [$CAPTIONER_MODEL_NAME]"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=_env("CAPTIONER_HEALTH_TIMEOUT", 5.0, float),
        help="seconds for the whole check of one endpoint [$CAPTIONER_HEALTH_TIMEOUT]",
    )
    p.add_argument(
        "--overload-ok",
        action="store_true",
        default=_env("CAPTIONER_HEALTH_OVERLOAD_OK", False, _flag),
        help="pass when the replica sheds the probe as overloaded (alive, full): for liveness "
        "probes [$CAPTIONER_HEALTH_OVERLOAD_OK]",
    )
    add_tls_flags(p)
    return p


async def _check_all(urls, args, tls, client_factory):
    return await asyncio.gather(
        *(
            check_async(
                u,
                model=args.model_name,
                timeout=args.timeout,
                tls=tls,
                overload_ok=args.overload_ok,
                client_factory=client_factory,
            )
            for u in urls
        )
    )


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
