"""python -m captioner.serve: the `make serve` entry point.

Builds the model repository when it is missing or was built from another checkpoint
(through `python -m build.build_engines`), starts tritonserver, captions three sample
scenes over gRPC so you see it work, then keeps serving (log in a file) until Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from .server import DEFAULT_PORTS, PROJECT_ROOT, ServerError, TritonServer
from .cli import env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m captioner.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("CAPTIONER_MODEL", "models/default"), help="checkpoint dir or file")
    p.add_argument("--repo", default=os.environ.get("CAPTIONER_REPO", "model_repository"), help="Triton model repository")
    p.add_argument("--target", default=os.environ.get("CAPTIONER_TARGET", "auto"), choices=("auto", "cpu", "gpu"))
    p.add_argument("--precision", default=os.environ.get("CAPTIONER_PRECISION", "fp32"), choices=("fp32", "fp16", "int8"))
    p.add_argument("--rebuild", action="store_true", help="rebuild the repository even when it is up to date")
    p.add_argument(
        "--host",
        default=os.environ.get("CAPTIONER_HOST", "127.0.0.1"),
        help="address to bind (0.0.0.0 exposes the server to the network)",
    )
    p.add_argument("--http-port", type=int, default=env("CAPTIONER_HTTP_PORT", DEFAULT_PORTS["http"], int))
    p.add_argument("--grpc-port", type=int, default=env("CAPTIONER_GRPC_PORT", DEFAULT_PORTS["grpc"], int))
    p.add_argument("--metrics-port", type=int, default=env("CAPTIONER_METRICS_PORT", DEFAULT_PORTS["metrics"], int))
    p.add_argument("--log-file", default=os.environ.get("CAPTIONER_SERVER_LOG", "logs/tritonserver.log"))
    p.add_argument("--samples", type=int, default=3, help="sample scenes to caption once the server is up")
    p.add_argument("--startup-timeout", type=float, default=float(os.environ.get("CAPTIONER_STARTUP_TIMEOUT", 300)))
    return p.parse_args(argv)


def stale_reason(repo: Path, checkpoint_path: Path, target: str) -> str | None:
    """Why the repository must be (re)built, or None when it serves this checkpoint."""
    from build.repository import RepositoryError, check_repository, recorded_checkpoint

    from .checkpoint import file_sha256

    recorded = recorded_checkpoint(repo)
    if recorded is None:
        return f"no model repository at {repo}"
    if recorded != file_sha256(checkpoint_path):
        return f"{repo} was built from another checkpoint than {checkpoint_path}"
    try:
        configs = check_repository(repo)
    except RepositoryError as e:
        return f"{repo} is incomplete: {e}"
    built_for = configs["captioner"].parameters["target"].string_value
    if target != "auto" and built_for != target:
        return f"{repo} was built for {built_for}, not {target}"
    for model_py in (PROJECT_ROOT / "build" / "triton_models").glob("*/model.py"):
        served = repo / model_py.parent.name / "1" / "model.py"
        if served.is_file() and served.read_bytes() != model_py.read_bytes():
            return f"{served} differs from {model_py}"
    return None


def build(args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "build.build_engines", "--model", args.model, "--target", args.target]
    cmd += ["--precision", args.precision, "--repo", args.repo]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT)


def sample_images(n: int, seed: int = 2024) -> list[tuple[bytes, object]]:
    """Scenes drawn to the spec, as PNG bytes, with their ground truth."""
    from .scenes import encoded_scenes

    return encoded_scenes(n, seed)


def caption_samples(server: TritonServer, n: int) -> None:
    import tritonclient.grpc as grpcclient

    from .scenes import all_captions, caption_is_correct

    client = grpcclient.InferenceServerClient(server.grpc_url)
    for i, (data, scene) in enumerate(sample_images(n), 1):
        image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        result = client.infer("captioner", [image])
        caption = result.as_numpy("CAPTION")[0, 0].decode()
        verdict = "correct" if caption_is_correct(caption, scene) else "WRONG"
        print(f"  scene {i}: {caption!r}  ({verdict}; the scene is {all_captions(scene)[0]!r})")
    client.close()


def _interrupt(signum, frame):
    """SIGTERM (kill, docker stop) takes the same orderly path as Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .checkpoint import resolve

    try:
        checkpoint_path = resolve(args.model)
    except FileNotFoundError as e:
        print(f"error: {e}. Train one (make default-model) or pass MODEL=<checkpoint dir>.", file=sys.stderr)
        return 2
    repo = Path(args.repo)
    reason = "--rebuild given" if args.rebuild else stale_reason(repo, checkpoint_path, args.target)
    if reason:
        print(f"Building the model repository: {reason}.", flush=True)
        build(args)

    server = TritonServer(
        repo,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: restore it so Ctrl-C (or kill -INT) always stops us in order.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"Starting {server.binary.path} on {repo} (log: {server.log_file}) ...", flush=True)
        server.start(timeout_s=args.startup_timeout)
        print(f"Ready. gRPC {server.grpc_url}   HTTP {server.http_url}   metrics {server.metrics_url}")
        if args.samples:
            print(f"Captions of {args.samples} sample scenes, over gRPC:")
            caption_samples(server, args.samples)
        print("Serving; Ctrl-C stops.", flush=True)
        code = server.wait()
        print(f"tritonserver exited with code {code}; log tail:\n{server.log_tail()}", file=sys.stderr)
        return code or 1
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping tritonserver ...", flush=True)
        return 0
    finally:
        server.close()
        print("Stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
