"""Request tracing (`python -m launcher --trace-rate N`): tritonserver's own tracing of one
request in N, with timestamps for the ensemble and for each of its steps (queue start,
compute start, input end, output start, compute end).

- Triton mode (default): JSON written to `--trace-file` (replica k: name-k.json), a new
  numbered file (`FILE.0`, `FILE.1`, ...) every `--trace-log-frequency` traces;
  `python -m bench.trace_summary FILE` says where one request's time went.
- OpenTelemetry mode (`--trace-otlp URL`): spans exported over OTLP/HTTP to URL (e.g. an
  OpenTelemetry Collector's http://host:4318/v1/traces), one span per model request and
  one per compute, parented as the ensemble runs them.
"""

from __future__ import annotations

from pathlib import Path


def server_args(
    rate: int, file: str | Path | None = None, otlp_url: str | None = None, log_frequency: int = 10
) -> tuple[str, ...]:
    """tritonserver flags for tracing one request in `rate` (0: none)."""
    if rate < 0 or log_frequency < 0:
        raise ValueError("the trace rate and log frequency must be >= 0")
    if rate == 0:
        return ()
    out = ["--trace-config=level=TIMESTAMPS", f"--trace-config=rate={rate}", "--trace-config=count=-1"]
    if otlp_url:
        out += [
            "--trace-config=mode=opentelemetry",
            f"--trace-config=opentelemetry,url={otlp_url}",
            "--trace-config=opentelemetry,resource=service.name=captioner",
        ]
    else:
        if file is None:
            raise ValueError("triton-mode tracing needs a trace file")
        path = Path(file).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        out += [
            "--trace-config=mode=triton",
            f"--trace-config=triton,file={path}",
            f"--trace-config=triton,log-frequency={log_frequency}",
        ]
    return tuple(out)
