"""Photo-sized workloads of `make bench`: the images other services send, beside the
128 px PNG every other figure uses, on the same scenes (captioner/photos.py):

  128px-png    the 128 px PNG scenes (the reference; bench/variants.bench_images)
  1024px-jpeg  the same scenes upscaled to 1024 px, JPEG q90 (~100 KB each)
  1024px-mix   1024 px, 90 % JPEG q90 + 10 % PNG (~700 KB each)

For each model, one variant (what the build serves: the runtime RUNTIME=auto chose, fp32)
is measured on all three on one server, so their ratios come from the same minutes of
the same machine: the in-process bound on the same bytes (bench/inprocess.py) and the
Triton stack at --photo-concurrency closed-loop clients. Each is measured in
--photo-rounds windows, interleaved (128 px, JPEG, mix, 128 px, ...), and the windows
are summed: the machine's drift over those minutes (a shared VM's 128 px throughput was
seen to move 15 % within one run) falls on the three workloads alike instead of on
whichever ran last. Results go to bench.json's `photos`, with each window's throughput
in `rounds`; `table` and `targets` turn them into the report's section:

  P1 default model, 1024 px mix throughput >= 0.5 x its 128 px throughput (32 clients)
  P2 default model, 1024 px mix p99 <= 3 x its 128 px p99 (32 clients)
  P3 seed-inception, 1024 px JPEG throughput >= 0.9 x its 128 px throughput (32 clients)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from captioner.photos import photos

WORKLOADS = ("128px-png", "1024px-jpeg", "1024px-mix")
LABELS = {
    "128px-png": "128 px PNG",
    "1024px-jpeg": "1024 px JPEG q90",
    "1024px-mix": "1024 px, 90% JPEG q90 + 10% PNG",
}
MIX_IMAGES = 70  # 63 JPEG + 7 PNG: the mix is exactly 10 % PNG; the first 64 scenes are the others'
PNG_EVERY = 10  # every 10th image of the mix is the PNG photo
TARGET_CLIENTS = 32
DECODES = ("build", "exact", "fast")
# A photo level's window is stretched (up to 4 x --duration) until this many replies per
# client fell in it. Replies come in batch-sized bursts: at seed-inception's ~16/s a 6 s
# window held 2-3 bursts of 32, and one burst more or less moved P3 by 30 %.
PHOTO_MIN_ROUNDS = 10
PHOTO_ROUNDS = 3  # interleaved windows per workload (module docstring)


def workload_images(name: str, n: int = 64, seed: int = 7) -> list[bytes]:
    """The encoded images of one workload (seed 7: bench_images' scenes); made once per
    process (encoding 1024 px photos takes seconds), for every model and stack."""
    return list(_encoded(name, n, seed))


@functools.cache
def _encoded(name: str, n: int, seed: int) -> tuple[bytes, ...]:
    if name == "128px-png":
        from .variants import bench_images

        return tuple(bench_images(n, seed))
    if name == "1024px-jpeg":
        return tuple(p.data for p in photos(n, seed, "jpeg"))
    if name == "1024px-mix":
        jpeg = photos(MIX_IMAGES, seed, "jpeg")
        png = photos(MIX_IMAGES, seed, "png")
        return tuple((png if i % PNG_EVERY == PNG_EVERY - 1 else jpeg)[i].data for i in range(MIX_IMAGES))
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def add_arguments(p: argparse.ArgumentParser, env: Callable) -> None:
    g = p.add_argument_group("photo workloads (bench/photos.py)")
    g.add_argument(
        "--photos",
        choices=("on", "off"),
        default=env("BENCH_PHOTOS", "on"),
        help="measure the photo workloads beside the 128 px one (default on)",
    )
    g.add_argument(
        "--photo-concurrency",
        type=int,
        default=int(env("BENCH_PHOTO_CONCURRENCY", str(TARGET_CLIENTS))),
        help=f"closed-loop clients for the photo workloads (default {TARGET_CLIENTS}, the targets' level)",
    )
    g.add_argument(
        "--photo-rounds",
        type=int,
        default=int(env("BENCH_PHOTO_ROUNDS", str(PHOTO_ROUNDS))),
        help=f"interleaved windows per photo workload, summed (default {PHOTO_ROUNDS})",
    )
    g.add_argument(
        "--photo-batch",
        type=int,
        default=int(env("BENCH_PHOTO_BATCH", "32")),
        help="in-process batch size for the photo workloads' bound (default 32)",
    )
    g.add_argument(
        "--decode",
        choices=DECODES,
        default=env("BENCH_DECODE", "build"),
        help="decode path served and bound in-process: build (what the build's gate decided, default), "
        "or exact / fast to compare",
    )


def wanted(a: argparse.Namespace, label: str, paths: dict) -> bool:
    """The photo workloads run on one variant per model: fp32 through the encoder runtime
    the build chose (what `make serve` serves)."""
    return (
        getattr(a, "photos", "off") == "on"
        and label.endswith(" fp32")
        and paths.get("auto_encoder_runtime") == paths.get("runtime")
    )


def decode_for(a: argparse.Namespace, paths: dict, checkpoint_decode: str) -> str:
    """The decode path a stack serves: --decode, else the build's choice, else the checkpoint's."""
    if getattr(a, "decode", "build") != "build":
        return a.decode
    return paths.get("decode") or checkpoint_decode


def run_inprocess(s, spec, variant: str, paths: dict) -> None:
    """The bound on each workload's bytes: decode + resize + encoder + greedy decode in
    this process, --photo-rounds interleaved windows of --inproc-duration each."""
    from .inprocess import measure, merge_inprocess
    from .stacks import captioner

    cap = captioner(spec, paths, s.a.inproc_threads, s.a.inproc_spinning)
    cap.cfg = replace(cap.cfg, decode=decode_for(s.a, paths, cap.cfg.decode))
    rounds = max(1, s.a.photo_rounds)
    windows: dict[str, list] = {w: [] for w in WORKLOADS}
    for k in range(rounds):
        for w in WORKLOADS:
            s.bar.set_postfix_str(f"{spec.name} in-process {variant} {w} ({k + 1}/{rounds})")
            windows[w].append(measure(cap, workload_images(w), s.a.photo_batch, s.a.inproc_duration))
    for w in WORKLOADS:
        s.results.setdefault("photos", []).append(
            {
                "model": spec.name,
                "variant": variant,
                "workload": w,
                "stack": "inprocess",
                "decode": cap.cfg.decode,
                "concurrency": None,
                **merge_inprocess(windows[w]).to_dict(),
                "rounds": [round(r.captions_per_s, 2) for r in windows[w]],
            }
        )


def run_triton(s, spec, variant: str, url: str, pids: list[int], decode: str) -> None:
    """Each workload at --photo-concurrency clients against the running server, in
    --photo-rounds interleaved windows (each stretched until PHOTO_MIN_ROUNDS replies per
    client fell in it)."""
    from .loadgen import TritonClient, merge_levels, run_level

    rounds, c = max(1, s.a.photo_rounds), s.a.photo_concurrency

    windows: dict[str, list] = {w: [] for w in WORKLOADS}
    samples: dict[str, list[float]] = {w: [] for w in WORKLOADS}

    async def go():
        for k in range(rounds):
            for w in WORKLOADS:
                s.bar.set_postfix_str(f"{spec.name} triton {variant} {w} x{c} ({k + 1}/{rounds})")
                async with TritonClient(url, workload_images(w), parameters=spec.params) as client:
                    await client(0)
                    r = await run_level(
                        client,
                        c,
                        duration=s.a.duration,
                        warmup=s.a.warmup,
                        min_completed=PHOTO_MIN_ROUNDS * c,
                        max_duration=4 * s.a.duration,
                        server_pids=pids,
                        samples=samples[w],
                    )
                windows[w].append(r)
        return [(w, merge_levels(windows[w], samples[w]), [round(r.throughput, 2) for r in windows[w]]) for w in WORKLOADS]

    for w, r, per_round in asyncio.run(go()):
        if r.errors:
            s.note(f"{spec.name} triton {variant} {w} x{r.concurrency}: {r.errors} errors, e.g. {r.error_samples[:1]}")
        s.results.setdefault("photos", []).append(
            {
                "model": spec.name,
                "variant": variant,
                "workload": w,
                "stack": "triton",
                "decode": decode,
                **r.to_dict(),
                "rounds": per_round,
            }
        )


def _rows(results: dict, stack: str) -> dict[tuple[str, str], dict[str, dict]]:
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results.get("photos", []):
        if r["stack"] == stack:
            out.setdefault((r["model"], r["variant"]), {})[r["workload"]] = r
    return out


def table(results: dict) -> str:
    """Per model: each workload through Triton and in-process, and its ratio to 128 px."""
    lines = [
        "| model | variant | decode | images | Triton captions/s | x 128 px | p50 ms | p99 ms | p99 x 128 px | "
        "in-process captions/s | x 128 px | Triton / in-process |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tri, inp = _rows(results, "triton"), _rows(results, "inprocess")
    for key in sorted(set(tri) | set(inp)):
        t, i = tri.get(key, {}), inp.get(key, {})
        t0, i0 = t.get("128px-png"), i.get("128px-png")
        for w in WORKLOADS:
            tr, ir = t.get(w), i.get(w)
            tput = tr["throughput"] if tr else math.nan
            bound = ir["captions_per_s"] if ir else math.nan
            decode = (tr or ir or {}).get("decode", "?")
            lines.append(
                f"| {key[0]} | {key[1]} | {decode} | {LABELS[w]} | {_f(tput)} | {_x(tput, t0 and t0['throughput'])} | "
                f"{_f(tr and tr['p50_ms'])} | {_f(tr and tr['p99_ms'])} | {_x(tr and tr['p99_ms'], t0 and t0['p99_ms'])} | "
                f"{_f(bound)} | {_x(bound, i0 and i0['captions_per_s'])} | {_x(tput, bound)} |"
            )
    return "\n".join(lines)


@dataclass
class PhotoTarget:
    name: str
    value: float | None
    goal: float
    at_most: bool = False  # the figure must stay at or under the goal
    windows: list[float] | None = None  # the same ratio in each interleaved window

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    def line(self) -> str:
        status = {True: "MET", False: "MISSED", None: "not measured"}[self.met]
        v = "n/a" if self.value is None else f"{self.value:.2f}x"
        per = f"; windows {', '.join(f'{w:.2f}x' for w in self.windows)}" if self.windows and len(self.windows) > 1 else ""
        return f"- {self.name}: {v} (goal {'<=' if self.at_most else '>='} {self.goal:g}x{per}) -> **{status}**"


def targets(results: dict, default_model: str = "default") -> list[PhotoTarget]:
    """P1-P3 (module docstring) from the Triton rows of one run."""
    tri = _rows(results, "triton")

    def ratio(model: str, workload: str, field: str) -> float | None:
        for (m, _), rows in tri.items():
            if m == model and workload in rows and "128px-png" in rows and rows["128px-png"][field]:
                return rows[workload][field] / rows["128px-png"][field]
        return None

    def windows(model: str, workload: str) -> list[float] | None:
        for (m, _), rows in tri.items():
            if m == model and workload in rows and "128px-png" in rows:
                a, b = rows[workload].get("rounds") or [], rows["128px-png"].get("rounds") or []
                return [x / y for x, y in zip(a, b) if y] or None
        return None

    return [
        PhotoTarget(
            "P1 default, 1024 px mix / 128 px throughput",
            ratio(default_model, "1024px-mix", "throughput"),
            0.5,
            windows=windows(default_model, "1024px-mix"),
        ),
        PhotoTarget("P2 default, 1024 px mix / 128 px p99", ratio(default_model, "1024px-mix", "p99_ms"), 3.0, True),
        PhotoTarget(
            "P3 seed-inception, 1024 px JPEG / 128 px throughput",
            ratio("seed-inception", "1024px-jpeg", "throughput"),
            0.9,
            windows=windows("seed-inception", "1024px-jpeg"),
        ),
    ]


def markdown(results: dict, default_model: str = "default") -> str:
    if not results.get("photos"):
        return ""
    lines = [
        "",
        "## Photo workloads",
        "",
        f"Same scenes as 128 px PNG, as 1024 px JPEG q90 and as a 90 % JPEG + 10 % PNG mix; one variant per "
        f"model, the three workloads on one server in interleaved windows, summed ({TARGET_CLIENTS} clients unless "
        "the run says otherwise), the in-process bound on the same bytes.",
        "",
        table(results),
        "",
    ]
    lines += [t.line() for t in targets(results, default_model)]
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.1f}"


def _x(a, b) -> str:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return "n/a"
    return f"{a / b:.2f}x"
