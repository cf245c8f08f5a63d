"""The side-by-side table and plots of the Triton stack, the peers, the naive server and
the in-process bound, per model and variant the peers served (reports/bench.md and
bench_peers_<model>.png)."""

from __future__ import annotations

import math
from pathlib import Path

from .run import NAMES
from .targets import PEER_STACKS, level, peer_levels, served

STACK_NAMES = {"triton": "Triton stack", "naive": "naive (FastAPI, torch, batch 1)", **NAMES}


def _f(x, fmt="{:.1f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def server_cpu_ms(lv: dict, cores: int) -> float | None:
    """Server CPU time per caption (its whole process tree), client excluded."""
    if lv.get("server_cpu") is None or not lv.get("throughput"):
        return None
    return lv["server_cpu"] * cores / lv["throughput"] * 1e3


def mean_batch(lv: dict) -> float | None:
    models = lv.get("models") or {}
    for name in ("peer", "preprocess"):  # a peer's batcher; Triton's front model (admits every request)
        if name in models:
            return models[name]["batch"]
    return 1.0 if lv["stack"] == "naive" else None


def inprocess_best(results: dict, model: str, variant: str) -> dict | None:
    rows = [r for r in results.get("inprocess", []) if r["model"] == model and r["variant"] == variant]
    return max(rows, key=lambda r: r["captions_per_s"]) if rows else None


def concurrencies(results: dict, model: str, variant: str) -> list[int]:
    return sorted({lv["concurrency"] for lv in peer_levels(results) if (lv["model"], lv["variant"]) == (model, variant)})


def side_by_side(results: dict) -> str:
    cores = results.get("cores", 1)
    head = (
        "| model | variant | clients | stack | captions/s | p50 ms | p99 ms | server CPU ms/caption | mean batch | "
        "peak RSS MiB | peak PSS MiB |"
    )
    lines = [head, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, variant in served(results):
        best = inprocess_best(results, model, variant)
        if best:
            cpu_ms = best["cpu"] * cores / best["captions_per_s"] * 1e3 if best.get("cpu") else None
            lines.append(
                f"| {model} | {variant} | - | in-process bound (batch {best['batch_size']}) | "
                f"{best['captions_per_s']:.1f} | - | - | {_f(cpu_ms, '{:.2f}')} | {best['batch_size']} | - | - |"
            )
        for c in concurrencies(results, model, variant):
            rows = [level(results, model, st, variant, c) for st in ("triton", *PEER_STACKS)]
            rows.append(
                next(
                    (
                        lv
                        for lv in results.get("levels", [])
                        if lv["model"] == model and lv["stack"] == "naive" and lv["concurrency"] == c
                    ),
                    None,
                )
            )
            for lv in filter(None, rows):
                lines.append(
                    f"| {model} | {variant} | {c} | {STACK_NAMES.get(lv['stack'], lv['stack'])} | {_f(lv['throughput'])} | "
                    f"{_f(lv['p50_ms'])} | {_f(lv['p99_ms'])} | {_f(server_cpu_ms(lv, cores), '{:.2f}')} | "
                    f"{_f(mean_batch(lv))} | {_f(lv.get('peak_rss_mib'), '{:.0f}')} | {_f(lv.get('peak_pss_mib'), '{:.0f}')} |"
                )
    return "\n".join(lines)


def setup_lines(results: dict) -> str:
    out = []
    for name, info in results.get("peer_setup", {}).items():
        made = "already made (reused)" if info.get("setup_s") is None else f"made in {info['setup_s']:.0f} s"
        out.append(f"- {NAMES.get(name, name)} ({info.get('version')}): venv .peers/{name} {made}")
    for model, wall in results.get("peer_wall_s", {}).items():
        out.append(f"- the peers on {model}: {wall / 60:.1f} min (starts, checks, levels, teardown)")
    return "\n".join(out)


def plots(results: dict, out: Path) -> list[Path]:
    """One PNG per model: throughput, p99, server CPU-ms per caption and peak PSS against
    clients, one line per stack and variant (the in-process bound dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cores = results.get("cores", 1)
    paths = []
    for model in dict.fromkeys(m for m, _ in served(results)):
        variants = [v for m, v in served(results) if m == model]
        fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
        panels = (
            ("captions / s", lambda lv: lv["throughput"]),
            ("p99 latency (ms)", lambda lv: lv["p99_ms"]),
            ("server CPU ms / caption", lambda lv: server_cpu_ms(lv, cores)),
            ("peak PSS (MiB)", lambda lv: lv.get("peak_pss_mib")),
        )
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        stacks = ("triton", *PEER_STACKS, "naive")
        for ax, (ylabel, get) in zip(axes, panels):
            for vi, variant in enumerate(variants):
                cs = concurrencies(results, model, variant)
                for si, st in enumerate(stacks):
                    pts = []
                    for c in cs:
                        lv = (
                            level(results, model, st, variant, c)
                            if st != "naive"
                            else next(
                                (
                                    x
                                    for x in results.get("levels", [])
                                    if x["model"] == model and x["stack"] == "naive" and x["concurrency"] == c
                                ),
                                None,
                            )
                        )
                        y = get(lv) if lv else None
                        if y is not None and not (isinstance(y, float) and math.isnan(y)):
                            pts.append((c, y))
                    if pts and not (st == "naive" and vi > 0):
                        label = STACK_NAMES[st] if st == "naive" else f"{STACK_NAMES[st]} {variant}"
                        ax.plot(*zip(*pts), ["o-", "s--", "^:"][vi % 3], color=cycle[si % len(cycle)], label=label)
                best = inprocess_best(results, model, variant)
                if best and ylabel.startswith("captions"):
                    ax.axhline(
                        best["captions_per_s"],
                        ls="--",
                        color="grey",
                        alpha=0.6 + 0.2 * vi,
                        label=f"in-process bound {variant} ({best['captions_per_s']:.0f}/s)",
                    )
            ax.set_xscale("log", base=2)
            xs = sorted({c for v in variants for c in concurrencies(results, model, v)})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            if ylabel.startswith("p99"):
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{model}: Triton stack vs Ray Serve, LitServe, MLServer, naive server (same graphs, same cores)")
        fig.tight_layout()
        path = out / f"bench_peers_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def config_lines(results: dict) -> str:
    return "\n".join(f"- {NAMES.get(k, k)}: {v}" for k, v in results.get("config", {}).get("peers", {}).items())
