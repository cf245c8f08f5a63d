"""`python -m client IMAGE_OR_DIR...`: print `path<TAB>caption` for each image, in input order.

Failures go to stderr as `path: reason`; the others are still printed and the exit
status is 1 if any image failed (2 for bad usage or nothing to caption).

`python -m client health [...]` is the deep health check (client/health.py) when the first
argument is `health` and no file or folder of that name exists in the current directory;
when one does, it is captioned as before. `python -m client.health` is always the check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from captioner.cli import env as _env
from captioner.cli import flag as _flag
from client import health
from client.core import DEFAULT_MODEL, DEFAULT_URL, AsyncCaptionClient, RetryPolicy, find_images
from client.endpoints import parse_endpoints
from client.options import add_tls_flags, tls_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories (walked, sorted)")
    p.add_argument(
        "--url",
        default=_env("CAPTIONER_URL", DEFAULT_URL),
        help="Triton gRPC address, or several comma separated (host1:8001,host2:8001): requests are "
        "spread over them and fail over [$CAPTIONER_URL]",
    )
    p.add_argument(
        "--model-name", default=_env("CAPTIONER_MODEL_NAME", DEFAULT_MODEL), help="served model [$CAPTIONER_MODEL_NAME]"
    )
    p.add_argument(
        "--beam",
        type=int,
        default=_env("CAPTIONER_BEAM", None, int),
        help="beam size 1-10 (default: the model's) [$CAPTIONER_BEAM]",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=_env("CAPTIONER_MAX_LENGTH", None, int),
        help="max caption tokens 1-50 [$CAPTIONER_MAX_LENGTH]",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=_env("CAPTIONER_TEMPERATURE", None, float),
        help="sampling temperature [$CAPTIONER_TEMPERATURE]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=_env("CAPTIONER_CONCURRENCY", 8, int),
        help="requests in flight [$CAPTIONER_CONCURRENCY]",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=_env("CAPTIONER_TIMEOUT", 30.0, float),
        help="seconds per image, retries included; the server gets the time left too [$CAPTIONER_TIMEOUT]",
    )
    p.add_argument(
        "--attempt-timeout",
        type=float,
        default=_env("CAPTIONER_ATTEMPT_TIMEOUT", None, float),
        help="seconds one attempt may take before the image is tried on another endpoint "
        "(default: all the time left) [$CAPTIONER_ATTEMPT_TIMEOUT]",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=_env("CAPTIONER_RETRIES", RetryPolicy.max_attempts, int),
        help="attempts per image while endpoints are unavailable, broken or reloading [$CAPTIONER_RETRIES]",
    )
    p.add_argument("--scores", action="store_true", help="add the caption's log-probability as a column")
    p.add_argument(
        "--show-version",
        action="store_true",
        help="add the model version that answered as a last column (<repository version>:<checkpoint "
        "sha256[:8]>, '-' from a server without MODEL_VERSION)",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        default=_env("CAPTIONER_STATS", False, _flag),
        help="print retries and per-endpoint counts to stderr at the end [$CAPTIONER_STATS]",
    )
    add_tls_flags(p)
    return p


async def run(args: argparse.Namespace, out=sys.stdout, err=sys.stderr, client_factory=AsyncCaptionClient) -> int:
    images = find_images(args.inputs)
    if not images:
        print("no images found in " + " ".join(args.inputs), file=err)
        return 2
    from tqdm import tqdm

    failed = retried = 0
    client = client_factory(
        args.url,
        args.model_name,
        concurrency=args.concurrency,
        timeout=args.timeout,
        attempt_timeout=args.attempt_timeout,
        retry=RetryPolicy(max_attempts=args.retries),
        tls=tls_from_args(args),
    )
    async with client:
        results = client.caption_iter(
            [str(p) for p in images], beam_size=args.beam, max_length=args.max_length, temperature=args.temperature
        )
        # disable=None: the bar shows only on a terminal, never in pipes or logs.
        with tqdm(total=len(images), unit="img", file=err, disable=None, leave=False) as bar:
            async for r in results:
                bar.update()
                retried += r.attempts > 1
                if r.ok:
                    cols = [r.image, r.caption] + ([f"{r.score:.4f}"] if args.scores else [])
                    cols += [r.model_version or "-"] if args.show_version else []
                    bar.write("\t".join(cols), file=out)
                else:
                    failed += 1
                    bar.write(str(r.error), file=err)
        if args.stats:
            print_stats(client.stats(), len(images), failed, retried, err)
    if failed:
        print(f"{failed} of {len(images)} images failed", file=err)
    return 1 if failed else 0


def print_stats(endpoints: list[dict], images: int, failed: int, retried: int, err) -> None:
    print(f"stats: {images - failed} of {images} images captioned, {retried} needed more than one attempt", file=err)
    for e in endpoints:
        print(
            f"stats: {e['url']}: {e['sent']} attempts, {e['ok']} ok, {e['failed']} failed, "
            f"set aside {e['set_aside']} times, {'up' if e['up'] else 'set aside'} now"
            + (f"; last error: {e['last_error']}" if e["last_error"] else ""),
            file=err,
        )


def is_health_command(argv: list[str]) -> bool:
    """`health` first and no such path here: a folder named `health` keeps being captioned."""
    return bool(argv) and argv[0] == "health" and not Path("health").exists()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if is_health_command(argv):
        return health.main(argv[1:], prog="python -m client health")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_endpoints(args.url)
        tls_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    for flag, value, lo in (("--concurrency", args.concurrency, 1), ("--retries", args.retries, 1)):
        if value < lo:
            parser.error(f"{flag} must be >= {lo}")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.attempt_timeout is not None and args.attempt_timeout <= 0:
        parser.error("--attempt-timeout must be > 0")
    try:
        return asyncio.run(run(args))
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
