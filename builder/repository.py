"""Checkpoint + exported artifacts -> a Triton model repository.

Models (ensemble `captioner` = preprocess -> encoder -> caption_generator):
  preprocess         Python: Pillow decode + captioner.preprocess, request checks
  encoder            CPU: Python + onnxruntime or OpenVINO;  GPU: tensorrt_plan
  decoder_step       CPU: Python + onnxruntime or OpenVINO;  GPU: onnxruntime_onnx
  caption_generator  Python: batched greedy / beam / sampling over the decoder step

The configs come from builder/model_configs.py; the finished repository is checked by
builder/repository_check.py, which the launcher also uses to decide whether to rebuild.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx
from tritonclient.grpc import model_config_pb2 as mc

from captioner.checkpoint import Checkpoint
from captioner.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from captioner.serving import DECODER_STEP, ENCODER, ENSEMBLE, GENERATOR, PRECISIONS, PREPROCESS
from captioner.serving.generator import STEP_MODES

from .capacity import DEFAULT_MAX_BATCH, DEFAULT_ORT_THREADS, QueuePolicy, policies
from .export import ENCODER_INPUTS, ENCODER_OUTPUTS, STEP_INPUTS, STEP_OUTPUTS
from .model_configs import WARMUP_IMAGE, build_configs, write_config
from .repository_check import MODELS, RepositoryError, check_repository, is_fused, is_whole, recorded_checkpoint

# What callers import from here (the builder's steps, bench/, tests, the k8s manifests' test).
__all__ = [
    "DECODER_STEP",
    "DEFAULT_INSTANCES",
    "DEFAULT_ORT_THREADS",
    "DEFAULT_QUEUE_DELAY_US",
    "DEFAULT_STEP_MODE",
    "ENCODER",
    "ENSEMBLE",
    "GENERATOR",
    "MODELS",
    "PREPROCESS",
    "RepositoryError",
    "assemble",
    "check_repository",
    "recorded_checkpoint",
]

PYTHON_MODELS_DIR = Path(__file__).resolve().parent / "triton_models"
TARGETS = ("cpu", "gpu")
# What preprocess hands the encoder: float32 [3, S, S] normalised, or the prepared
# uint8 [S, S, 3] with normalisation inside the encoder graph (builder/uint8_input.py).
ENCODER_INPUT_TYPES = ("float32", "uint8")
# CPU layouts: "split" = preprocess -> encoder -> caption_generator (three Python models);
# "fused" = preprocess runs decode and the encoder in one process (model source
# triton_models/preprocess_encoder), one hop fewer: preprocess -> caption_generator;
# "whole" (opt-in) = preprocess runs decode, the encoder and the decode loop (model source
# triton_models/whole): one Python model, one hop, one batcher per request.
LAYOUTS = ("split", "fused", "whole")
FUSED_SOURCE = "preprocess_encoder"
WHOLE_SOURCE = "whole"

# Sized for 2 CPU cores: one instance per model lets the three stages of the ensemble
# overlap; the bench tunes these through assemble's arguments, not by editing code.
# The front model (preprocess: it admits every request and, in the fused layout, runs the
# encoder) gets two. Triton's dynamic batcher prefetches at most two batches per
# instance; with one instance and a full bounded queue (load shedding refusing), it
# sleeps its default wait while the instance idles, and throughput drops under overload.
# Two instances keep it busy (docs/bench.md, "What the defaults are, and why").
DEFAULT_INSTANCES = {
    "cpu": {PREPROCESS: 2, ENCODER: 1, DECODER_STEP: 1, GENERATOR: 1},
    "gpu": {PREPROCESS: 2, ENCODER: 1, DECODER_STEP: 1, GENERATOR: 2},
}
# On CPU the step runs in caption_generator's process, no BLS call per token
# (docs/serving.md, "Decoder step: in-process or BLS"). On GPU the step goes to the GPU
# decoder_step through BLS.
DEFAULT_STEP_MODE = {"cpu": "inprocess", "gpu": "bls"}
# No waiting for company: requests that queue while an instance is busy still batch,
# and a delay per stage costs throughput at low concurrency (docs/bench.md).
DEFAULT_QUEUE_DELAY_US = 0


def _check_onnx(
    path: Path, inputs: Mapping[str, list[int]], outputs: Mapping[str, list[int]], input_types: Mapping[str, int] | None = None
) -> None:
    """Tensor names, the non-batch dims (and the given element types) of an exported graph must match the config."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for i in graph.input:
        want_type = (input_types or {}).get(i.name)
        if want_type is not None and i.type.tensor_type.elem_type != want_type:
            got = onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)
            raise RepositoryError(f"{path.name}: input {i.name} is {got}, expected {onnx.TensorProto.DataType.Name(want_type)}")

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim][1:]

    for kind, want, have in (
        ("input", inputs, {i.name: dims(i) for i in graph.input}),
        ("output", outputs, {o.name: dims(o) for o in graph.output}),
    ):
        if set(want) != set(have):
            raise RepositoryError(f"{path.name}: graph {kind}s are {sorted(have)}, expected {sorted(want)}")
        for name, d in want.items():
            # -1: the exporter left the dim symbolic; only a known, different dim is wrong.
            if len(have[name]) != len(d) or any(h not in (-1, w) for h, w in zip(have[name], d)):
                raise RepositoryError(f"{path.name}: {kind} {name} has dims {have[name]}, config expects {list(d)}")


def assemble(
    ck: Checkpoint,
    repo_dir: str | Path,
    target: str,
    artifacts: Mapping[str, Path],
    max_batch_size: int = DEFAULT_MAX_BATCH,
    precision: str = "fp32",
    instance_counts: Mapping[str, int] | None = None,
    ort_threads: Mapping[str, int] | None = None,
    step_mode: str | None = None,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    max_image_bytes: int = DEFAULT_MAX_BYTES,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    runtimes: Mapping[str, str] | None = None,
    inference_precision: str = "fp32",
    encoder_input: str = "float32",
    layout: str = "split",
    queues: Mapping[str, QueuePolicy] | None = None,
) -> Path:
    """Write the model repository for `target` ("cpu" or "gpu") into `repo_dir`.

    artifacts: `encoder_onnx`, `decoder_onnx`, and `encoder_plan` for gpu. Model
    directories of this repository are replaced; anything else in `repo_dir` is kept.
    runtimes: CPU runtime per Python model that runs a graph (encoder, decoder_step,
    caption_generator's in-process step): "onnxruntime" (default) or "openvino";
    inference_precision "bf16" is OpenVINO's hint for the encoder; encoder_input "uint8"
    expects an encoder graph that normalises inside (builder/uint8_input.py); layout
    "fused" runs decode and the encoder in the preprocess model, "whole" the decode loop
    too (CPU only; the step in preprocess's process, so step_mode must be inprocess).
    queues: the load-shedding policy per model (builder/capacity.py; the build measures the
    rates it derives them from); None bounds every admitting queue at four batches."""
    _check_choices(target, precision, max_batch_size, layout, encoder_input, runtimes, inference_precision)
    step_mode = step_mode or DEFAULT_STEP_MODE[target]
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be inprocess or bls, got {step_mode!r}")
    if layout == "whole" and step_mode != "inprocess":
        raise ValueError("layout whole runs the decoder step in preprocess's process: step_mode must be inprocess")
    needed = ["encoder_onnx", "decoder_onnx"] + (["encoder_plan"] if target == "gpu" else [])
    missing = [k for k in needed if k not in artifacts or not Path(artifacts[k]).is_file()]
    if missing:
        raise RepositoryError(f"missing artifacts for target {target}: {missing}")
    instances = {**DEFAULT_INSTANCES[target], **(instance_counts or {})}
    threads = {**DEFAULT_ORT_THREADS, **(ort_threads or {})}
    unknown = (set(instances) | set(threads)) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model names {sorted(unknown)}; models are {MODELS}")

    _check_graphs(ck, artifacts, encoder_input)
    configs = build_configs(
        ck,
        target,
        max_batch_size,
        precision,
        instances,
        threads,
        step_mode,
        queue_delay_us,
        {"max_image_bytes": max_image_bytes, "max_image_pixels": max_image_pixels},
        runtimes=runtimes,
        inference_precision=inference_precision,
        encoder_input=encoder_input,
        layout=layout,
        queues=queues if queues is not None else policies(None, max_batch_size, fused=layout in ("fused", "whole")),
    )
    repo_dir = Path(repo_dir)
    repo_dir.mkdir(parents=True, exist_ok=True)
    # Built beside the repository, then moved in, so a failure never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}-", dir=repo_dir.parent))
    try:
        _write_models(staging, configs, _model_files(ck, target, artifacts, step_mode, layout), ck)
        check_repository(staging)
        _install(staging, repo_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_repository(repo_dir)
    return repo_dir


def _check_choices(
    target: str,
    precision: str,
    max_batch_size: int,
    layout: str,
    encoder_input: str,
    runtimes: Mapping[str, str] | None,
    inference_precision: str,
) -> None:
    """assemble's arguments, each against what the configs and the Triton models support."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batch_size < 16:
        raise ValueError(f"max_batch_size must be >= 16, got {max_batch_size}")
    if layout not in LAYOUTS or (layout != "split" and target != "cpu"):
        raise ValueError(f"layout must be one of {LAYOUTS} (fused and whole on cpu only), got {layout!r} for {target}")
    if encoder_input not in ENCODER_INPUT_TYPES or (encoder_input == "uint8" and target != "cpu"):
        # On GPU the TensorRT engine is built from the float graph (a uint8 engine is untested here).
        raise ValueError(f"encoder_input must be one of {ENCODER_INPUT_TYPES} (uint8 on cpu only), got {encoder_input!r}")
    from captioner.serving.runtime import INFERENCE_PRECISIONS, RUNTIMES

    bad = {k: v for k, v in (runtimes or {}).items() if v not in RUNTIMES or k not in (ENCODER, DECODER_STEP, GENERATOR)}
    if bad:
        raise ValueError(f"runtimes: {bad}; models encoder, decoder_step, caption_generator; runtimes {RUNTIMES}")
    if inference_precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"inference_precision must be one of {INFERENCE_PRECISIONS}, got {inference_precision!r}")
    if inference_precision != "fp32" and (runtimes or {}).get(ENCODER) != "openvino":
        raise ValueError(f"inference_precision {inference_precision} needs runtimes[encoder] = openvino")


def _check_graphs(ck: Checkpoint, artifacts: Mapping[str, Path], encoder_input: str) -> None:
    """The exported graphs take and give what the configs will declare."""
    s, u, v = ck.preprocess.image_size, ck.args.lstm_units, len(ck.vocab)
    u8 = encoder_input == "uint8"
    _check_onnx(
        Path(artifacts["encoder_onnx"]),
        {ENCODER_INPUTS[0]: [s, s, 3] if u8 else [3, s, s]},
        {n: [u] for n in ENCODER_OUTPUTS},
        {ENCODER_INPUTS[0]: onnx.TensorProto.UINT8 if u8 else onnx.TensorProto.FLOAT},
    )
    _check_onnx(
        Path(artifacts["decoder_onnx"]),
        {STEP_INPUTS[0]: [], STEP_INPUTS[1]: [u], STEP_INPUTS[2]: [u]},
        {STEP_OUTPUTS[0]: [v], STEP_OUTPUTS[1]: [u], STEP_OUTPUTS[2]: [u]},
    )


def _model_files(
    ck: Checkpoint, target: str, artifacts: Mapping[str, Path], step_mode: str, layout: str
) -> dict[str, dict[str, Path | str]]:
    """model -> {file name in its version directory: a file to copy, or text to write}."""
    encoder: dict[str, Path | str] = (
        {"model.plan": Path(artifacts["encoder_plan"])} if target == "gpu" else {"model.onnx": Path(artifacts["encoder_onnx"])}
    )
    files: dict[str, dict[str, Path | str]] = {
        PREPROCESS: {"preprocess.json": json.dumps(ck.preprocess.to_dict(), indent=1)},
        ENCODER: encoder,
        DECODER_STEP: {"model.onnx": Path(artifacts["decoder_onnx"])},
        GENERATOR: {"vocab.json": json.dumps(ck.vocab.to_list())},
        ENSEMBLE: {},
    }
    if step_mode == "inprocess":
        files[GENERATOR]["decoder_step.onnx"] = Path(artifacts["decoder_onnx"])
    if layout in ("fused", "whole"):
        files[PREPROCESS]["model.onnx"] = Path(artifacts["encoder_onnx"])
    if layout == "whole":
        files[PREPROCESS]["vocab.json"] = files[GENERATOR]["vocab.json"]
        files[PREPROCESS]["decoder_step.onnx"] = Path(artifacts["decoder_onnx"])
    return files


def _write_models(
    staging: Path, configs: Mapping[str, mc.ModelConfig], files: Mapping[str, Mapping[str, Path | str]], ck: Checkpoint
) -> None:
    """Each model's config, warmup data, Python source and files, under `staging`."""
    for name, cfg in configs.items():
        version = staging / name / "1"
        version.mkdir(parents=True)
        if any(i.input_data_file for w in cfg.model_warmup for i in w.inputs.values()):
            (staging / name / "warmup").mkdir()
            (staging / name / "warmup" / WARMUP_IMAGE).write_bytes(_warmup_image(ck.preprocess.image_size))
        write_config(cfg, staging / name / "config.pbtxt")
        if cfg.backend == "python":
            source = WHOLE_SOURCE if is_whole(cfg) else FUSED_SOURCE if is_fused(cfg) else name
            shutil.copy2(PYTHON_MODELS_DIR / source / "model.py", version / "model.py")
        for filename, content in files[name].items():
            if isinstance(content, Path):
                shutil.copy2(content, version / filename)
            else:
                (version / filename).write_text(content)


def _install(staging: Path, repo_dir: Path) -> None:
    """Replace this repository's model directories with the staged ones."""
    for name in MODELS:
        dest = repo_dir / name
        if dest.exists():
            shutil.rmtree(dest)
        if (staging / name).exists():  # the fused layout has no encoder model, whole only preprocess
            (staging / name).rename(dest)


def _warmup_image(size: int) -> bytes:
    """A shapes-v1 scene as PNG, length-prefixed as Triton reads BYTES warmup data."""
    import struct

    from captioner.scenes import encoded_scenes

    png = encoded_scenes(1, seed=size)[0][0]
    return struct.pack("<I", len(png)) + png
