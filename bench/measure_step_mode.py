"""Should caption_generator run the decoder step in its own process (onnxruntime) or
call the `decoder_step` model through BLS? Serve the same checkpoint both ways and
measure; the README quotes the table this prints.

    python -m bench.measure_step_mode --model runs/default [--out reports/step_mode.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from client.wire import image_input


def _scene_pngs(n: int, seed: int) -> list[bytes]:
    from captioner.scenes import encoded_scenes

    return [data for data, _ in encoded_scenes(n, seed)]


async def _load(url: str, images: list[bytes], concurrency: int, requests: int, beam: int) -> dict:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    tokens = 0
    next_i = 0

    async def worker():
        nonlocal next_i, tokens
        while next_i < requests:
            data = images[next_i % len(images)]
            next_i += 1
            inp = image_input(data, grpcclient)
            t0 = time.perf_counter()
            result = await client.infer("captioner", [inp], parameters={"beam_size": beam})
            latencies.append(time.perf_counter() - t0)
            tokens += len(result.as_numpy("CAPTION")[0, 0].split())

    for _ in range(3):  # warm-up: first calls load sessions and allocate
        await worker_once(client, images[0], beam)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    lat = sorted(latencies)
    return {
        "rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "words": tokens / len(lat),
    }


async def worker_once(client, data: bytes, beam: int) -> None:
    await client.infer("captioner", [image_input(data)], parameters={"beam_size": beam})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("CAPTIONER_MODEL"), help="checkpoint dir (default: the shipped model)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=300, help="requests per cell (concurrency 1 runs a third of them)")
    p.add_argument("--rounds", type=int, default=2, help="alternate the modes this many times; the best round counts")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)

    from builder.export import export_decoder_step, export_encoder
    from builder.repository import assemble
    from captioner import checkpoint
    from launcher.tritonserver import TritonServer

    ck = checkpoint.load(a.model)
    images = _scene_pngs(64, seed=11)
    levels = [int(x) for x in a.concurrency.split(",")]
    best: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory(prefix="step-mode-") as tmp_name:
        tmp = Path(tmp_name)
        art = {
            "encoder_onnx": export_encoder(ck, tmp / "encoder.onnx"),
            "decoder_onnx": export_decoder_step(ck, tmp / "step.onnx"),
        }
        repos = {m: assemble(ck, tmp / m, "cpu", art, step_mode=m) for m in ("inprocess", "bls")}
        for _ in range(a.rounds):
            for mode, repo in repos.items():
                with TritonServer(repo) as server:
                    for beam in (1, 3):
                        for c in levels:
                            n = a.requests // 3 if c == 1 else a.requests
                            r = asyncio.run(_load(server.grpc_url, images, c, n, beam))
                            key = (mode, beam, c)
                            if key not in best or r["rps"] > best[key]["rps"]:
                                best[key] = r
                            print(mode, f"beam={beam}", f"c={c}", {k: round(v, 1) for k, v in r.items()}, flush=True)
    lines = [
        f"Checkpoint {ck.path} ({ck.args.backbone}), CPU repository, one instance per model, 1 onnxruntime thread;",
        f"best of {a.rounds} alternating rounds; mean caption length {np.mean([v['words'] for v in best.values()]):.1f} words.",
        "",
        "| step | beam | concurrency | req/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (mode, beam, c), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        lines.append(f"| {mode} | {beam} | {c} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
