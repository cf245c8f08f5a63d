"""Build-time choice of the CPU runtime (`make build-engines RUNTIME=auto|onnxruntime|openvino`)
and the OpenVINO compiled-model cache of an assembled repository.

auto times the served encoder graph (at the build's batch sizes, with the encoder's
thread count) and the decoder step (one thread, a batch of live sequences) through
each runtime that runs here, briefly, and keeps the faster per graph; the figures go
into the build manifest. The decision logic is captioner.serving.runtime.choose."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.checkpoint import Checkpoint
from captioner.serving import runtime as rt

from .export import ENCODER_INPUTS, STEP_INPUTS

STEP_ROWS = 32  # live sequences in one decoder step under load (several images x their beams)
SECONDS_PER_TIMING = 0.4
# OpenVINO must beat onnxruntime by this factor to be chosen: brief timings on a shared
# machine wobble by a few percent, and onnxruntime is the runtime with fewer moving parts.
MARGIN = 1.05
# The fused layout (decode + encoder in one Python model) for encoders at least this fast
# at the build's max batch, through the chosen runtime. Fast encoders fuse: one Python
# hop fewer costs less CPU per caption. Slow encoders fuse too: decoding overlapping a
# slow encoder saves little, while under overload the fused model's queue is the only one
# in front of any work, so a refused request costs no Python execution and goodput holds
# up better (docs/bench.md, "What the defaults are, and why").
FUSE_ABOVE_IMAGES_PER_S = 0.0
# The whole layout (decode, encoder and the caption loop in one Python model) for encoders
# at least this fast: with ~2 ms or less of encoder per image the second Python hop and
# batcher of the fused layout cost more than the caption loop overlapping the encoder
# saves (docs/bench.md, "One Python model for small encoders"). A slow encoder
# (seed-inception, 40-75 img/s here) keeps fused: there the loop runs beside the encoder.
WHOLE_ABOVE_IMAGES_PER_S = 500.0


@dataclass
class RuntimeReport:
    encoder: rt.Choice
    decoder_step: rt.Choice
    inference_precision: str
    encoder_rates: dict[str, dict[int, float | None]] = field(default_factory=dict)  # runtime -> batch -> rows/s
    notes: list[str] = field(default_factory=list)

    def runtimes(self) -> dict[str, str]:
        """builder.repository.assemble's `runtimes` argument."""
        from .repository import DECODER_STEP, ENCODER, GENERATOR

        return {ENCODER: self.encoder.runtime, DECODER_STEP: self.decoder_step.runtime, GENERATOR: self.decoder_step.runtime}

    def lines(self) -> list[str]:
        out = []
        for name, c in (("encoder", self.encoder), ("decoder step", self.decoder_step)):
            figures = ", ".join(f"{k} {v:.1f}/s" for k, v in c.rows_per_s.items()) or "not measured"
            out.append(f"{name}: {c.runtime} ({c.reason}; {figures})")
        return out + self.notes

    def to_dict(self) -> dict:
        return {
            "encoder": self.encoder.to_dict(),
            "decoder_step": self.decoder_step.to_dict(),
            "inference_precision": self.inference_precision,
            "encoder_rows_per_s": {k: {str(b): v for b, v in d.items()} for k, d in self.encoder_rates.items()},
            "notes": self.notes,
        }


def encoder_feed(ck: Checkpoint, onnx_path: Path, batch: int) -> dict[str, np.ndarray]:
    """Realistic input for timing: prepared scenes, float or uint8 as the graph takes."""
    import onnx

    from captioner.preprocess import normalize

    from . import parity

    images, _ = parity.scene_batch(min(batch, 8), ck.preprocess, seed=11)
    images = np.concatenate([images] * (batch // len(images) + 1))[:batch]
    graph_input = next(i for i in onnx.load(str(onnx_path), load_external_data=False).graph.input if i.name == ENCODER_INPUTS[0])
    if graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
        return {ENCODER_INPUTS[0]: np.ascontiguousarray(images)}
    return {ENCODER_INPUTS[0]: normalize(images, ck.preprocess)}


def step_feed(ck: Checkpoint, rows: int = STEP_ROWS) -> dict[str, np.ndarray]:
    u = ck.args.lstm_units
    rng = np.random.default_rng(0)
    return {
        STEP_INPUTS[0]: rng.integers(0, len(ck.vocab), rows).astype(np.int64),
        STEP_INPUTS[1]: rng.standard_normal((rows, u)).astype(np.float32) * 0.1,
        STEP_INPUTS[2]: rng.standard_normal((rows, u)).astype(np.float32) * 0.1,
    }


def _rate(path: Path, settings: rt.EngineSettings, feed: dict, rows: int, seconds: float) -> float | None:
    try:
        engine = rt.load(path, settings)
    except rt.RuntimeUnavailable:
        return None
    return rt.throughput(engine, feed, rows, min_seconds=seconds)


def candidates(requested: str, inference_precision: str) -> list[str]:
    """Runtimes to time: the requested one, or both for auto; bf16 inference precision
    exists only in OpenVINO."""
    if inference_precision == "bf16":
        return [rt.OPENVINO]
    return list(rt.RUNTIMES) if requested == "auto" else [requested]


def choose_runtimes(
    ck: Checkpoint,
    encoder_onnx: Path,
    decoder_onnx: Path,
    requested: str,
    inference_precision: str,
    encoder_threads: int,
    batch_sizes: Sequence[int],
    seconds: float = SECONDS_PER_TIMING,
    log: Callable[[str], None] = print,
) -> RuntimeReport:
    """Time what has to be timed and choose (the requested runtime is kept without timing)."""
    enc_rates: dict[str, dict[int, float | None]] = {}
    notes: list[str] = []
    # An explicit runtime is timed too: the layout choice (`auto_layout`) needs its rate.
    if True:
        for name in candidates(requested, inference_precision):
            settings = rt.EngineSettings(runtime=name, threads=encoder_threads, inference_precision=inference_precision)
            enc_rates[name] = {
                b: _rate(encoder_onnx, settings, encoder_feed(ck, encoder_onnx, b), b, seconds) for b in batch_sizes
            }
            log(
                f"encoder {name} ({inference_precision}, {encoder_threads} threads): "
                + ", ".join(f"batch {b} {'n/a' if v is None else f'{v:.1f} img/s'}" for b, v in enc_rates[name].items())
            )
    # The decision goes by the largest batch: under load the encoder sees full batches.
    top = max(batch_sizes)
    if inference_precision == "bf16":
        enc_choice = rt.Choice(
            rt.OPENVINO,
            "bf16 inference precision is OpenVINO's",
            {k: r for k, v in enc_rates.items() if (r := v[top]) is not None},
        )
    else:
        enc_choice = rt.choose(requested, {k: v[top] for k, v in enc_rates.items()}, margin=MARGIN)
    step_rates: dict[str, float | None] = {}
    if requested == "auto":
        for name in rt.RUNTIMES:
            step_rates[name] = _rate(decoder_onnx, rt.EngineSettings(runtime=name, threads=1), step_feed(ck), STEP_ROWS, seconds)
        log(
            f"decoder step (1 thread, {STEP_ROWS} rows): "
            + ", ".join(f"{k} {'n/a' if v is None else f'{v:.0f} rows/s'}" for k, v in step_rates.items())
        )
    step_choice = rt.choose(requested, step_rates, margin=MARGIN)
    return RuntimeReport(enc_choice, step_choice, inference_precision, enc_rates, notes)


def auto_layout(
    report: RuntimeReport, fuse_above: float = FUSE_ABOVE_IMAGES_PER_S, whole_above: float = WHOLE_ABOVE_IMAGES_PER_S
) -> tuple[str, str]:
    """(layout, why) for LAYOUT=auto, from the chosen encoder runtime's measured rate."""
    rate = report.encoder.rows_per_s.get(report.encoder.runtime)
    layout = layout_for_rate(rate, fuse_above, whole_above)
    if rate is None:
        return layout, "encoder rate not measured: split"
    if layout == "whole":
        return layout, f"encoder {rate:.0f} img/s >= {whole_above:.0f}: whole (decode, encoder and caption loop in one model)"
    if layout == "fused":
        return (
            layout,
            f"encoder {rate:.0f} img/s < {whole_above:.0f} (whole), >= {fuse_above:.0f}: fused (decode + encoder in one model)",
        )
    return layout, f"encoder {rate:.0f} img/s < {fuse_above:.0f}: split (encoder in its own model)"


def layout_for_rate(
    rate: float | None, fuse_above: float = FUSE_ABOVE_IMAGES_PER_S, whole_above: float = WHOLE_ABOVE_IMAGES_PER_S
) -> str:
    """LAYOUT=auto's rule on the encoder's images/s at the max batch (None: not measured)."""
    if rate is None or rate < fuse_above:
        return "split"
    return "whole" if rate >= whole_above else "fused"


def warm_cache(repo_dir: str | Path, version: int = 1) -> list[str]:
    """Compile every OpenVINO model of an assembled repository once, with the settings
    and at the paths the server will use, so that its compiled-model cache is filled
    and a server start loads instead of compiling. Returns the models compiled.
    version: the version directory (a versioned repository, builder/versions.py, warms the
    version it added; the cache is keyed by the graph's content, so a blob compiled here
    is found wherever the repository is mounted)."""
    from captioner.serving.versions import PARAMETERS_FILE

    from .repository import DECODER_STEP, ENCODER, GENERATOR, PREPROCESS

    repo_dir = Path(repo_dir)
    warmed = []
    for name, graph in (
        (PREPROCESS, "model.onnx"),
        (ENCODER, "model.onnx"),
        (DECODER_STEP, "model.onnx"),
        (GENERATOR, "decoder_step.onnx"),
    ):
        cfg_path = repo_dir / name / "config.pbtxt"
        if not cfg_path.is_file():
            continue
        cfg = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        here = repo_dir / name / str(version)
        if (here / PARAMETERS_FILE).is_file():  # the version's own parameters (captioner.serving.versions)
            params.update({k: str(v) for k, v in json.loads((here / PARAMETERS_FILE).read_text()).items()})
        if cfg.backend != "python" or params.get("runtime") != rt.OPENVINO or not (here / graph).is_file():
            continue
        rt.load(here / graph, rt.EngineSettings.from_config(params, here))
        warmed.append(name)
    return warmed
