"""MLServer peer: the captioner pipeline (bench/peers/pipeline.py) as an MLServer custom
runtime named `captioner`, speaking the V2 inference protocol over gRPC like Triton, so
the Triton stack's own request (IMAGE: BYTES [1, 1], CAPTION back, request parameters
such as max_length) reaches it unchanged.

    .peers/mlserver/bin/python -m bench.peers.mlserver_server --spec peer.json --port 8080 --grpc-port 8081

Sized for 2 cores (the bench's machine): `parallel_workers=2` inference processes, each
running its engines with 1 intra-op thread, so two batches run at once on the two cores;
the main process serves gRPC and forms the batches. Batching: MLServer's adaptive
batching with `max_batch_size` the Triton stack's (32) and `max_batch_time` 1 ms: MLServer
turns batching off at 0 (its docs: any value > 0 enables it), and a batch waits at most
that long for company. Metrics are off (no request uses them).

Adaptive batching merges the requests of a batch into one InferenceRequest whose
request parameters are those of the last request (MLServer's merge): requests with
different decoding parameters in one batch would all decode with one set. The bench
sends the same parameters with every request. A rejected image is answered in-band: an
empty CAPTION and its reason in the ERROR output (one response per batch is split back
per request, so one request cannot fail alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from captioner.serving import Rejected
from captioner.serving.params import ACCEPTED

MODEL_NAME = "captioner"
DEFAULT_BATCH_TIME_MS = 1.0


class CaptionRuntime(MLModel):
    async def load(self) -> bool:
        from bench.peers.pipeline import PeerSpec, Pipeline

        extra = self.settings.parameters.extra
        self.pipe = Pipeline(
            PeerSpec.read(extra["spec"]), threads=int(extra["threads"]), batch_log_dir=extra.get("batch_log_dir")
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = next(i for i in payload.inputs if i.name == "IMAGE")
        # tritonclient sends BYTES as raw_input_contents; MLServer unpacks them into
        # `data`, one bytes element per image (NumpyCodec would read them as characters).
        data = [bytes(b) for b in images.data.root]
        if len(data) != int(np.prod(images.shape)):
            raise ValueError(f"IMAGE: shape {images.shape} but {len(data)} elements")
        given = payload.parameters.model_dump() if payload.parameters else {}
        params = {k: v for k, v in given.items() if k in ACCEPTED} or None
        out = self.pipe(data, [params] * len(data))
        captions = np.array([[b"" if isinstance(o, Rejected) else o.encode()] for o in out], dtype=np.object_)
        errors = np.array(
            [[f"{o.reason}: {o.message}".encode() if isinstance(o, Rejected) else b""] for o in out], dtype=np.object_
        )
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("CAPTION", captions), NumpyCodec.encode_output("ERROR", errors)],
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers.mlserver_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="PeerSpec JSON written by the bench")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="REST port (MLServer always opens one; unused)")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="parallel_workers (inference processes)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per engine in each worker")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=DEFAULT_BATCH_TIME_MS,
        help="max_batch_time in ms (> 0: MLServer does not batch at 0)",
    )
    p.add_argument("--batch-log-dir", default=None, help="where each worker logs its batch sizes")
    a = p.parse_args(argv)
    if a.batch_wait_ms <= 0:
        p.error(f"--batch-wait-ms must be > 0 (MLServer's adaptive batching is off at 0), got {a.batch_wait_ms:g}")
    return a


def settings(a: argparse.Namespace):
    from mlserver.settings import ModelParameters, ModelSettings, Settings

    server = Settings(
        host=a.host,
        http_port=a.port,
        grpc_port=a.grpc_port,
        parallel_workers=a.workers,
        metrics_endpoint=None,
        debug=False,
        load_models_at_startup=False,
        model_repository_root=tempfile.mkdtemp(prefix="mlserver-peer-"),
    )
    runtime = f"{__spec__.name if __spec__ else __name__}.CaptionRuntime"  # importable by the pool's workers
    model = ModelSettings(
        name=MODEL_NAME,
        implementation=runtime,
        max_batch_size=a.max_batch_size,
        max_batch_time=a.batch_wait_ms / 1e3,
        parameters=ModelParameters(
            extra={"spec": str(Path(a.spec).resolve()), "threads": a.threads, "batch_log_dir": a.batch_log_dir}
        ),
    )
    return server, model


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from mlserver import MLServer

    server, model = settings(a)
    print(
        json.dumps(
            {
                "parallel_workers": server.parallel_workers,
                "max_batch_size": model.max_batch_size,
                "max_batch_time": model.max_batch_time,
            }
        ),
        flush=True,
    )

    async def serve() -> None:  # MLServer's inference pool starts tasks: build it inside the loop
        await MLServer(server).start([model])

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
