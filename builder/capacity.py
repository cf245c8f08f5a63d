"""How fast each admitting stage runs on the build machine, and the queue policy it implies.

Under overload a request is worth serving only if it can still finish inside its
caller's deadline. Each model that admits new work (preprocess, encoder,
caption_generator) gets a bounded queue, sized so that a full queue drains within a
quarter of the *queue budget* at the rate the whole stack reaches here, and a queue
timeout of the budget: a request that finds the queue full is refused with UNAVAILABLE at once, so the
caller backs off or goes to another replica instead of waiting for an answer it will
throw away. Callers may lower the timeout with their own deadline
(`allow_timeout_override`).

The encoder's batches are capped too: on a few CPU cores one full batch of a large
encoder (InceptionV3) can eat much of a caller's deadline by itself. The cap is the
largest batch that runs in an eighth of the budget at the measured rate (a request
admitted late in its caller's deadline then finishes in time more often); on CPU the
encoder's throughput per image hardly depends on the batch size, so the cap costs
next to nothing.

The timeout is the budget, four times what a full queue needs at the measured ceiling:
it must not fire under load the server can carry, where requests queue for a good part
of a second and still finish inside their deadline (a tighter timeout refused those and
cut goodput: docs/operations.md, load shedding). Requests that would miss their
caller's deadline are refused by that deadline instead, which the client library sends
with every attempt.

decoder_step has no bound: only caption_generator calls it, mid-caption, and refusing
a step would waste the work already done for that caption.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioner.serving import DECODER_STEP, ENCODER, GENERATOR, PREPROCESS

# The encoder gets both cores: with one thread a heavy encoder (seed-inception) caps the
# whole stack at one core (docs/bench.md, "What the defaults are, and why").
DEFAULT_ORT_THREADS = {ENCODER: 2, DECODER_STEP: 1, GENERATOR: 1}
DEFAULT_QUEUE_BUDGET_MS = 1000
# The one max batch size default: every Triton config's max_batch_size, the TensorRT
# profile's max and the batch the build times and checks at (build_engines --max-batch-size).
DEFAULT_MAX_BATCH = 32


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
    """Captions per second, measured in this process on the build machine, with the
    runtimes and input layout the repository will serve."""

    preprocess_per_s: float  # decode, resize (and normalise), one core
    encoder_per_s: float  # at `encoder_batch`, with `threads` threads
    decode_per_s: float  # greedy decoding over the decoder step, one core
    pipeline_per_s: float  # all three sharing the machine's cores: the stack's ceiling
    encoder_batch: int
    threads: int
    cores: int

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


def measure(
    ck,
    encoder_graph: str | Path,
    decoder_graph: str | Path,
    batch: int,
    *,
    encoder_settings=None,
    step_settings=None,
    normalise: bool = True,
    min_seconds: float = 1.0,
) -> Capacity:
    """Time the served work on `batch` shapes-v1 scenes (128 px PNG): preprocessing as the
    preprocess model does it, the encoder graph through its runtime, greedy decoding
    through the decoder step's runtime. Settings are captioner.serving.runtime
    EngineSettings (default: onnxruntime, the repository's encoder threads)."""
    import os

    from captioner.decoding import DecodeParams, decode, onnx_step
    from captioner.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Limits
    from captioner.scenes import encoded_scenes
    from captioner.serving import Rejected
    from captioner.serving import runtime as rt
    from captioner.serving.preprocess import Preprocessor

    from .export import ENCODER_INPUTS, ENCODER_OUTPUTS

    encoder_settings = encoder_settings or rt.EngineSettings(threads=DEFAULT_ORT_THREADS[ENCODER])
    step_settings = step_settings or rt.EngineSettings(threads=1)
    images = [np.array([[data]], dtype=np.object_) for data, _ in encoded_scenes(batch, seed=5)]
    pre = Preprocessor(ck.preprocess, Limits(DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS), normalise=normalise)
    pre_rate = _rate(lambda: pre.run(images), batch, min_seconds)
    prepared = pre.run(images)
    refused = [p for p in prepared if isinstance(p, Rejected)]
    if refused:
        raise RuntimeError(f"preprocess refused a generated scene: {refused[0].message}")
    x = np.concatenate([p for p in prepared if not isinstance(p, Rejected)])
    encoder = rt.load(encoder_graph, encoder_settings)
    feed, outputs = {ENCODER_INPUTS[0]: x}, list(ENCODER_OUTPUTS)
    enc_rate = _rate(lambda: encoder.run(outputs, feed), batch, min_seconds)
    h0, c0 = encoder.run(outputs, feed)
    step = onnx_step(rt.load(decoder_graph, step_settings))
    params = DecodeParams(max_length=ck.args.max_length)
    dec_rate = _rate(lambda: decode(step, h0, c0, ck.vocab.start, ck.vocab.end, params), batch, min_seconds)
    cores = os.cpu_count() or 1
    # CPU seconds per caption, every stage on its own cores' share of the machine.
    per_caption = 1 / pre_rate + encoder_settings.threads / enc_rate + 1 / dec_rate
    return Capacity(
        round(pre_rate, 1),
        round(enc_rate, 1),
        round(dec_rate, 1),
        round(cores / per_caption, 1),
        batch,
        encoder_settings.threads,
        cores,
    )


def policies(
    capacity: Capacity | None,
    max_batch: int,
    budget_ms: int = DEFAULT_QUEUE_BUDGET_MS,
    max_queue_size: int | None = None,
    fused: bool = False,
) -> dict[str, QueuePolicy]:
    """Queue policy per model. Each admitting queue holds what the whole stack serves in
    a quarter of the budget at the measured ceiling: a full queue refuses at once
    (milliseconds), and what it admits is served before the queue timeout (the budget)
    would refuse it after a wait, even when the served rate is a third of the ceiling
    (Triton's hops cost the small model about that much, docs/bench.md). Without a
    measurement (tests, quick assemblies) the queues are bounded at four full batches.
    `max_queue_size` overrides every bound; 0 turns load shedding off (unbounded queues,
    no timeouts, no batch cap: the behaviour before it existed, kept for before/after
    measurements). fused: preprocess runs the encoder too (the fused CPU layout)."""

    if max_queue_size == 0:
        return {m: QueuePolicy() for m in (PREPROCESS, ENCODER, GENERATOR)}
    quarter_s = budget_ms / 4e3
    timeout_us = int(budget_ms * 1000)
    cap = 0
    if capacity is not None:
        fits = int(capacity.encoder_per_s * quarter_s / 2)
        cap = 0 if fits >= max_batch else max(1, fits)
    if max_queue_size is not None:
        size = max_queue_size
    elif capacity is None:
        size = 4 * max_batch
    else:
        size = max(cap or 1, math.ceil(capacity.pipeline_per_s * quarter_s))
    encoder = QueuePolicy(size, timeout_us, cap)
    return {
        PREPROCESS: encoder if fused else QueuePolicy(size, timeout_us),
        ENCODER: encoder,
        GENERATOR: QueuePolicy(size, timeout_us),
    }


def describe(queues: Mapping[str, QueuePolicy], fused: bool = False, whole: bool = False) -> list[str]:
    """One line per model the repository holds (fused: no `encoder` model; preprocess runs
    it; whole: preprocess alone, it runs the encoder and the caption loop too)."""

    out = []
    for model, q in queues.items():
        if (fused or whole) and model == ENCODER or whole and model == GENERATOR:
            continue
        if whole and model == PREPROCESS:
            model = f"{PREPROCESS} (runs the encoder and the caption loop)"
        elif fused and model == PREPROCESS:
            model = f"{PREPROCESS} (runs the encoder)"
        bits = [
            f"max_queue_size {q.max_queue_size or 'unbounded'}",
            f"timeout {q.timeout_us / 1000:g} ms" if q.timeout_us else "no timeout",
        ]
        if q.batch_cap:
            bits.append(f"batches capped at {q.batch_cap}")
        out.append(f"{model}: " + ", ".join(bits))
    return out
