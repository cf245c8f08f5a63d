"""How fast each admitting stage runs on the build machine, and the queue policy it implies.

Under overload a request is worth serving only if it can still finish inside its
caller's deadline. Each model that admits new work (preprocess, encoder,
caption_generator) gets a bounded queue, sized so that a full queue drains within the
*queue budget* at the rate measured here, and a queue timeout of the same budget:
past it the request is refused with UNAVAILABLE, fast, so the caller backs off or goes
to another replica instead of waiting for an answer it will throw away. Callers may
lower the timeout with their own deadline (`allow_timeout_override`).

The encoder's batches are capped too: one batch of 32 InceptionV3 images takes about a
second on 2 cores, which alone eats half of a 2 s deadline. The cap is the largest
batch that runs in half the budget at the measured rate; on CPU, onnxruntime's
throughput per image hardly depends on the batch size, so the cap costs nothing.

decoder_step has no bound: only caption_generator calls it, mid-caption, and refusing
a step would waste the work already done for that caption.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

DEFAULT_QUEUE_BUDGET_MS = 500


@dataclass(frozen=True)
class QueuePolicy:
    """`dynamic_batching.default_queue_policy` of one model (0 = no bound / no timeout),
    plus the batch cap (`preferred_batch_size`; 0 = max_batch_size)."""

    max_queue_size: int = 0
    timeout_us: int = 0
    batch_cap: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Capacity:
    """Images per second, measured in this process on the build machine."""

    preprocess_per_s: float
    encoder_per_s: float
    encoder_batch: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(fn, n_items: int, min_seconds: float) -> float:
    fn()  # warm: allocations, lazy initialisation
    runs, t0 = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and runs >= 2:
            return runs * n_items / elapsed


def measure(ck, encoder_onnx: str | Path, threads: int, batch: int, min_seconds: float = 1.0) -> Capacity:
    """Preprocess (decode, resize, normalise 128 px PNG scenes, one core) and encoder
    (onnxruntime with the threads the repository gives it, at `batch`) throughput."""
    from captioner.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Limits
    from captioner.scenes import encoded_scenes
    from captioner.serving.ort import OrtSettings, session
    from captioner.serving.preprocess import Preprocessor

    images = [np.array([[data]], dtype=np.object_) for data, _ in encoded_scenes(batch, seed=5)]
    pre = Preprocessor(ck.preprocess, Limits(DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS))
    pre_rate = _rate(lambda: pre.run(images), len(images), min_seconds)
    x = np.concatenate(pre.run(images))
    sess = session(encoder_onnx, OrtSettings(intra_op_threads=threads))
    name = sess.get_inputs()[0].name
    enc_rate = _rate(lambda: sess.run(None, {name: x}), len(x), min_seconds)
    return Capacity(round(pre_rate, 1), round(enc_rate, 1), batch, threads)


def policies(capacity: Capacity | None, max_batch: int, budget_ms: int = DEFAULT_QUEUE_BUDGET_MS,
             max_queue_size: int | None = None) -> dict[str, QueuePolicy]:
    """Queue policy per model. Without a measurement (tests, quick assemblies) the queues
    are bounded at four full batches. `max_queue_size` overrides every bound; 0 turns
    load shedding off (unbounded queues, no timeouts, no batch cap: the behaviour before
    it existed, kept for before/after measurements)."""
    from .repository import ENCODER, GENERATOR, PREPROCESS

    if max_queue_size == 0:
        return {m: QueuePolicy() for m in (PREPROCESS, ENCODER, GENERATOR)}
    budget_s = budget_ms / 1e3
    timeout_us = int(budget_ms * 1000)

    def size(rate: float | None) -> int:
        if max_queue_size is not None:
            return max_queue_size
        if rate is None:
            return 4 * max_batch
        return max(max_batch, math.ceil(rate * budget_s))

    pre = capacity.preprocess_per_s if capacity else None
    enc = capacity.encoder_per_s if capacity else None
    cap = 0
    if enc is not None:
        fits = int(enc * budget_s / 2)
        cap = 0 if fits >= max_batch else max(1, fits)
    return {
        PREPROCESS: QueuePolicy(size(pre), timeout_us),
        ENCODER: QueuePolicy(size(enc), timeout_us, cap),
        # Its rate is the decode loop's, far above the encoder's: sized like the encoder.
        GENERATOR: QueuePolicy(size(enc), timeout_us),
    }


def describe(queues: Mapping[str, QueuePolicy]) -> list[str]:
    out = []
    for model, q in queues.items():
        bits = [f"max_queue_size {q.max_queue_size or 'unbounded'}",
                f"timeout {q.timeout_us / 1000:g} ms" if q.timeout_us else "no timeout"]
        if q.batch_cap:
            bits.append(f"batches capped at {q.batch_cap}")
        out.append(f"{model}: " + ", ".join(bits))
    return out
