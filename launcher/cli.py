"""python -m launcher: the `make serve` entry point.

Builds the model repository when it is missing or was built from another checkpoint
(through `python -m builder.build_engines`), starts tritonserver, captions three sample
scenes over gRPC so you see it work, then keeps serving (log in a file) until Ctrl-C or
SIGTERM, which drain: readiness false, new requests refused, accepted ones finished.

While serving, a supervisor (launcher.supervisor) reloads a model whose Python stub died
or hung and restarts tritonserver if it exits; `--replicas N` runs N servers on distinct
ports for failover experiments on one machine.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
from pathlib import Path

from captioner.cli import env, flag
from captioner.serving import PRECISIONS
from captioner.signals import StopFlag

from . import tracing
from .captions import caption_samples, http_probe
from .supervisor import DEFAULT_HANG_TIMEOUT_S, DEFAULT_MAX_RESTARTS, RESTART_WINDOW_S
from .tritonserver import DEFAULT_PORTS, PROJECT_ROOT, ServerError, TritonServer

# Everything but inference and health needs the key: those are what clients and probes use.
RESTRICTED_GROUPS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
REPLICA_PORT_STEP = 10  # replica k serves on every base port + 10 k
# Per-model latency quantiles on the metrics port (nv_inference_request_summary_us, ...):
# Triton 2.51 has no latency histogram, only these summaries and cumulative durations.
METRICS_CONFIG = ("--metrics-config=summary_latencies=true", "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01,0.99:0.001")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=env("CAPTIONER_MODEL", "models/default"),
        help="checkpoint dir or file, or seed-inception [$CAPTIONER_MODEL]",
    )
    p.add_argument("--repo", default=env("CAPTIONER_REPO", "model_repository"), help="Triton model repository [$CAPTIONER_REPO]")
    p.add_argument("--target", default=env("CAPTIONER_TARGET", "auto"), choices=("auto", "cpu", "gpu"))
    p.add_argument(
        "--precision",
        default=env("CAPTIONER_PRECISION", "fp32"),
        choices=PRECISIONS,
        help="encoder precision the build uses [$CAPTIONER_PRECISION]",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the repository even when it is up to date")
    p.add_argument(
        "--no-build",
        action="store_true",
        default=env("CAPTIONER_NO_BUILD", False, flag),
        help="serve the repository as it is; no checkpoint needed (images, pods) [$CAPTIONER_NO_BUILD]",
    )
    p.add_argument(
        "--host",
        default=env("CAPTIONER_HOST", "127.0.0.1"),
        help="address to bind (0.0.0.0 exposes the server to the network) [$CAPTIONER_HOST]",
    )
    p.add_argument("--http-port", type=int, default=env("CAPTIONER_HTTP_PORT", DEFAULT_PORTS["http"], int))
    p.add_argument("--grpc-port", type=int, default=env("CAPTIONER_GRPC_PORT", DEFAULT_PORTS["grpc"], int))
    p.add_argument("--metrics-port", type=int, default=env("CAPTIONER_METRICS_PORT", DEFAULT_PORTS["metrics"], int))
    p.add_argument(
        "--replicas",
        type=int,
        default=env("CAPTIONER_REPLICAS", 1, int),
        help=f"servers to run, replica k on every port + {REPLICA_PORT_STEP} k [$CAPTIONER_REPLICAS]",
    )
    p.add_argument(
        "--log-file",
        default=env("CAPTIONER_SERVER_LOG", "logs/tritonserver.log"),
        help="tritonserver's log; '-' writes it to standard output (containers) [$CAPTIONER_SERVER_LOG]",
    )
    p.add_argument(
        "--samples", type=int, default=env("CAPTIONER_SAMPLES", 3, int), help="sample scenes to caption once the server is up"
    )
    p.add_argument("--startup-timeout", type=float, default=env("CAPTIONER_STARTUP_TIMEOUT", 300.0, float))
    p.add_argument(
        "--drain-timeout",
        type=int,
        default=env("CAPTIONER_DRAIN_TIMEOUT", 30, int),
        help="seconds accepted requests get to finish on SIGTERM/Ctrl-C "
        "(tritonserver --exit-timeout-secs) [$CAPTIONER_DRAIN_TIMEOUT]",
    )
    p.add_argument(
        "--supervise",
        action=argparse.BooleanOptionalAction,
        default=env("CAPTIONER_SUPERVISE", True, flag),
        help="reload a model whose stub died or hung, restart a dead tritonserver [$CAPTIONER_SUPERVISE]",
    )
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=env("CAPTIONER_HANG_TIMEOUT", DEFAULT_HANG_TIMEOUT_S, float),
        help="a model with requests pending and no execution finished, or a stub inside one execute "
        "or with a silent heartbeat, for this long with idle stubs is hung (4x as long while they "
        "compute) [$CAPTIONER_HANG_TIMEOUT]",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=env("CAPTIONER_MAX_RESTARTS", DEFAULT_MAX_RESTARTS, int),
        help=f"tritonserver restarts allowed in {RESTART_WINDOW_S / 60:g} minutes before the launcher gives up "
        "[$CAPTIONER_MAX_RESTARTS]",
    )
    p.add_argument(
        "--trace-rate",
        type=int,
        default=env("CAPTIONER_TRACE_RATE", 0, int),
        help="trace one request in N with Triton's tracing (launcher.tracing); 0: off [$CAPTIONER_TRACE_RATE]",
    )
    p.add_argument(
        "--trace-file",
        default=env("CAPTIONER_TRACE_FILE", "logs/triton-trace.json"),
        help="where Triton writes traces (FILE.0, FILE.1, ...; python -m bench.trace_summary FILE) [$CAPTIONER_TRACE_FILE]",
    )
    p.add_argument(
        "--trace-log-frequency",
        type=int,
        default=env("CAPTIONER_TRACE_LOG_FREQUENCY", 10, int),
        help="traces per trace file [$CAPTIONER_TRACE_LOG_FREQUENCY]",
    )
    p.add_argument(
        "--trace-otlp",
        default=env("CAPTIONER_TRACE_OTLP", None),
        metavar="URL",
        help="export the traces as OpenTelemetry spans over OTLP/HTTP to URL instead of the file "
        "(e.g. http://127.0.0.1:4318/v1/traces) [$CAPTIONER_TRACE_OTLP]",
    )
    p.add_argument(
        "--supervisor-metrics-port",
        type=int,
        default=env("CAPTIONER_SUPERVISOR_METRICS_PORT", None, int),
        help="the supervisor's own metrics (repairs, restarts, deep probes; launcher.metrics) on this "
        "port; default the metrics port + 1; 0: none [$CAPTIONER_SUPERVISOR_METRICS_PORT]",
    )
    p.add_argument(
        "--grpc-ssl-cert",
        default=env("CAPTIONER_GRPC_SSL_CERT", None),
        help="PEM server certificate: gRPC over TLS [$CAPTIONER_GRPC_SSL_CERT]",
    )
    p.add_argument("--grpc-ssl-key", default=env("CAPTIONER_GRPC_SSL_KEY", None), help="PEM server key [$CAPTIONER_GRPC_SSL_KEY]")
    p.add_argument(
        "--grpc-ssl-root-cert",
        default=env("CAPTIONER_GRPC_SSL_ROOT_CERT", None),
        help="PEM CA that client certificates must chain to: mutual TLS [$CAPTIONER_GRPC_SSL_ROOT_CERT]",
    )
    p.add_argument(
        "--restricted-key",
        default=env("CAPTIONER_RESTRICTED_KEY", None),
        metavar="NAME=VALUE",
        help=f"require header NAME: VALUE (gRPC: triton-grpc-protocol-NAME) for {', '.join(RESTRICTED_GROUPS)}; "
        "inference and health stay open [$CAPTIONER_RESTRICTED_KEY]",
    )
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("--replicas must be >= 1")
    if a.trace_rate < 0 or a.trace_log_frequency < 0:
        p.error("--trace-rate and --trace-log-frequency must be >= 0")
    if a.supervisor_metrics_port is None:
        a.supervisor_metrics_port = a.metrics_port + 1
    if bool(a.grpc_ssl_cert) != bool(a.grpc_ssl_key):
        p.error("--grpc-ssl-cert and --grpc-ssl-key go together")
    if a.grpc_ssl_root_cert and not a.grpc_ssl_cert:
        p.error("--grpc-ssl-root-cert (mutual TLS) needs --grpc-ssl-cert and --grpc-ssl-key")
    for f in (a.grpc_ssl_cert, a.grpc_ssl_key, a.grpc_ssl_root_cert):
        if f and not Path(f).is_file():
            p.error(f"no such file: {f}")
    if a.restricted_key is not None:
        name, eq, value = a.restricted_key.partition("=")
        if not (name and eq and value) or any(c in a.restricted_key for c in ",: "):
            p.error("--restricted-key takes NAME=VALUE (no spaces, commas or colons)")
    return a


def server_args(a: argparse.Namespace) -> tuple[str, ...]:
    """tritonserver flags for TLS and restricted APIs."""
    out: list[str] = []
    if a.grpc_ssl_cert:
        out += ["--grpc-use-ssl=true", f"--grpc-server-cert={a.grpc_ssl_cert}", f"--grpc-server-key={a.grpc_ssl_key}"]
        if a.grpc_ssl_root_cert:
            out += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={a.grpc_ssl_root_cert}"]
    if a.restricted_key:
        groups = ",".join(RESTRICTED_GROUPS)
        out += [f"--grpc-restricted-protocol={groups}:{a.restricted_key}", f"--http-restricted-api={groups}:{a.restricted_key}"]
    return tuple(out)


def control_headers(a: argparse.Namespace) -> dict[str, str]:
    """HTTP headers that open the restricted APIs (the supervisor's load/unload)."""
    if not a.restricted_key:
        return {}
    name, _, value = a.restricted_key.partition("=")
    return {name: value}


def replica_log(log_file: str, k: int) -> str:
    if k == 0 or log_file == "-":
        return log_file
    p = Path(log_file)
    return str(p.with_name(f"{p.stem}-{k}{p.suffix}"))


def stale_reason(repo: Path, checkpoint_path: Path, target: str) -> str | None:
    """Why the repository must be (re)built, or None when it serves this checkpoint or holds
    it as one of its versions (a versioned repository serves the version make rollout or
    make rollback chose last)."""
    from builder import versions
    from builder.repository_check import RepositoryError, check_repository, recorded_checkpoint
    from captioner.checkpoint import file_sha256

    recorded = recorded_checkpoint(repo)
    if recorded is None:
        return f"no model repository at {repo}"
    sha = file_sha256(checkpoint_path)
    kept = {r.get("checkpoint_sha256") for v, r in versions.version_records(repo).items() if v in versions.all_versions(repo)}
    if recorded != sha and sha not in kept:
        return f"{repo} was built from another checkpoint than {checkpoint_path}"
    try:
        configs = check_repository(repo)
    except RepositoryError as e:
        return f"{repo} is incomplete: {e}"
    built_for = configs["captioner"].parameters["target"].string_value
    if target != "auto" and built_for != target:
        return f"{repo} was built for {built_for}, not {target}"
    try:
        serving = versions.serving_version(repo)
    except versions.VersionError as e:
        return str(e)
    for model_py in (PROJECT_ROOT / "builder" / "triton_models").glob("*/model.py"):
        served = repo / model_py.parent.name / str(serving) / "model.py"
        if served.is_file() and served.read_bytes() != model_py.read_bytes():
            return f"{served} differs from {model_py}"
    return None


def build(args: argparse.Namespace) -> None:
    """The repository for args.model, through the build's own entry point."""
    from builder.command import build_command

    cmd = build_command(args.model, args.repo, target=args.target, precision=args.precision)
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT)


class Stop(StopFlag):
    """Set by SIGTERM/SIGINT, or by a supervisor giving up (`gave_up`: the launcher then
    exits 1 so that the process manager above it acts); the main thread waits on it."""

    def __init__(self):
        super().__init__()
        self.gave_up = False

    def give_up(self) -> None:
        self.gave_up = True
        self.reason = "supervisor gave up"
        self.event.set()


RELOAD_TIMEOUT_MIN_S = 15.0
RELOAD_TIMEOUT_FACTOR = 3.0


def supervise(server: TritonServer, a: argparse.Namespace, stop: Stop, metrics=None) -> threading.Thread:
    """metrics: a launcher.metrics.ReplicaMetrics that records the probes and events."""
    from .control import ModelControl
    from .supervisor import BackgroundProbe, GiveUp, Supervisor

    observe = metrics.probe if metrics is not None else None
    probe = BackgroundProbe(http_probe(server, observe=observe), interval_s=2.0).start()
    # Unload and the repository index answer in milliseconds; a server that does not has
    # wedged (seen: tritonserver aborting in its Python backend after a stub was killed
    # while holding a shared-memory lock) and is restarted. Only loading may take long.
    # Loading one model again takes less than the start that loaded them all: a reload
    # past RELOAD_TIMEOUT_FACTOR x that (at least RELOAD_TIMEOUT_MIN_S) has met a server
    # wedged the same way, and is a restart instead of minutes of waiting.
    reload_timeout_s = max(RELOAD_TIMEOUT_MIN_S, RELOAD_TIMEOUT_FACTOR * (server.startup_s or RELOAD_TIMEOUT_MIN_S))

    # A call waiting for its answer is given up as soon as the server stops listening (an
    # abort closes the endpoints at once; the process may linger): a restart follows.
    def serving() -> bool:
        return server.running() and server.listening()

    control = ModelControl(server.http_url, 5.0, serving=serving)
    loader = ModelControl(server.http_url, reload_timeout_s, serving=serving)
    sup = Supervisor(
        server,
        probe,
        control,
        loader=loader,
        hang_timeout_s=a.hang_timeout,
        max_restarts=a.max_restarts,
        headers=control_headers(a),
    )
    if metrics is not None:
        sup.on_event = metrics.event

    def loop():
        try:
            sup.run(stopping=stop.is_set)
        except GiveUp as e:
            print(f"error: supervisor gave up on {server.grpc_url}: {e}", file=sys.stderr, flush=True)
            stop.give_up()
        finally:
            probe.stop()

    thread = threading.Thread(target=loop, name=f"supervisor-{server.grpc_url}", daemon=True)
    thread.start()
    return thread


# Once a drain has finished every accepted request, tritonserver's own shutdown only
# unloads models, in seconds; but an instance whose stub the supervisor replaced within
# the Python backend's stub timeout is still unloading (it waits out that timeout for a
# dead stub), and Triton would wait for it until its exit timeout. Nothing is in flight
# then, so it is stopped after this.
UNLOAD_GRACE_S = 10.0


def drain_all(servers: list[TritonServer], a: argparse.Namespace) -> set[TritonServer]:
    """Model control is explicit under supervision: drain by unloading the ensemble first
    (launcher.supervisor.drain), then tritonserver stops with nothing in flight. Returns
    the servers whose accepted requests all finished."""
    import tritonclient.http as httpclient

    from captioner.serving import ENSEMBLE

    from .supervisor import drain

    drained = set()
    for server in servers:
        if not server.running():
            continue
        control = httpclient.InferenceServerClient(server.http_url, network_timeout=a.drain_timeout + 5.0)
        try:
            done = drain(control, ENSEMBLE, a.drain_timeout, control_headers(a))
            print(
                f"{server.grpc_url}: "
                + ("every accepted request finished" if done else f"requests still in flight after {a.drain_timeout} s"),
                flush=True,
            )
            if done:
                drained.add(server)
        except Exception as e:  # noqa: BLE001 - tritonserver's own drain still follows
            print(f"{server.grpc_url}: drain by unloading failed ({type(e).__name__}: {e})", file=sys.stderr)
        finally:
            control.close()
    return drained


def stop_all(servers: list[TritonServer], drained: set[TritonServer]) -> None:
    for server in servers:
        if server in drained:
            if not server.close(wait_s=UNLOAD_GRACE_S):
                print(
                    f"{server.grpc_url}: tritonserver still unloading models {UNLOAD_GRACE_S:g} s after the "
                    "drain (an instance replaced by the supervisor waits out the stub timeout); nothing was "
                    "in flight: stopped it",
                    flush=True,
                )
        else:
            server.close()


def supervisor_metrics(servers: list[TritonServer], a: argparse.Namespace) -> list:
    """The supervisor's metrics (launcher.metrics) served on --supervisor-metrics-port, one
    recorder per replica; Nones when the port is 0."""
    if not a.supervisor_metrics_port:
        return [None] * len(servers)
    from .metrics import LauncherMetrics
    from .supervisor import stubs_of

    metrics = LauncherMetrics()
    recorders = []
    for k, server in enumerate(servers):
        assert server.process is not None, "servers start before their supervisors"
        models = sorted({s.model for s in stubs_of(server.process.pid)})
        recorders.append(metrics.replica(k, models, server.is_ready, a.repo))
    metrics.serve(a.supervisor_metrics_port, a.host)
    print(f"Supervisor metrics: http://{a.host}:{a.supervisor_metrics_port}/metrics", flush=True)
    return recorders


def resolve_checkpoint(model: str) -> Path:
    """The checkpoint behind MODEL, with the build's names (seed-inception is made on first use)."""
    from builder.build_engines import BuildFailed, resolve_model

    try:
        return resolve_model(model)[0]
    except BuildFailed as e:
        raise FileNotFoundError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    repo = Path(args.repo)
    if not args.no_build:
        try:
            checkpoint_path = resolve_checkpoint(args.model)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        reason = "--rebuild given" if args.rebuild else stale_reason(repo, checkpoint_path, args.target)
        if reason:
            print(f"Building the model repository: {reason}.", flush=True)
            build(args)

    from .shm import shortfall

    short = shortfall(repo, servers=args.replicas)
    if short:
        print(f"WARNING: {short}", file=sys.stderr, flush=True)
    extra = server_args(args) + METRICS_CONFIG
    if args.supervise:
        # The hang check reads execution counts from the metrics: refresh them often.
        extra += ("--metrics-interval-ms=500",)
    servers = [
        TritonServer(
            repo,
            host=args.host,
            http_port=args.http_port + REPLICA_PORT_STEP * k,
            grpc_port=args.grpc_port + REPLICA_PORT_STEP * k,
            metrics_port=args.metrics_port + REPLICA_PORT_STEP * k,
            log_file=replica_log(args.log_file, k),
            exit_timeout_s=args.drain_timeout,
            extra_args=extra
            + tracing.server_args(args.trace_rate, replica_log(args.trace_file, k), args.trace_otlp, args.trace_log_frequency),
            control_mode="explicit" if args.supervise else "none",
        )
        for k in range(args.replicas)
    ]
    stop = Stop().install()
    supervisors: list[threading.Thread] = []
    try:
        for server in servers:
            print(f"Starting {server.binary.path} on {repo} (log: {server.log_file or 'standard output'}) ...", flush=True)
            server.start(timeout_s=args.startup_timeout)
            print(f"Ready. gRPC {server.grpc_url}   HTTP {server.http_url}   metrics {server.metrics_url}", flush=True)
            if stop.is_set():
                return 0
        if len(servers) > 1:
            print("CAPTIONER_URL=" + ",".join(s.grpc_url for s in servers), flush=True)
        if args.samples:
            caption_samples(servers[0], args.samples, tls=bool(args.grpc_ssl_cert))
        if args.supervise:
            recorders = supervisor_metrics(servers, args)
            supervisors += [supervise(server, args, stop, rec) for server, rec in zip(servers, recorders)]
            print("Serving; supervised; Ctrl-C or SIGTERM drains and stops.", flush=True)
            while not stop.wait(0.5):
                pass
            return 1 if stop.gave_up else 0
        print("Serving; Ctrl-C or SIGTERM drains and stops.", flush=True)
        while not stop.wait(0.5):
            dead = next((s for s in servers if not s.running()), None)
            if dead is not None:
                code = dead.process.returncode if dead.process is not None else None
                print(f"tritonserver exited with code {code}; log tail:\n{dead.log_tail()}", file=sys.stderr)
                return code or 1
        return 0
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if stop.is_set():
            print(f"\n{stop.reason}: draining (up to {args.drain_timeout} s) and stopping tritonserver ...", flush=True)
        stop.event.set()  # supervisors stop before the servers do: a drain is not a crash
        for thread in supervisors:
            thread.join(timeout=60)
        stop_all(servers, drain_all(servers, args) if args.supervise else set())
        print("Stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
