"""python -m bench.trace_summary FILE: where traced requests' time went, per ensemble step.

Reads what tritonserver's Triton-mode tracing wrote (`python -m launcher --trace-rate N`
writes FILE.0, FILE.1, ...; FILE itself at shutdown): per request of the ensemble, each
step's (composing model's) time in its queue, in compute (input, infer, output), and what
is left between the steps. Prints the slowest request(s) and the medians over all.

    python -m bench.trace_summary logs/triton-trace.json             # slowest request
    python -m bench.trace_summary logs/triton-trace.json --slowest 3
    python -m bench.trace_summary logs/triton-trace.json --request 41
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from captioner.serving import ENSEMBLE

PHASES = ("queue", "input", "infer", "output")


class TraceError(ValueError):
    """A file that is not Triton trace output."""


@dataclass
class Trace:
    id: int
    model: str = ""
    parent: int | None = None
    ns: dict[str, int] = field(default_factory=dict)
    children: list[Trace] = field(default_factory=list)

    def span_ms(self, start: str, end: str) -> float | None:
        if start in self.ns and end in self.ns:
            return (self.ns[end] - self.ns[start]) / 1e6
        return None

    @property
    def total_ms(self) -> float | None:
        return self.span_ms("REQUEST_START", "REQUEST_END")

    def phases_ms(self) -> dict[str, float | None]:
        return {
            "queue": self.span_ms("QUEUE_START", "COMPUTE_START"),
            "input": self.span_ms("COMPUTE_START", "COMPUTE_INPUT_END"),
            "infer": self.span_ms("COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
            "output": self.span_ms("COMPUTE_OUTPUT_START", "COMPUTE_END"),
        }


def trace_files(path: str | Path) -> list[Path]:
    """FILE and its numbered parts FILE.0, FILE.1, ... that exist."""
    p = Path(path)
    files = ([p] if p.is_file() else []) + sorted(
        (Path(f) for f in glob.glob(glob.escape(str(p)) + ".*") if f.rsplit(".", 1)[-1].isdigit()),
        key=lambda f: int(f.name.rsplit(".", 1)[-1]),
    )
    if not files:
        raise FileNotFoundError(f"no trace file {p} (nor {p}.0, {p}.1, ...): was the server started with --trace-rate?")
    return files


def load(files: list[Path]) -> dict[int, Trace]:
    traces: dict[int, Trace] = {}
    for f in files:
        try:
            entries = json.loads(f.read_text())
        except ValueError as e:
            raise TraceError(f"{f}: not JSON ({e})") from None
        if not isinstance(entries, list):
            raise TraceError(f"{f}: not a Triton trace file (a JSON list of trace entries)")
        for entry in entries:
            if not isinstance(entry, dict) or "id" not in entry:
                raise TraceError(f"{f}: not a Triton trace entry: {str(entry)[:80]}")
            t = traces.setdefault(entry["id"], Trace(entry["id"]))
            if "model_name" in entry:
                t.model, t.parent = entry["model_name"], entry.get("parent_id")
            for ts in entry.get("timestamps", []):
                t.ns[ts["name"]] = int(ts["ns"])
    for t in traces.values():
        if t.parent is not None and t.parent in traces:
            traces[t.parent].children.append(t)
    for t in traces.values():
        t.children.sort(key=lambda c: c.ns.get("REQUEST_START", 0))
    return traces


def requests(traces: dict[int, Trace], model: str = ENSEMBLE) -> list[Trace]:
    """The complete traced requests of `model` (an ensemble request with its steps)."""
    return [t for t in traces.values() if t.parent is None and t.model == model and t.total_ms is not None]


def _ms(v: float | None) -> str:
    return f"{v:8.1f}" if v is not None else f"{'-':>8}"


def describe(req: Trace) -> str:
    total = req.total_ms or 0.0
    start = req.ns["REQUEST_START"]
    lines = [f"request {req.id} ({req.model}): {total:.1f} ms from arrival to response", ""]
    lines.append(f"  {'step':<20}{'starts at':>10}" + "".join(f"{p:>8}" for p in PHASES) + f"{'total':>8}   (ms)")
    for step in req.children:
        offset = (step.ns.get("REQUEST_START", start) - start) / 1e6
        phases = step.phases_ms()
        lines.append(f"  {step.model:<20}{offset:10.1f}" + "".join(_ms(phases[p]) for p in PHASES) + _ms(step.total_ms))
        for call in step.children:  # BLS calls a step makes (decoder_step)
            cp = call.phases_ms()
            lines.append(f"    {'+ ' + call.model:<18}{'':>10}" + "".join(_ms(cp[p]) for p in PHASES) + _ms(call.total_ms))
    lines.append(f"  {'in no step (the ensemble)':<30}{'':>32}{_ms(total - covered_ms(req))}")
    return "\n".join(lines)


def covered_ms(req: Trace) -> float:
    """Time of the request inside at least one step (steps overlap a little: a step's
    response is released after the next step has begun)."""
    spans = sorted((s.ns["REQUEST_START"], s.ns["REQUEST_END"]) for s in req.children if s.total_ms is not None)
    covered, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            covered += b - a
            end = b
        elif b > end:
            covered += b - end
            end = b
    return covered / 1e6


def medians(reqs: list[Trace]) -> str:
    by_step: dict[str, dict[str, list[float]]] = {}
    for r in reqs:
        for s in r.children:
            d = by_step.setdefault(s.model, {p: [] for p in (*PHASES, "total")})
            for p, v in {**s.phases_ms(), "total": s.total_ms}.items():
                if v is not None:
                    d[p].append(v)
    totals = sorted(r.total_ms or 0.0 for r in reqs)
    lines = [
        f"{len(reqs)} traced requests: median {statistics.median(totals):.1f} ms, slowest {totals[-1]:.1f} ms end to end",
        "",
        f"  {'median per step':<30}" + "".join(f"{p:>8}" for p in (*PHASES, "total")) + "   (ms)",
    ]
    for model, d in by_step.items():
        lines.append(f"  {model:<30}" + "".join(_ms(statistics.median(d[p]) if d[p] else None) for p in (*PHASES, "total")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace_summary", description=__doc__.splitlines()[0])
    p.add_argument("file", help="the --trace-file tritonserver wrote (its numbered parts are read too)")
    p.add_argument("--slowest", type=int, default=1, help="describe the N slowest requests")
    p.add_argument("--request", type=int, help="describe this trace id instead")
    p.add_argument("--model", default=ENSEMBLE, help="the model whose requests are summarised")
    a = p.parse_args(argv)
    try:
        traces = load(trace_files(a.file))
    except (FileNotFoundError, TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reqs = requests(traces, a.model)
    if not reqs:
        print(f"error: no complete {a.model} request in {a.file} ({len(traces)} trace entries)", file=sys.stderr)
        return 1
    if a.request is not None:
        chosen = [r for r in reqs if r.id == a.request]
        if not chosen:
            print(f"error: no {a.model} request with trace id {a.request}", file=sys.stderr)
            return 1
    else:
        chosen = sorted(reqs, key=lambda r: r.total_ms or 0.0, reverse=True)[: max(1, a.slowest)]
    print(medians(reqs))
    for r in chosen:
        print()
        print(describe(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
