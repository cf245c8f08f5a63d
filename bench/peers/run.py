"""The peers in `make bench`: for one model and variant, each peer (its venv made on first
use) serves the variant's built graphs (bench.engines.served_paths: the runtime and
precision the Triton stack serves), is checked against the in-process captions, then
gets the same closed-loop levels as the Triton stack and the naive server
(bench.stacks.run_levels over bench/loadgen.py) at --peer-concurrency."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path

from ..stacks import Session, captioner, run_levels
from ..variants import ModelSpec
from . import clients, venv
from .launch import PeerConfig, PeerServer, batch_wait_ms
from .pipeline import PeerSpec

NAMES = {"ray": "Ray Serve", "litserve": "LitServe", "mlserver": "MLServer"}
DEFAULT_CONCURRENCY = (1, 16, 64)


def peer_spec(spec: ModelSpec, paths: dict, max_batch_size: int, cache_dir: Path) -> PeerSpec:
    """What a peer needs to serve one variant, without torch: the graphs and runtimes of
    `paths` (bench.engines.served_paths), and from the checkpoint the vocabulary, the
    preprocessing and the decoding defaults."""
    from captioner import checkpoint as ckpt_mod

    ck = ckpt_mod.load(spec.checkpoint)
    return PeerSpec(
        encoder=str(paths["encoder"]),
        decoder=str(paths["decoder"]),
        runtime=paths["runtime"],
        step_runtime=paths["step_runtime"],
        inference_precision=paths["inference_precision"],
        vocab=ck.vocab.to_list(),
        preprocess=ck.preprocess.to_dict(),
        max_length=int(ck.args.max_length),
        length_penalty=float(ck.decoding.get("length_penalty", 0.7)),
        max_batch_size=max_batch_size,
        cache_dir=str(cache_dir),
    )


def peer_config(a: argparse.Namespace) -> PeerConfig:
    return PeerConfig(
        workers=a.peer_workers, threads=a.peer_threads, max_batch_size=a.max_batch_size, batch_wait_ms=a.peer_batch_wait_ms
    )


def parity(
    name: str, server: PeerServer, spec: ModelSpec, variant: str, paths: dict, images: list[bytes], batch_dir: Path, n: int = 8
) -> str:
    """The peer must be doing the in-process work: the same captions for a few images."""
    expected = captioner(spec, paths, threads=1).caption_bytes(images[:n])

    async def go():
        async with clients.client(name, server, images[:n], spec.params, batch_dir) as c:
            return [await c(i) for i in range(n)]

    same = sum(x == y for x, y in zip(asyncio.run(go()), expected))
    return f"{spec.name} {variant}: {NAMES[name]} and in-process captions agree on {same}/{n} images"


def run_peer(s: Session, spec: ModelSpec, name: str, variant: str, paths: dict) -> None:
    a = s.a
    s.bar.set_postfix_str(f"{name}: venv")
    env = venv.ensure(name, log=s.out / f"peer-venv-{name}.log")
    setups = s.results.setdefault("peer_setup", {})
    if env.setup_s is not None:
        setups[name] = {"setup_s": env.setup_s, "version": env.version}
    else:
        setups.setdefault(name, {"setup_s": None, "version": env.version})
    d = s.work / spec.name
    spec_path = peer_spec(spec, paths, a.max_batch_size, d / "peer-openvino-cache").write(
        d / f"peer-{variant.replace(' ', '-')}.json"
    )
    batch_dir = d / f"peer-batches-{name}-{variant.replace(' ', '-')}"
    shutil.rmtree(batch_dir, ignore_errors=True)
    cfg = peer_config(a)
    s.results["config"].setdefault("peers", {})[name] = (
        f"{env.version}: {cfg.workers} worker processes x {cfg.threads} intra-op thread(s), max batch "
        f"{cfg.max_batch_size}, batch wait {batch_wait_ms(name, cfg):g} ms; own venv .peers/{name}"
    )
    log = s.out / f"peer-{name}-{spec.name}-{variant.replace(' ', '-')}.log"
    log.unlink(missing_ok=True)
    s.bar.set_postfix_str(f"{spec.name} {name} {variant}: start")
    with PeerServer(name, env.python, spec_path, cfg, log_path=log, batch_log_dir=batch_dir) as server:
        s.note(parity(name, server, spec, variant, paths, s.images, batch_dir))
        levels = s.at_levels(a.peer_concurrency)
        run_levels(
            levels, spec, name, variant, lambda: clients.client(name, server, s.images, spec.params, batch_dir), server.pids
        )


def run_peers(s: Session, spec: ModelSpec, variant: str, paths: dict) -> None:
    """Every peer of --peers on one variant; a peer that cannot start is noted (with its
    log) and skipped, the others still run."""
    for name in s.a.peers:
        try:
            run_peer(s, spec, name, variant, paths)
        except Exception as e:
            s.note(f"{spec.name} {variant}: peer {name} not measured: {type(e).__name__}: {e}")
            s.bar.update(len(s.a.peer_concurrency))


def add_arguments(p: argparse._ActionsContainer, env=None) -> None:
    """bench.run's peer flags (on a parser or an argument group)."""
    import os

    env = env or os.environ.get

    def csv(cast):
        return lambda text: [cast(x) for x in text.split(",") if x.strip()]

    p.add_argument(
        "--peers",
        type=csv(str),
        default=csv(str)(env("BENCH_PEERS", ",".join(venv.PEERS))),
        help=f"peer servers to run beside Triton: any of {','.join(venv.PEERS)}, or 'none' "
        "(each gets its own venv under .peers/ on first use)",
    )
    p.add_argument(
        "--peer-concurrency",
        type=csv(int),
        default=csv(int)(env("BENCH_PEER_CONCURRENCY", ",".join(map(str, DEFAULT_CONCURRENCY)))),
        help="client counts for the peers",
    )
    p.add_argument(
        "--peer-workers",
        type=int,
        default=int(env("BENCH_PEER_WORKERS", "2")),
        help="worker processes / replicas per peer (default 2: one per core)",
    )
    p.add_argument(
        "--peer-threads",
        type=int,
        default=int(env("BENCH_PEER_THREADS", "1")),
        help="intra-op threads per engine in each peer worker",
    )
    p.add_argument(
        "--peer-batch-wait-ms",
        type=float,
        default=float(env("BENCH_PEER_BATCH_WAIT_MS", "-1")),
        help="the peers' batch wait (default: none where the framework allows, MLServer 1 ms)",
    )
    p.add_argument(
        "--peer-variants",
        default=env("BENCH_PEER_VARIANTS", "auto"),
        help="variants the peers serve: auto (the build's fp32 choice and the best in-process "
        "variant), fp32, or runtime:precision list",
    )


def check_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.peers == ["none"]:
        a.peers = []
    bad = [x for x in a.peers if x not in venv.PEERS]
    if bad:
        p.error(f"--peers: {bad}; choose from {', '.join(venv.PEERS)} or none")
    if a.peer_batch_wait_ms < 0:
        a.peer_batch_wait_ms = None


# The peers serve the best variant beside fp32 only when its in-process bound is this much
# higher, where precision changes what a stack can reach (seed-inception's int8: 3.3-3.6x
# its fp32 bound); the default model's int8 (1.4-1.7x) is left out to keep `make bench`
# under 20 minutes (--peer-variants adds it).
BEST_VARIANT_GAIN = 2.0


def chosen_variants(results: dict, model: str, labels: list[str], choice: str) -> list[str]:
    """The variants (labels of `labels`, measured for `model`) the peers serve.

    `auto`: the fp32 variant whose encoder runtime the build's RUNTIME=auto picks, and
    the variant with the highest in-process bound (the best CPU variant) when that is
    another one whose bound is at least BEST_VARIANT_GAIN x the fp32 one's (where
    precision changes what a stack can reach: seed-inception's int8, not the small
    default encoder's); `fp32`: the first only; otherwise a comma list of labels with
    ':' (openvino:int8)."""
    if choice not in ("auto", "fp32"):
        wanted = [x.replace(":", " ") for x in choice.split(",") if x.strip()]
        return [x for x in labels if x in wanted]
    info = results.get("variants", {})
    fp32 = [x for x in labels if x.split()[-1] == "fp32"]
    picked = [x for x in fp32 if info.get(f"{model} {x}", {}).get("auto_choice")][:1] or fp32[:1]
    if choice == "auto":
        bounds = {
            x: max(
                (r["captions_per_s"] for r in results.get("inprocess", []) if r["model"] == model and r["variant"] == x),
                default=None,
            )
            for x in labels
        }
        measured = {x: b for x, b in bounds.items() if b is not None}
        if measured:
            best = max(measured, key=measured.__getitem__)
            base = measured.get(picked[0]) if picked else None
            if best not in picked and (base is None or measured[best] >= BEST_VARIANT_GAIN * base):
                picked.append(best)
    return picked


def run_model(s: Session, spec: ModelSpec, served_paths: dict[str, dict]) -> None:
    """The peers on the chosen variants of one model (`served_paths`: label -> paths)."""
    t0 = time.monotonic()
    chosen = chosen_variants(s.results, spec.name, list(served_paths), s.a.peer_variants)
    for variant in chosen:
        run_peers(s, spec, variant, served_paths[variant])
    s.bar.update(max(0, _n_variants(s.a, spec) - len(chosen)) * len(s.a.peers) * len(s.a.peer_concurrency))
    walls = s.results.setdefault("peer_wall_s", {})
    walls[spec.name] = round(time.monotonic() - t0, 1)  # venv setup included when it ran


def steps(a: argparse.Namespace, spec: ModelSpec) -> int:
    """Progress-bar steps of the peers on one model (two variants at most under auto)."""
    return len(a.peers) * len(a.peer_concurrency) * _n_variants(a, spec)


def _n_variants(a: argparse.Namespace, spec: ModelSpec) -> int:
    return 1 if a.peer_variants == "fp32" else min(2, len(spec.variants))
