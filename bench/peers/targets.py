"""Issue 21's targets, from one bench run's results (reports/bench.json):

T1 for each model and variant the peers served, at each peer concurrency >= 16: the Triton
   stack's throughput >= 1.3 x the best peer's there, except where 1.3 x that peer would
   exceed the in-process bound of the same variant (no stack beats the bound): then
   >= 0.9 x the bound, and never below the best peer; and the Triton stack's p99 no worse
   than that peer's.
T2 at 1 client, for each model and variant: the Triton stack's p50 <= 1.2 x the best
   (lowest) peer p50.

The table beside them: per model, variant and client count, each stack's throughput,
p50, p99, server CPU-ms per caption and peak memory (bench/peers/report.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

PEER_STACKS = ("ray", "litserve", "mlserver")
T1_MIN_CONCURRENCY = 16
T1_FACTOR, T1_BOUND_SHARE, T2_FACTOR = 1.3, 0.9, 1.2


def _ok(x: object) -> TypeGuard[float]:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def peer_levels(results: dict) -> list[dict]:
    return [lv for lv in results.get("levels", []) if lv["stack"] in PEER_STACKS]


def served(results: dict) -> list[tuple[str, str]]:
    """(model, variant) pairs some peer was measured on, in run order."""
    seen: list[tuple[str, str]] = []
    for lv in peer_levels(results):
        if (lv["model"], lv["variant"]) not in seen:
            seen.append((lv["model"], lv["variant"]))
    return seen


def level(results: dict, model: str, stack: str, variant: str, concurrency: int) -> dict | None:
    for lv in results.get("levels", []):
        if (lv["model"], lv["stack"], lv["variant"], lv["concurrency"]) == (model, stack, variant, concurrency):
            return lv
    return None


def best_peer(
    results: dict, model: str, variant: str, concurrency: int, key: str = "throughput", lowest: bool = False
) -> dict | None:
    rows = [
        lv
        for lv in peer_levels(results)
        if (lv["model"], lv["variant"], lv["concurrency"]) == (model, variant, concurrency)
        and _ok(lv.get(key))
        and lv.get("completed", 1) > 0
    ]
    if not rows:
        return None
    return (min if lowest else max)(rows, key=lambda lv: lv[key])


def t1_goal(peer: float, bound: float | None) -> tuple[float, str]:
    """The throughput the Triton stack must reach against a peer's, and why that figure."""
    if bound is None or T1_FACTOR * peer <= bound:
        return T1_FACTOR * peer, f"{T1_FACTOR:g} x peer"
    if T1_BOUND_SHARE * bound >= peer:
        return T1_BOUND_SHARE * bound, f"{T1_BOUND_SHARE:g} x in-process bound (1.3 x peer exceeds it)"
    return peer, "the peer (1.3 x peer exceeds the bound, 0.9 x bound is below the peer)"


def _others(triton: dict, peer: dict) -> str:
    """The machine's other work during the two levels compared: a verdict from levels
    measured under different outside load says little, and the line should say so."""
    a, b = triton.get("other_cpu"), peer.get("other_cpu")
    if not (_ok(a) and _ok(b)) or max(a, b) < 0.05:
        return ""
    return f"; others' CPU {a:.0%} during Triton, {b:.0%} during {peer['stack']}"


@dataclass
class PeerTarget:
    name: str
    met: bool | None  # None: not measured
    detail: str

    def line(self) -> str:
        status = {True: "MET", False: "MISSED", None: "not measured"}[self.met]
        return f"- {self.name}: {self.detail} -> **{status}**"


def t1(results: dict, bound_of) -> list[PeerTarget]:
    """`bound_of(model, variant)` -> the in-process bound (captions/s) or None."""
    out = []
    for model, variant in served(results):
        cs = sorted(
            {
                lv["concurrency"]
                for lv in peer_levels(results)
                if (lv["model"], lv["variant"]) == (model, variant) and lv["concurrency"] >= T1_MIN_CONCURRENCY
            }
        )
        for c in cs:
            name = f"T1 {model} {variant} at {c} clients"
            peer = best_peer(results, model, variant, c)
            tri = level(results, model, "triton", variant, c)
            if peer is None or tri is None:
                out.append(PeerTarget(name, None, "Triton or every peer missing at this level"))
                continue
            bound = bound_of(model, variant)
            goal, why = t1_goal(peer["throughput"], bound)
            fast = tri["throughput"] >= goal
            tail = _ok(tri["p99_ms"]) and tri["p99_ms"] <= peer["p99_ms"]
            out.append(
                PeerTarget(
                    name,
                    fast and tail,
                    (
                        f"Triton {tri['throughput']:.1f}/s vs goal {goal:.1f}/s ({why}; best peer {peer['stack']} "
                        f"{peer['throughput']:.1f}/s, bound {'-' if bound is None else f'{bound:.1f}/s'}); "
                        f"p99 {tri['p99_ms']:.0f} vs {peer['p99_ms']:.0f} ms{_others(tri, peer)}"
                    ),
                )
            )
    return out


def t2(results: dict) -> list[PeerTarget]:
    out = []
    for model, variant in served(results):
        name = f"T2 {model} {variant} at 1 client"
        peer = best_peer(results, model, variant, 1, key="p50_ms", lowest=True)
        tri = level(results, model, "triton", variant, 1)
        if peer is None or tri is None:
            out.append(PeerTarget(name, None, "Triton or every peer missing at 1 client"))
            continue
        goal = T2_FACTOR * peer["p50_ms"]
        out.append(
            PeerTarget(
                name,
                _ok(tri["p50_ms"]) and tri["p50_ms"] <= goal,
                (
                    f"Triton p50 {tri['p50_ms']:.1f} ms vs goal <= {goal:.1f} ms ({T2_FACTOR:g} x {peer['stack']} "
                    f"{peer['p50_ms']:.1f} ms){_others(tri, peer)}"
                ),
            )
        )
    return out
