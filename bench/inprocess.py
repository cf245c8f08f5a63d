"""The in-process bound: the served ONNX artifacts, through the same runtime (onnxruntime
or OpenVINO) at the same precision, and the served decode loop in one Python process,
no server, no IPC. Each caption does the work a request does: decode
the image bytes, resize, normalise, run the encoder, greedy-decode with
`captioner.decoding` over `onnx_step`, turn tokens into text. Only the hops are gone,
so a server can approach this figure but should not beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioner.checkpoint import Checkpoint
from captioner.decoding import DecodeParams, decode, onnx_step
from captioner.preprocess import normalize, prepare_bytes
from captioner.serving import runtime as rt

from .loadgen import _CpuMeter


def ort_session(path: str | Path, threads: int | None, spinning: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning workers fight anything else on the cores: off unless asked for.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def engine(path: str | Path, runtime: str, threads: int | None, spinning: bool = False, inference_precision: str = "fp32"):
    """The graph through the variant's runtime, with the server's engine settings."""
    if runtime == rt.ONNXRUNTIME:
        return ort_session(path, threads, spinning)
    return rt.load(path, rt.EngineSettings(runtime=runtime, threads=threads or 1, inference_precision=inference_precision))


class InProcessCaptioner:
    def __init__(
        self,
        ck: Checkpoint,
        encoder_onnx: str | Path,
        decoder_onnx: str | Path,
        threads: int | None = None,
        max_length: int | None = None,
        spinning: bool = False,
        runtime: str = rt.ONNXRUNTIME,
        step_runtime: str = rt.ONNXRUNTIME,
        inference_precision: str = "fp32",
    ):
        self.cfg, self.vocab = ck.preprocess, ck.vocab
        self.encoder = engine(encoder_onnx, runtime, threads, spinning, inference_precision)
        # A uint8 graph normalises inside (builder/uint8_input.py): the bytes go in as prepared.
        self.normalise = rt.input_dtype(self.encoder, "image") != np.uint8
        self.step = onnx_step(engine(decoder_onnx, step_runtime, threads, spinning))
        self.params = DecodeParams(
            max_length=max_length or ck.args.max_length, length_penalty=ck.decoding.get("length_penalty", 0.7)
        ).validate()
        self.tokens = 0  # generated tokens so far (END excluded), to report mean caption length

    def caption_bytes(self, images: Sequence[bytes]) -> list[str]:
        batch = np.stack([prepare_bytes(b, self.cfg) for b in images])
        h0, c0 = self.encoder.run(["h0", "c0"], {"image": normalize(batch, self.cfg) if self.normalise else batch})
        hyps = decode(self.step, h0, c0, self.vocab.start, self.vocab.end, self.params)
        self.tokens += sum(len(h.tokens) for h in hyps)
        return [self.vocab.decode(h.tokens) for h in hyps]


@dataclass
class InProcessResult:
    batch_size: int
    captions: int
    elapsed_s: float
    captions_per_s: float
    mean_tokens: float  # generated tokens per caption (END excluded)
    cpu: float  # this process's CPU / (elapsed x cores)
    other_cpu: float  # the rest of the machine's busy time, competing with the measurement

    def to_dict(self) -> dict:
        return asdict(self)


def merge_inprocess(results: Sequence[InProcessResult]) -> InProcessResult:
    """Several windows of one batch size, measured apart, as one (captions and seconds summed)."""
    if not results:
        raise ValueError("nothing to merge")
    elapsed = sum(r.elapsed_s for r in results)
    captions = sum(r.captions for r in results)
    return InProcessResult(
        results[0].batch_size,
        captions,
        elapsed,
        captions / elapsed,
        sum(r.mean_tokens * r.captions for r in results) / captions,
        sum(r.cpu * r.elapsed_s for r in results) / elapsed,
        sum(r.other_cpu * r.elapsed_s for r in results) / elapsed,
    )


def measure(
    cap: InProcessCaptioner, images: Sequence[bytes], batch_size: int, duration: float, warmup_batches: int = 1
) -> InProcessResult:
    """Caption batches of `batch_size` images back to back for about `duration` seconds
    (whole batches only, at least one) after `warmup_batches` untimed batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)

    def batch(k: int) -> list[bytes]:
        return [images[(k * batch_size + j) % n] for j in range(batch_size)]

    for k in range(warmup_batches):
        cap.caption_bytes(batch(k))
    cap.tokens = 0
    done, k = 0, 0
    meter = _CpuMeter()
    start = meter.snapshot()
    while True:
        done += len(cap.caption_bytes(batch(k)))
        k += 1
        end = meter.snapshot()
        elapsed = end[0] - start[0]
        if elapsed >= duration:
            break
    cpu, _, other = meter.shares(start, end)
    return InProcessResult(batch_size, done, elapsed, done / elapsed, cap.tokens / done, cpu, other)
