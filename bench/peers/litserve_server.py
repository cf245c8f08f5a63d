"""LitServe peer: the captioner pipeline (bench/peers/pipeline.py) as a LitAPI, batched
across requests by LitServe's own batching loop.

    .peers/litserve/bin/python -m bench.peers.litserve_server --spec peer.json --port 8000
    curl -d '{"image": "<base64 PNG>", "parameters": {"max_length": 20}}' localhost:8000/predict

Sized for 2 cores (the bench's machine): `accelerator="cpu"`, `workers_per_device=2`
inference worker processes, each running its engines with 1 intra-op thread, so two
batches run at once on the two cores; `num_api_servers` left at LitServe's default
(as many uvicorn API processes as inference workers, which its docs recommend).
Batching: the LitAPI's `max_batch_size` (the Triton stack's 32) and `batch_timeout`,
0 s by default: LitServe's own default and the Triton stack's policy (a batch is whatever
queued while the last one ran).

Protocol: LitServe parses a JSON (or form) body before a worker sees it, so the image
travels base64 in JSON: {"image": ..., "parameters": {...}} -> {"caption": ...}. Its
batched loop fails a whole batch on an HTTPException, so a rejected image is answered
in-band with HTTP 200 {"error": reason, "detail": ...}; GET /health is LitServe's own.
"""

from __future__ import annotations

import argparse
import base64
import sys

import litserve as ls

from captioner.serving import Rejected


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers.litserve_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="PeerSpec JSON written by the bench")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="inference worker processes (workers_per_device)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per engine in each worker")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="LitAPI batch_timeout")
    p.add_argument("--batch-log-dir", default=None, help="where each worker logs its batch sizes")
    return p.parse_args(argv)


class CaptionAPI(ls.LitAPI):
    def __init__(self, spec: str, threads: int, batch_log_dir: str | None, **kwargs):
        super().__init__(**kwargs)
        self.spec_path, self.threads, self.batch_log_dir = spec, threads, batch_log_dir

    def setup(self, device):
        from bench.peers.pipeline import PeerSpec, Pipeline

        self.pipe = Pipeline(PeerSpec.read(self.spec_path), threads=self.threads, batch_log_dir=self.batch_log_dir)

    def decode_request(self, request):
        return base64.b64decode(request["image"]), request.get("parameters") or None

    def batch(self, inputs):
        return inputs

    def predict(self, x):
        return self.pipe([b for b, _ in x], [p for _, p in x])

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        if isinstance(output, Rejected):
            return {"error": output.reason, "detail": output.message}
        return {"caption": output}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    api = CaptionAPI(a.spec, a.threads, a.batch_log_dir, max_batch_size=a.max_batch_size, batch_timeout=a.batch_wait_ms / 1e3)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=a.workers, timeout=300)
    server.run(host=a.host, port=a.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
