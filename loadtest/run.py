"""`make loadtest`: Locust, headless, against the captioner server; CSV + HTML reports, a
latency/throughput plot, and a verdict.

Uses the server at --url when it answers; when nothing answers there it starts one with
launcher.tritonserver for the length of the run. Unknown flags go to Locust and the locustfile
(e.g. --beam-size 3, --pool-size 96, --think-time 0.1). Exit status 1 when the failure ratio
is above --max-failure-ratio (default 0), p95 is above --p95-ms, fewer than --min-requests
calls were made, or a user raised an exception; 2 when no server could be had.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.cli import env as _env

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__.split("\n")[0],
        epilog="Other flags are passed to locust and the locustfile.",
    )
    p.add_argument(
        "--url",
        default=_env("CAPTIONER_URL", "localhost:8001"),
        help="Triton gRPC address, or several comma separated: users spread over them and fail over [$CAPTIONER_URL]",
    )
    p.add_argument("--model-name", default=_env("CAPTIONER_MODEL_NAME", "captioner"), help="[$CAPTIONER_MODEL_NAME]")
    p.add_argument("-u", "--users", type=int, default=_env("LOADTEST_USERS", 8, int), help="[$LOADTEST_USERS]")
    p.add_argument(
        "-r",
        "--spawn-rate",
        type=float,
        default=_env("LOADTEST_SPAWN_RATE", 4.0, float),
        help="users started per second [$LOADTEST_SPAWN_RATE]",
    )
    p.add_argument("-t", "--run-time", default=_env("LOADTEST_RUN_TIME", "60s"), help="e.g. 30s, 5m, 1h30m [$LOADTEST_RUN_TIME]")
    p.add_argument(
        "--p95-ms",
        type=float,
        default=_env("LOADTEST_P95_MS", 2000.0, float),
        help="fail when the overall p95 response time is above this [$LOADTEST_P95_MS]",
    )
    p.add_argument(
        "--max-failure-ratio",
        type=float,
        default=_env("LOADTEST_MAX_FAILURE_RATIO", 0.0, float),
        help="fail when failures/requests is above this [$LOADTEST_MAX_FAILURE_RATIO]",
    )
    p.add_argument(
        "--min-requests",
        type=int,
        default=_env("LOADTEST_MIN_REQUESTS", 1, int),
        help="fail when fewer calls were made [$LOADTEST_MIN_REQUESTS]",
    )
    p.add_argument(
        "--reports", type=Path, default=Path(_env("LOADTEST_REPORTS", "reports")), help="output folder [$LOADTEST_REPORTS]"
    )
    p.add_argument("--prefix", default=_env("LOADTEST_PREFIX", "loadtest"), help="report file prefix [$LOADTEST_PREFIX]")
    p.add_argument(
        "--start-server",
        choices=["auto", "never"],
        default=_env("LOADTEST_START_SERVER", "auto"),
        help="auto: start one when nothing answers at --url [$LOADTEST_START_SERVER]",
    )
    p.add_argument(
        "--repo",
        default=_env("CAPTIONER_REPO", "model_repository"),
        help="model repository for a server started here (make build-engines) [$CAPTIONER_REPO]",
    )
    return p


def parse_duration(text: str) -> float:
    """Locust's run-time syntax: 90, 90s, 5m, 1h30m."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"cannot read run time {text!r} (use e.g. 30s, 5m, 1h30m)")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


# --- server ------------------------------------------------------------------------


def server_state(url: str, model: str, timeout: float = 3.0) -> str:
    """'ready', 'not_ready' (a server answers, the model is not loaded) or 'down'. With several
    endpoints: the best of them (the users fail over from the others), and the others are named."""
    from client.endpoints import parse_endpoints

    urls = parse_endpoints(url)
    states = {u: _one_server_state(u, model, timeout) for u in urls}
    for want in ("ready", "not_ready", "down"):
        if want in states.values():
            best = want
            break
    if best == "ready" and len(urls) > 1:
        for u, state in states.items():
            if state != "ready":
                print(f"warning: endpoint {u} is {state.replace('_', ' ')}; the users fail over from it", file=sys.stderr)
    return best


def _one_server_state(url: str, model: str, timeout: float) -> str:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url) as c:
            if not c.is_server_live(client_timeout=timeout):
                return "not_ready"
            return "ready" if c.is_model_ready(model, client_timeout=timeout) else "not_ready"
    except InferenceServerException:
        return "down"


def start_server(args):
    """A TritonServer for the repository on free ports (not started yet)."""
    from launcher.tritonserver import TritonServer

    return TritonServer(args.repo, log_file=args.reports / f"{args.prefix}_tritonserver.log")


# --- locust ------------------------------------------------------------------------


def locust_command(args, url: str, extra: list[str]) -> list[str]:
    prefix = args.reports / args.prefix
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        args.run_time,
        "--stop-timeout",
        "30",
        "--host",
        url,
        "--model-name",
        args.model_name,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--logfile",
        f"{prefix}.log",
        "--quality-out",
        f"{prefix}_quality.json",
        "--endpoints-out",
        f"{prefix}_endpoints.json",
        *extra,
    ]


# Pool building before the run and Locust's stop timeout after it, with room to spare.
OVERRUN_S = 120


def run_locust(cmd: list[str], seconds: float, log_path: Path) -> int:
    """Run Locust with a tqdm bar over its run time; its console output goes to a file.
    A Locust that outlives its run time by OVERRUN_S is killed (status -9)."""
    from tqdm import tqdm

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        start = time.monotonic()
        with tqdm(
            total=round(seconds), unit="s", desc="locust", disable=None, bar_format="{l_bar}{bar}| {n:.0f}/{total}s"
        ) as bar:
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if elapsed > seconds + OVERRUN_S:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.5)
                bar.n = min(bar.total, round(elapsed))
                bar.refresh()
        return proc.returncode


# --- results -----------------------------------------------------------------------


@dataclass
class Summary:
    requests: int
    failures: int
    failure_ratio: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    user_exceptions: int


def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_summary(prefix: Path) -> Summary:
    """The Aggregated row of Locust's stats CSV, plus the count of user exceptions."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    agg = rows.get("Aggregated")
    if agg is None:
        raise ValueError(f"{prefix}_stats.csv has no Aggregated row")
    requests, failures = int(agg["Request Count"]), int(agg["Failure Count"])
    exceptions = 0
    exc_path = Path(f"{prefix}_exceptions.csv")
    if exc_path.exists():
        with open(exc_path, newline="") as f:
            exceptions = sum(int(r.get("Count") or 0) for r in csv.DictReader(f))
    return Summary(
        requests=requests,
        failures=failures,
        failure_ratio=failures / requests if requests else 0.0,
        rps=_num(agg["Requests/s"]),
        p50_ms=_num(agg["50%"]),
        p95_ms=_num(agg["95%"]),
        p99_ms=_num(agg["99%"]),
        max_ms=_num(agg["Max Response Time"]),
        user_exceptions=exceptions,
    )


def verdict(s: Summary, args) -> list[str]:
    """Reasons the run failed; empty when it passed."""
    problems = []
    if s.requests < args.min_requests:
        problems.append(f"{s.requests} requests, fewer than the {args.min_requests} required")
    if s.failure_ratio > args.max_failure_ratio:
        problems.append(f"failure ratio {s.failure_ratio:.4f} ({s.failures}/{s.requests}) above {args.max_failure_ratio}")
    if s.requests and not s.p95_ms <= args.p95_ms:
        problems.append(f"p95 {s.p95_ms:.0f} ms above the bound of {args.p95_ms:.0f} ms")
    if s.user_exceptions:
        problems.append(f"{s.user_exceptions} exceptions raised in users (see the _exceptions.csv report)")
    return problems


def plot_history(history_csv: Path, out_png: Path, title: str) -> None:
    """Latency percentiles and throughput over the run, from Locust's stats history CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not rows:
        raise ValueError(f"{history_csv} holds no Aggregated rows")
    t0 = float(rows[0]["Timestamp"])
    t = [float(r["Timestamp"]) - t0 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for col, style in (("50%", "-"), ("95%", "--"), ("99%", ":")):
        ax1.plot(t, [_num(r[col]) for r in rows], style, label=f"p{col.rstrip('%')}")
    ax1.set_ylabel("response time (ms)")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left")
    ax1.grid(alpha=0.3)
    ax1.set_title(title)
    ax2.plot(t, [_num(r["Requests/s"]) for r in rows], label="requests/s")
    ax2.plot(t, [_num(r["Failures/s"]) for r in rows], color="tab:red", label="failures/s")
    ax2.set_ylabel("per second")
    ax2.set_xlabel("time since start (s)")
    ax2.grid(alpha=0.3)
    users = ax2.twinx()
    users.plot(t, [_num(r["User Count"]) for r in rows], color="tab:gray", alpha=0.6, label="users")
    users.set_ylabel("users")
    lines = ax2.get_legend_handles_labels()[0] + users.get_legend_handles_labels()[0]
    ax2.legend(lines, [ln.get_label() for ln in lines], loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def load_test(args, url: str, extra: list[str]) -> int:
    args.reports.mkdir(parents=True, exist_ok=True)
    prefix = args.reports / args.prefix
    for stale in args.reports.glob(f"{args.prefix}_*.csv"):
        stale.unlink()
    cmd = locust_command(args, url, extra)
    console = Path(f"{prefix}_console.txt")
    print(f"locust: {args.users} users (+{args.spawn_rate:g}/s) for {args.run_time} against {url}")
    code = run_locust(cmd, parse_duration(args.run_time), console)
    try:
        summary = read_summary(prefix)
    except (OSError, ValueError) as e:
        print(f"locust exited with status {code} and left no usable statistics ({e}); last output:", file=sys.stderr)
        print("".join(console.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
        return 1
    plot_history(
        Path(f"{prefix}_stats_history.csv"), Path(f"{prefix}.png"), f"captioner over gRPC: {args.users} users, {args.run_time}"
    )
    quality_path = Path(f"{prefix}_quality.json")
    quality = json.loads(quality_path.read_text()) if quality_path.exists() else None
    endpoints_path = Path(f"{prefix}_endpoints.json")
    endpoints = json.loads(endpoints_path.read_text()) if endpoints_path.exists() else None
    problems = verdict(summary, args)
    Path(f"{prefix}_summary.json").write_text(
        json.dumps(
            {
                "url": url,
                "users": args.users,
                "spawn_rate": args.spawn_rate,
                "run_time": args.run_time,
                **asdict(summary),
                "quality": quality,
                "failover": endpoints,
                "p95_bound_ms": args.p95_ms,
                "max_failure_ratio": args.max_failure_ratio,
                "passed": not problems,
                "problems": problems,
            },
            indent=2,
        )
        + "\n"
    )
    print(
        f"requests {summary.requests}, failures {summary.failures} ({summary.failure_ratio:.2%}), "
        f"{summary.rps:.1f} req/s, p50 {summary.p50_ms:.0f} ms, p95 {summary.p95_ms:.0f} ms, "
        f"p99 {summary.p99_ms:.0f} ms, max {summary.max_ms:.0f} ms"
    )
    if quality:
        print(f"captions correct: {quality['correct']}/{quality['checked']} ({quality['share_correct']:.1%})")
        if quality.get("model_versions"):
            print("captions by model version: " + ", ".join(f"{k}: {v}" for k, v in quality["model_versions"].items()))
    if endpoints and (endpoints["retried"] or len(endpoints["endpoints"]) > 1):
        print(
            f"failover: {endpoints['retried']} requests retried; "
            + "; ".join(f"{e['url']}: {e['ok']} ok, {e['failed']} failed" for e in endpoints["endpoints"])
        )
    print(f"reports: {prefix}.html, {prefix}_stats.csv, {prefix}_stats_history.csv, {prefix}.png")
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        parse_duration(args.run_time)
    except ValueError as e:
        parser.error(str(e))
    if args.users < 1 or args.spawn_rate <= 0:
        parser.error("--users must be >= 1 and --spawn-rate > 0")
    try:
        state = server_state(args.url, args.model_name)
    except ValueError as e:
        parser.error(str(e))
    if state == "ready":
        return load_test(args, args.url, extra)
    if state == "not_ready":
        print(f"a server answers at {args.url} but model {args.model_name!r} is not ready", file=sys.stderr)
        return 2
    if args.start_server == "never":
        print(f"no server answers at {args.url} (and --start-server never)", file=sys.stderr)
        return 2
    from launcher.tritonserver import ServerError

    print(f"no server answers at {args.url}: starting one on {args.repo}")
    args.reports.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        server = start_server(args)
        server.start()
    except ServerError as e:
        if server is not None:
            server.close()
        print(f"could not start a server: {e}", file=sys.stderr)
        return 2
    try:
        return load_test(args, server.grpc_url, extra)
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
