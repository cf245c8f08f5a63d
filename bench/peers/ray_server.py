"""Ray Serve peer: the captioner pipeline (bench/peers/pipeline.py) in a Serve deployment
behind Ray's HTTP proxy, batched across requests by `@serve.batch`.

    .peers/ray/bin/python -m bench.peers.ray_server --spec peer.json --port 8000
    curl --data-binary @scene.png 'localhost:8000/caption?max_length=20'

Sized for 2 cores (the bench's machine): a local Ray with num_cpus=2, two replicas of
one CPU each (each replica's engines run 1 intra-op thread), so that two batches run at
once on the two cores; the Serve controller and HTTP proxy take no CPU reservation
(Ray's defaults) and share the same cores. Batching: `@serve.batch(max_batch_size,
batch_wait_timeout_s)` per replica with max_batch_size the Triton stack's (32) and
max_ongoing_requests at twice that, as Ray's batching guide asks (a replica only batches
the requests it was handed). The wait defaults to 0 s, the Triton stack's policy (a
batch is whatever queued while the last one ran): Ray's own 10 ms default would add 10
ms to every caption at one client. The dashboard is off and the object store is the
minimum Ray accepts: neither is used by a request.

Routes: POST /caption (raw image bytes; query parameters = the request parameters,
e.g. max_length) -> {"caption": ...}, or HTTP 400 {"error": reason, "detail": ...};
GET /health -> {"ok": true} once a replica answers.
"""

from __future__ import annotations

import argparse
import os
import sys

from captioner.signals import StopFlag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers.ray_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="PeerSpec JSON written by the bench")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="Serve replicas (one CPU each)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per engine in each replica")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument("--batch-log-dir", default=None, help="where each replica logs its batch sizes")
    return p.parse_args(argv)


def build_app(a: argparse.Namespace):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from captioner.serving import Rejected

    class Captioner:
        def __init__(self):
            from bench.peers.pipeline import PeerSpec, Pipeline

            self.pipe = Pipeline(PeerSpec.read(a.spec), threads=a.threads, batch_log_dir=a.batch_log_dir)

        @serve.batch(max_batch_size=a.max_batch_size, batch_wait_timeout_s=a.batch_wait_ms / 1e3)
        async def caption(self, items: list[tuple[bytes, dict]]) -> list:
            return self.pipe([b for b, _ in items], [p for _, p in items])

        async def __call__(self, request: Request):
            if request.method == "GET":
                return JSONResponse({"ok": True})
            out = await self.caption((await request.body(), dict(request.query_params)))
            if isinstance(out, Rejected):
                return JSONResponse({"error": out.reason, "detail": out.message}, status_code=400)
            return JSONResponse({"caption": out})

    # serve.deployment applied as a call, not as a decorator: mypy types a decorated class
    # as the class itself, which has no bind().
    deployment = serve.deployment(
        num_replicas=a.workers, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * a.max_batch_size
    )(Captioner)
    return deployment.bind()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import ray
    from ray import serve

    ray.init(
        num_cpus=a.workers,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
        log_to_driver=False,
    )
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(build_app(a), name="captioner", route_prefix="/")
    stop = StopFlag().install()
    print(f"ray serve peer on http://{a.host}:{a.port}", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
