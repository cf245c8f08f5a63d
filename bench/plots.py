"""PNG plots of a bench run: throughput vs concurrency and latency percentiles, one panel
per model. Input is the results dict that bench.run writes to reports/bench.json."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; the bench runs headless
import matplotlib.pyplot as plt  # noqa: E402

PERCENTILE_STYLES = (("p50_ms", "-", "p50"), ("p95_ms", "--", "p95"), ("p99_ms", ":", "p99"))


def _series(results: dict) -> dict[str, dict[str, list[dict]]]:
    """model -> series label -> levels sorted by concurrency."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for lv in results["levels"]:
        out[lv["model"]][f"{lv['stack']} {lv['variant']}"].append(lv)
    for series in out.values():
        for levels in series.values():
            levels.sort(key=lambda lv: lv["concurrency"])
    return out


def _concurrency_axis(ax, levels_by_label) -> None:
    xs = sorted({lv["concurrency"] for levels in levels_by_label.values() for lv in levels})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients")


def _colours(labels):
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(sorted(labels))}


def throughput_plot(results: dict, path: str | Path) -> Path:
    series = _series(results)
    models = list(series)
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6 * max(len(models), 1), 4.5), squeeze=False)
    labels = {label for s in series.values() for label in s} | {
        f"in-process {r['variant']}" for r in results.get("inprocess", [])
    }
    colour = _colours(labels)
    for ax, model in zip(axes[0], models):
        for label, levels in sorted(series[model].items()):
            xs = [lv["concurrency"] for lv in levels]
            ax.plot(xs, [lv["throughput"] for lv in levels], "o-", color=colour[label], label=label)
        bounds: dict[str, float] = {}
        for r in results.get("inprocess", []):
            if r["model"] == model:
                bounds[r["variant"]] = max(bounds.get(r["variant"], 0.0), r["captions_per_s"])
        for variant, best in sorted(bounds.items()):
            label = f"in-process {variant}"
            ax.axhline(best, ls="--", color=colour[label], label=f"{label} bound ({best:.0f}/s)")
        _concurrency_axis(ax, series[model])
        ax.set_ylabel("captions / s")
        ax.set_title(model)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput vs concurrency (client and server on the same cores)")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_plot(results: dict, path: str | Path) -> Path:
    series = _series(results)
    models = list(series)
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6 * max(len(models), 1), 4.5), squeeze=False)
    colour = _colours({label for s in series.values() for label in s})
    for ax, model in zip(axes[0], models):
        for label, levels in sorted(series[model].items()):
            xs = [lv["concurrency"] for lv in levels]
            for key, style, name in PERCENTILE_STYLES:
                ax.plot(xs, [lv[key] for lv in levels], style, marker="o", ms=3, color=colour[label], label=f"{label} {name}")
        _concurrency_axis(ax, series[model])
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Latency percentiles vs concurrency")
    return _save(fig, path)
