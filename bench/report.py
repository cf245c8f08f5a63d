"""Tables, ratios and target checks of a bench run, as Markdown (reports/bench.md and the
console). Input is the results dict bench.run builds (also saved as reports/bench.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SEED_MODEL = "seed-inception"


def inprocess_bound(results: dict, model: str, variant: str) -> tuple[float, int] | None:
    """Best in-process captions/s over the measured batch sizes, and that batch size."""
    rows = [r for r in results.get("inprocess", []) if r["model"] == model and r["variant"] == variant]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["captions_per_s"])
    return best["captions_per_s"], best["batch_size"]


def _level(results: dict, model: str, stack: str, concurrency: int, variant: str | None = None) -> dict | None:
    for lv in results.get("levels", []):
        if lv["model"] == model and lv["stack"] == stack and lv["concurrency"] == concurrency:
            if variant is None or lv["variant"] == variant:
                return lv
    return None


def ratio_rows(results: dict) -> list[dict]:
    """One row per Triton level: its throughput over the in-process bound of the same
    artifacts and over the naive server at the same concurrency (same model)."""
    rows = []
    for lv in results.get("levels", []):
        if lv["stack"] != "triton":
            continue
        bound = inprocess_bound(results, lv["model"], lv["variant"])
        naive = _level(results, lv["model"], "naive", lv["concurrency"])
        rows.append(
            dict(
                model=lv["model"],
                variant=lv["variant"],
                concurrency=lv["concurrency"],
                triton=lv["throughput"],
                inprocess=bound[0] if bound else None,
                naive=naive["throughput"] if naive else None,
                vs_inprocess=lv["throughput"] / bound[0] if bound and bound[0] else None,
                vs_naive=lv["throughput"] / naive["throughput"] if naive and naive["throughput"] else None,
            )
        )
    rows.sort(key=lambda r: (r["model"], r["variant"], r["concurrency"]))
    return rows


@dataclass
class Target:
    name: str
    value: float | None
    goal: float
    unit: str

    @property
    def met(self) -> bool | None:
        return None if self.value is None or math.isnan(self.value) else self.value >= self.goal

    def line(self) -> str:
        status = {True: "MET", False: "MISSED", None: "not measured"}[self.met]
        v = "n/a" if self.value is None else f"{self.value:.2f}{self.unit}"
        return f"- {self.name}: {v} (goal >= {self.goal:g}{self.unit}) -> **{status}**"


REFERENCE = "onnxruntime fp32"  # R1's denominator: the in-process bound before OpenVINO and int8


def targets(results: dict, default_model: str) -> list:
    """The targets, from one run (each has .name, .met and .line()):
    R1 seed-inception best Triton variant >= 3.0x the in-process onnxruntime fp32 bound
    (issue 11); T1 and T2 against the peers, Ray Serve, LitServe and MLServer on the same
    graphs (issue 21, bench/peers/targets.py). They replace issue 11's R2 (Triton >= 0.9x
    its bound) and R3 (>= 10x the naive server), which could not be met by construction
    on these machines and compared with nothing a team would choose instead."""
    from .peers import targets as peer_targets

    out: list = []
    levels = results.get("levels", [])
    seed = [lv for lv in levels if lv["model"] == SEED_MODEL and lv["stack"] == "triton"]
    ref_name = REFERENCE if inprocess_bound(results, SEED_MODEL, REFERENCE) else "fp32"
    ref = inprocess_bound(results, SEED_MODEL, ref_name)
    if seed or ref:
        best = max(seed, key=lambda lv: lv["throughput"], default=None)
        where = (
            f" ({best['variant']}, {best['concurrency']} clients: {best['throughput']:.1f}/s vs {ref[0]:.1f}/s)"
            if best and ref
            else ""
        )
        out.append(
            Target(
                f"R1 {SEED_MODEL} best Triton variant / in-process {ref_name} bound{where}",
                best["throughput"] / ref[0] if best and ref else None,
                3.0,
                "x",
            )
        )

    def bound(model: str, variant: str) -> float | None:
        b = inprocess_bound(results, model, variant)
        return b[0] if b else None

    return out + peer_targets.t1(results, bound) + peer_targets.t2(results)


def _f(x, fmt="{:.1f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _pct(x) -> str:
    return _f(None if x is None else 100 * x, "{:.0f}%")


def inprocess_table(results: dict) -> str:
    lines = [
        "| model | variant | batch | captions/s | tokens/caption | CPU | others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results.get("inprocess", []):
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch_size']} | {_f(r['captions_per_s'])} | {_f(r['mean_tokens'])} | "
            f"{_pct(r.get('cpu'))} | {_pct(r.get('other_cpu'))} |"
        )
    return "\n".join(lines)


def cpu_ms_per_caption(level: dict, cores: int) -> float | None:
    """Client + server CPU time per caption: robust to other work on the machine, and
    cores / this is the throughput the stack could reach on idle cores."""
    if level.get("server_cpu") is None or not level["throughput"]:
        return None
    return (level["client_cpu"] + level["server_cpu"]) * cores / level["throughput"] * 1e3


def levels_table(results: dict) -> str:
    cores = results.get("cores", 1)
    lines = [
        "| model | stack | variant | clients | captions/s | p50 ms | p95 ms | p99 ms | errors "
        "| client CPU | server CPU | others' CPU | CPU ms/caption |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in results.get("levels", []):
        lines.append(
            f"| {lv['model']} | {lv['stack']} | {lv['variant']} | {lv['concurrency']} | {_f(lv['throughput'])} | "
            f"{_f(lv['p50_ms'])} | {_f(lv['p95_ms'])} | {_f(lv['p99_ms'])} | {lv['errors']} | "
            f"{_pct(lv['client_cpu'])} | {_pct(lv['server_cpu'])} | {_pct(lv.get('other_cpu'))} | "
            f"{_f(cpu_ms_per_caption(lv, cores))} |"
        )
    return "\n".join(lines)


def ratio_table(results: dict) -> str:
    lines = [
        "| model | variant | clients | Triton/s | in-process bound/s | naive/s | Triton / in-process | Triton / naive |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ratio_rows(results):
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['concurrency']} | {_f(r['triton'])} | {_f(r['inprocess'])} | "
            f"{_f(r['naive'])} | {_f(r['vs_inprocess'], '{:.2f}x')} | {_f(r['vs_naive'], '{:.2f}x')} |"
        )
    return "\n".join(lines)


def breakdown_table(results: dict) -> str:
    """Per Triton level and model: mean batch, queue ms per request, compute ms per execution."""
    rows = [
        lv for lv in results.get("levels", []) if lv.get("models") and lv["stack"] == "triton"
    ]  # peers: bench/peers/report.py
    if not rows:
        return "(no Triton levels)"
    names = [
        n
        for n in ("preprocess", "encoder", "caption_generator", "decoder_step", "captioner")
        if any(n in lv["models"] for lv in rows)
    ]
    lines = ["| model | variant | clients | " + " | ".join(names) + " |", "|---|---|---:|" + "---|" * len(names)]
    for lv in rows:
        cells = []
        for n in names:
            m = lv["models"].get(n)
            cells.append("-" if m is None else f"b {m['batch']:.1f}, q {m['queue_ms']:.1f}, c {m['compute_ms']:.1f}")
        lines.append(f"| {lv['model']} | {lv['variant']} | {lv['concurrency']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_lines(results: dict) -> str:
    def walk(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict):
                out += walk(v, f"{prefix}{k}.")
            else:
                out.append(f"- {prefix}{k}: {v}")
        return out

    return "\n".join(walk(results.get("config", {})))


def _peers_section(results: dict) -> list[str]:
    """Side by side with the peers (bench/peers), when any ran."""
    from .peers import report as peers_report

    table = peers_report.side_by_side(results)
    if table.count("\n") < 2:
        return []
    return [
        "## Side by side: Triton stack vs Ray Serve, LitServe, MLServer",
        "Every peer serves the same built graphs through the same runtime and precision, the same preprocessing "
        "and the same batched decode loop (bench/peers/pipeline.py), with its own framework's dynamic batching; "
        "the same load driver calls each over its own protocol. Server CPU ms/caption: the server's whole process "
        "tree (client excluded); in-process: the bench process. Mean batch: the peer's batcher, Triton's front model. "
        "Peak RSS sums the tree (shared pages counted per process), PSS divides shared pages among them.",
        "",
        peers_report.config_lines(results),
        "",
        table,
        "",
        peers_report.setup_lines(results),
        "",
    ]


def markdown(results: dict, default_model: str) -> str:
    parts = [
        "# Benchmark: in-process bound vs Triton vs naive server",
        "",
        f"Run {results.get('started', '?')}, {results.get('machine', '?')}. "
        "Client, server and in-process runs share the same cores, one at a time.",
        "",
        "## Configuration",
        config_lines(results),
        "",
        "## Ratios",
        "In-process bound = the best of its batch sizes for the same model and artifacts; "
        "naive = the FastAPI + eager torch server at the same number of clients.",
        "",
        ratio_table(results),
        "",
        "## Targets",
        "\n".join(t.line() for t in targets(results, default_model)),
        "",
        *_peers_section(results),
        "## In-process bound",
        inprocess_table(results),
        "",
        "## Load levels",
        "CPU columns: share of the whole machine (all cores) used by the load generator, by the server processes, "
        "and by everything else running at the time (anything above a few % means the level was measured on a busy machine). "
        "CPU ms/caption: client + server CPU time per caption; cores / that is what the stack could reach on idle cores.",
        "",
        levels_table(results),
        "",
        "## Inside Triton",
        "Per model and level, from Triton's statistics: b = mean requests per execution (dynamic batching), "
        "q = mean ms a request waited in the model's queue, c = mean ms per execution (input, execute, output). "
        "`captioner` is the ensemble as a whole.",
        "",
        breakdown_table(results),
        "",
    ]
    if results.get("plots"):
        parts += ["## Plots", *[f"![{p}]({p})" for p in results["plots"]], ""]
    parts += ['Why the defaults are what they are: docs/bench.md, "What the defaults are, and why".', ""]
    if results.get("notes"):
        parts += ["## Notes", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(parts)
