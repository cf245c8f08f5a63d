"""Decode microbenchmark: what `prepare_bytes` (decode, EXIF, limits, resize to the model's
side) costs per image on the exact and the fast path, side by side in one run, for the
images callers send: 1024 px JPEG q90, 1024 px PNG, and the 128 px PNG the rest of the
benchmark uses. Single-threaded, in-process, same bytes for both paths; the fast path
once more with Pillow alone (`fast, Pillow only`: Pillow's PNG decoder in place of
libspng, Pillow's draft scales in place of libjpeg-turbo's M/8 through simplejpeg; what
the fast path costs where neither is installed), and with libspng inflating PNGs itself
(`fast, zlib inflate`: without libdeflate).

    python -m bench.decode                   # both model sides (64: default, 299: seed-inception)
    python -m bench.decode --sides 64 --rounds 5

Figures are CPU ms per image of this process (time.process_time), which other work on a
shared machine disturbs less than wall time; wall ms is printed too. Each cell is the
median of `--rounds` passes over `--images` distinct scenes; the two paths alternate
pass by pass so that a change in the machine's load hits both."""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import TypedDict

import captioner.preprocess as pre
from captioner.photos import photos
from captioner.preprocess import PreprocessConfig, prepare_bytes


class _Workload(TypedDict):
    fmt: str
    side: int


WORKLOADS: dict[str, _Workload] = {
    "1024 px JPEG q90": {"fmt": "jpeg", "side": 1024},
    "1024 px PNG": {"fmt": "png", "side": 1024},
    "128 px PNG": {"fmt": "png", "side": 128},
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return platform.processor() or "unknown CPU"


# The decoding libraries captioner.preprocess uses where installed.
LIBS = ("pyspng", "deflate", "simplejpeg")


def one_pass(images: list[bytes], cfg: PreprocessConfig, without: tuple[str, ...] = ()) -> tuple[float, float]:
    """(CPU ms, wall ms) per image over one pass, with the libraries named in `without`
    left out: ("deflate",) has libspng inflate PNGs with zlib; all of LIBS, Pillow
    decodes PNGs and JPEGs (no libjpeg-turbo M/8 scales through simplejpeg)."""
    keep = {name: getattr(pre, name) for name in LIBS}
    for name in without:
        setattr(pre, name, None)
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        for data in images:
            prepare_bytes(data, cfg)
        n = len(images)
        return (time.process_time() - c0) * 1e3 / n, (time.perf_counter() - w0) * 1e3 / n
    finally:
        for name, lib in keep.items():
            setattr(pre, name, lib)


def measure(images: list[bytes], side: int, rounds: int) -> dict[str, tuple[float, float]]:
    exact = PreprocessConfig(side, decode="exact")
    fast = replace(exact, decode="fast")
    paths: tuple[tuple[str, PreprocessConfig, tuple[str, ...]], ...] = (
        ("exact", exact, ()),
        ("fast", fast, ()),
        ("fast, zlib inflate", fast, ("deflate",)),
        ("fast, Pillow only", fast, LIBS),
    )
    for _, cfg, without in paths:  # warm: imports, first allocations
        one_pass(images[:2], cfg, without)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in paths}
    for _ in range(rounds):
        for name, cfg, without in paths:
            runs[name].append(one_pass(images, cfg, without))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sides", default="64,299", help="model input sides to prepare for (default 64,299)")
    p.add_argument("--images", type=int, default=16, help="distinct scenes per workload")
    p.add_argument("--rounds", type=int, default=7, help="passes per path; the median is reported")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    sides = [int(s) for s in a.sides.split(",") if s.strip()]
    print(
        f"CPU: {cpu_name()}; Python {platform.python_version()}; {a.images} scenes x {a.rounds} passes per cell, "
        "median; CPU ms per image (wall ms)"
    )
    data = {name: [ph.data for ph in photos(a.images, a.seed, **kw)] for name, kw in WORKLOADS.items()}
    if pre.pyspng is None:
        print("pyspng is not installed (or CAPTIONER_PNG_DECODER=pillow): every column decodes PNGs with Pillow")
    if pre.deflate is None:
        print("deflate is not installed (or CAPTIONER_PNG_DECODER is not libdeflate): libspng inflates PNGs itself")
    if pre.simplejpeg is None:
        print("simplejpeg is not installed (or CAPTIONER_JPEG_DECODER=pillow): the fast path's JPEGs use Pillow's draft")
    print(
        "| model side | images | bytes/image | exact | fast | fast, zlib inflate | fast, Pillow only "
        "| exact / fast | zlib inflate / fast | Pillow only / fast |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side in sides:
        for name, images in data.items():
            r = measure(images, side, a.rounds)
            (ec, ew), (fc, fw), (zc, zw), (pc, pw) = (r["exact"], r["fast"], r["fast, zlib inflate"], r["fast, Pillow only"])
            size = sum(map(len, images)) / len(images)
            print(
                f"| {side} | {name} | {size / 1e3:,.0f} KB | {ec:.2f} ms ({ew:.2f}) | {fc:.2f} ms ({fw:.2f}) "
                f"| {zc:.2f} ms ({zw:.2f}) | {pc:.2f} ms ({pw:.2f}) | {ec / fc:.2f}x | {zc / fc:.2f}x | {pc / fc:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
