"""The Triton stack of the bench: the built graphs assembled into a repository with the
bench's batching, instance and thread settings, served by tritonserver, checked against
the in-process captions, then driven through the same load levels as the naive server."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path

from . import photos
from .loadgen import TritonClient
from .stacks import Session, captioner, run_levels
from .variants import ModelSpec


def repo_summary(repo: Path) -> str:
    """What the served repository actually says: instances, batching, ORT threads."""
    from builder.repository import check_repository

    parts = []
    for name, cfg in check_repository(repo).items():
        if cfg.platform == "ensemble":
            parts.append(f"layout {cfg.parameters['layout'].string_value if 'layout' in cfg.parameters else 'split'}")
            continue
        p = {k: v.string_value for k, v in cfg.parameters.items()}
        db = cfg.dynamic_batching
        bits = [
            f"{sum(g.count for g in cfg.instance_group)} inst",
            f"max batch {cfg.max_batch_size}",
            f"delay {db.max_queue_delay_microseconds} us",
        ]
        if db.preferred_batch_size:
            bits.append(f"preferred {list(db.preferred_batch_size)}")
        if "intra_op_threads" in p:
            bits.append(f"threads {p['intra_op_threads']}")
        if "step_mode" in p:
            bits.append(f"step {p['step_mode']}")
        if "runtime" in p:
            bits.append(p["runtime"] + (f" {p['inference_precision']}" if p.get("inference_precision", "fp32") != "fp32" else ""))
        parts.append(f"{name} ({', '.join(bits)})")
    return "; ".join(parts)


def triton_repo(spec: ModelSpec, variant: str, paths: dict, work: Path, a: argparse.Namespace) -> Path:
    """The repository the bench serves: the built graphs, assembled with the bench's
    batching, instance and thread settings (builder.repository's own parameters)."""
    from builder.repository import DECODER_STEP, ENCODER, GENERATOR, assemble
    from builder.runtime_choice import warm_cache
    from captioner import checkpoint as ckpt_mod

    from .photos import decode_for

    ck = ckpt_mod.load(spec.checkpoint)
    ck.preprocess = replace(ck.preprocess, decode=decode_for(a, paths, ck.preprocess.decode))
    repo = assemble(
        ck,
        work / spec.name / f"repo-{variant.replace(' ', '-')}",
        "cpu",
        {"encoder_onnx": paths["encoder"], "decoder_onnx": paths["decoder"]},
        max_batch_size=a.max_batch_size,
        precision=variant.split()[-1],
        instance_counts=a.instances or None,
        ort_threads=a.ort_threads or None,
        step_mode=a.step_mode,
        runtimes={ENCODER: paths["runtime"], DECODER_STEP: paths["step_runtime"], GENERATOR: paths["step_runtime"]},
        inference_precision=paths["inference_precision"],
        encoder_input=a.encoder_input,
        layout=paths["layout"],
        **({"queue_delay_us": a.queue_delay_us} if a.queue_delay_us >= 0 else {}),
    )
    warm_cache(repo)  # what the build does: a server start must not compile
    return repo


def read_decode(repo: Path) -> str:
    """The decode path the repository's preprocess model serves."""
    return json.loads((repo / "preprocess" / "1" / "preprocess.json").read_text()).get("decode", "exact")


def run_triton(s: Session, spec: ModelSpec, variant: str, paths: dict) -> None:
    from launcher.tritonserver import TritonServer

    repo = triton_repo(spec, variant, paths, s.work, s.a)
    s.results["config"].setdefault("triton", {})[f"{spec.name} {variant}"] = repo_summary(repo)
    log = s.out / f"triton-{spec.name}-{variant}.log"
    log.unlink(missing_ok=True)
    with TritonServer(repo, log_file=log) as server:
        assert server.process is not None  # started by `with`
        s.note(parity(spec, variant, paths, server.grpc_url, s.images))
        make = lambda: TritonClient(server.grpc_url, s.images, parameters=spec.params)  # noqa: E731
        run_levels(s, spec, "triton", variant, make, [server.process.pid])
        if photos.wanted(s.a, variant, paths):  # the photo workloads on the same server
            photos.run_triton(s, spec, variant, server.grpc_url, [server.process.pid], read_decode(repo))


def parity(spec: ModelSpec, variant: str, paths: dict, url: str, images: list[bytes], n: int = 8) -> str:
    """The server must be doing the in-process work: same captions for a few images."""
    expected = captioner(spec, paths, threads=1).caption_bytes(images[:n])

    async def go():
        async with TritonClient(url, images[:n], parameters=spec.params) as c:
            return [await c(i) for i in range(n)]

    same = sum(x == y for x, y in zip(asyncio.run(go()), expected))
    return f"{spec.name} {variant}: Triton and in-process captions agree on {same}/{n} images"
