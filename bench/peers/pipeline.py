"""What every peer server runs per batch: the Triton stack's fused CPU pipeline in one
call, from the same Triton-free pieces its Python models call.

- preprocessing and request checks: captioner.serving.preprocess.Preprocessor (the
  `preprocess` model's code), decode + encoder in one run: ImageEncoder (the fused
  layout's `preprocess` model);
- the encoder and decoder-step graphs the build made, through captioner.serving.runtime
  with the variant's runtime and precision hint (what the Triton models load);
- the batched greedy decode loop: captioner.serving.generator.generate (the
  `caption_generator` model's code, captioner.decoding underneath).

The bench (project venv, torch available) writes a PeerSpec as JSON from the checkpoint
and the variant's built paths; a peer (its own venv: numpy, Pillow and the runtimes, no
torch) reads it. Nothing here imports a peer framework.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.decoding import onnx_step
from captioner.preprocess import Limits, PreprocessConfig
from captioner.serving import Rejected
from captioner.serving import runtime as rt
from captioner.serving.generator import GenRequest, generate
from captioner.serving.params import DecodeDefaults, ParamError, decode_params
from captioner.serving.preprocess import ImageEncoder, Preprocessor
from captioner.vocab import Vocabulary


@dataclass(frozen=True)
class PeerSpec:
    """One variant of one model, as a peer serves it."""

    encoder: str  # ONNX graph (uint8 or float32 image input)
    decoder: str  # decoder-step ONNX graph
    runtime: str  # the encoder's runtime
    step_runtime: str  # the decoder step's runtime
    inference_precision: str  # "fp32" or OpenVINO's "bf16" hint (encoder only, as in Triton)
    vocab: list[str]
    preprocess: dict
    max_length: int  # the checkpoint's default; a request may set its own
    length_penalty: float
    max_batch_size: int
    cache_dir: str | None = None  # OpenVINO compiled-model cache

    def __post_init__(self):
        for name in ("runtime", "step_runtime"):
            if getattr(self, name) not in rt.RUNTIMES:
                raise ValueError(f"{name} must be one of {rt.RUNTIMES}, got {getattr(self, name)!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: str | Path) -> PeerSpec:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"peer spec {path}: {e}") from None


class Pipeline:
    """Encoded images (one per request) and their request parameters -> per request a
    caption or a Rejected naming what was wrong with it. Batches of any size up to the
    framework's max_batch_size; the engines run with `threads` intra-op threads."""

    def __init__(self, spec: PeerSpec, threads: int = 1, batch_log_dir: str | Path | None = None):
        enc_settings = rt.EngineSettings(
            runtime=spec.runtime, threads=threads, inference_precision=spec.inference_precision, cache_dir=spec.cache_dir
        )
        engine = rt.load(spec.encoder, enc_settings)
        self.defaults = DecodeDefaults(spec.max_length, spec.length_penalty)
        pre = Preprocessor(
            cfg=PreprocessConfig.from_dict(spec.preprocess),
            limits=Limits(),
            defaults=self.defaults,
            normalise=rt.input_dtype(engine, "image") != np.uint8,
        )
        self.encoder = ImageEncoder(pre, engine)
        step = rt.load(spec.decoder, rt.EngineSettings(runtime=spec.step_runtime, threads=threads, cache_dir=spec.cache_dir))
        self.step = onnx_step(step)
        self.vocab = Vocabulary(spec.vocab)
        # One line per batch ("rows compute_ns"): what the framework's batcher formed, read by
        # the bench between load levels (bench/peers/clients.py). One file per process.
        self._log = None
        if batch_log_dir is not None:
            Path(batch_log_dir).mkdir(parents=True, exist_ok=True)
            self._log = open(Path(batch_log_dir) / f"batches-{os.getpid()}.log", "a", buffering=1)

    def __call__(
        self, images: Sequence[bytes], parameters: Sequence[Mapping[str, Any] | None] | None = None
    ) -> list[str | Rejected]:
        parameters = list(parameters) if parameters is not None else [None] * len(images)
        if len(parameters) != len(images):
            raise ValueError(f"{len(images)} images but {len(parameters)} parameter maps")
        t0 = time.perf_counter_ns()
        tensors = [np.array([[img]], dtype=np.object_) for img in images]
        encoded = self.encoder.run(tensors, parameters)
        out: list[str | Rejected | None] = [None] * len(images)
        requests, where = [], []
        for i, e in enumerate(encoded):
            if isinstance(e, Rejected):
                out[i] = e
                continue
            try:
                params = decode_params(parameters[i], self.defaults)
            except ParamError as err:  # the Preprocessor checked them already; kept for direct callers
                out[i] = Rejected("bad_parameter", str(err))
                continue
            h0, c0 = e  # [1, U] each: one image per request
            requests.append(GenRequest(h0, c0, params))
            where.append(i)
        if requests:
            for i, caps in zip(where, generate(self.step, self.vocab, requests)):
                out[i] = caps.texts[0]
        if self._log is not None:
            self._log.write(f"{len(images)} {time.perf_counter_ns() - t0}\n")
        return out  # type: ignore[return-value]


def read_batch_logs(batch_log_dir: str | Path) -> tuple[int, int, int]:
    """Totals over every process's batch log: (batches, rows, compute ns)."""
    batches = rows = ns = 0
    for f in Path(batch_log_dir).glob("batches-*.log"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line being written is skipped until complete
                batches, rows, ns = batches + 1, rows + int(parts[0]), ns + int(parts[1])
    return batches, rows, ns
