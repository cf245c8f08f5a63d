"""Checkpoint + exported artifacts -> a Triton model repository.

Every config.pbtxt is built as a `ModelConfig` protobuf message with values taken from
the checkpoint (image size, LSTM units, vocabulary size, max length, decoding
defaults), written with text_format, parsed back and checked for completeness.

Models (ensemble `captioner` = preprocess -> encoder -> caption_generator):
  preprocess         Python: Pillow decode + captioner.preprocess, request checks
  encoder            CPU: Python + onnxruntime or OpenVINO;  GPU: tensorrt_plan
  decoder_step       CPU: Python + onnxruntime or OpenVINO;  GPU: onnxruntime_onnx
  caption_generator  Python: batched greedy / beam / sampling over the decoder step
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.checkpoint import Checkpoint
from captioner.decoding import MAX_BEAM
from captioner.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from captioner.serving import DECODER_STEP, ENCODER, ENSEMBLE, GENERATOR, PREPROCESS

from .capacity import QueuePolicy, policies
from .export import ENCODER_INPUTS, ENCODER_OUTPUTS, STEP_INPUTS, STEP_OUTPUTS

MODELS = (PREPROCESS, ENCODER, DECODER_STEP, GENERATOR, ENSEMBLE)
PYTHON_MODELS_DIR = Path(__file__).resolve().parent / "triton_models"
TARGETS = ("cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# What preprocess hands the encoder: float32 [3, S, S] normalised, or the prepared
# uint8 [S, S, 3] with normalisation inside the encoder graph (builder/uint8_input.py).
ENCODER_INPUT_TYPES = ("float32", "uint8")
# CPU layouts: "split" = preprocess -> encoder -> caption_generator (three Python models);
# "fused" = preprocess runs decode and the encoder in one process (model source
# triton_models/preprocess_encoder), one hop fewer: preprocess -> caption_generator.
LAYOUTS = ("split", "fused")
FUSED_SOURCE = "preprocess_encoder"

# Sized for 2 CPU cores: one instance per model lets the three stages of the ensemble
# overlap; the bench tunes these through assemble's arguments, not by editing code.
# The front model (preprocess: it admits every request and, in the fused layout, runs the
# encoder) gets two. Triton's dynamic batcher prefetches at most two batches per
# instance; with one instance and a full bounded queue (load shedding refusing), it
# sleeps its 500 ms default wait while the instance idles: measured with seed-inception,
# the front model was busy 45 % of the time at 16 clients and throughput halved (16.5
# vs 34.7 captions/s at 8 clients). Two instances keep it busy (35.2/s at 16 clients,
# 1-client p50 34 vs 31 ms; README "Reliability").
DEFAULT_INSTANCES = {
    "cpu": {PREPROCESS: 2, ENCODER: 1, DECODER_STEP: 1, GENERATOR: 1},
    "gpu": {PREPROCESS: 2, ENCODER: 1, DECODER_STEP: 1, GENERATOR: 2},
}
# The encoder gets both cores: with one thread a heavy encoder (seed-inception) caps the
# whole stack at one core, 0.55x the in-process bound; two reach 1.1x (docs/bench.md).
DEFAULT_ORT_THREADS = {ENCODER: 2, DECODER_STEP: 1, GENERATOR: 1}
# Measured on the CPU machine (README, "BLS or in-process decoder step"). On GPU the
# step goes to the GPU decoder_step through BLS.
DEFAULT_STEP_MODE = {"cpu": "inprocess", "gpu": "bls"}
# No waiting for company: requests that queue while an instance is busy still batch,
# and a 1 ms delay per stage halved throughput at 1-4 clients (docs/bench.md).
DEFAULT_QUEUE_DELAY_US = 0

_FP32, _INT64, _STRING, _UINT8 = mc.TYPE_FP32, mc.TYPE_INT64, mc.TYPE_STRING, mc.TYPE_UINT8


class RepositoryError(ValueError):
    """The repository (or what it was built from) is incomplete or inconsistent."""


# --- protobuf builders ---------------------------------------------------------------


def _input(name: str, dtype: int, dims, reshape=None) -> mc.ModelInput:
    t = mc.ModelInput(name=name, data_type=dtype, dims=list(dims))
    if reshape is not None:
        t.reshape.shape.extend(reshape)
    return t


def _output(name: str, dtype: int, dims) -> mc.ModelOutput:
    return mc.ModelOutput(name=name, data_type=dtype, dims=list(dims))


def _params(cfg: mc.ModelConfig, values: Mapping[str, object]) -> None:
    for k, v in values.items():
        cfg.parameters[k].string_value = str(v)


def _base(name: str, max_batch_size: int, instances: int, kind: int, queue_delay_us: int,
          queue: QueuePolicy | None = None) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    cfg.instance_group.add(count=instances, kind=kind)
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = queue_delay_us
    if queue is not None:
        # Load shedding (builder/capacity.py): a full queue or a request that waited past the
        # timeout is refused with UNAVAILABLE; a caller's own deadline may lower the timeout.
        policy = db.default_queue_policy
        policy.timeout_action = mc.ModelQueuePolicy.REJECT
        policy.max_queue_size = queue.max_queue_size
        policy.default_timeout_microseconds = queue.timeout_us
        policy.allow_timeout_override = True
        if 0 < queue.batch_cap < max_batch_size:
            db.preferred_batch_size.append(queue.batch_cap)
    return cfg


WARMUP_IMAGE = "scene.bin"  # preprocess/warmup/: one encoded scene, Triton's serialized BYTES layout


def _warmup(cfg: mc.ModelConfig, batch_sizes: tuple[int, ...]) -> None:
    """Triton runs these requests before it reports the model ready: at start and after
    every supervised reload, so the first real requests never pay for onnxruntime's lazy
    allocations (long enough, on a cold start, for load shedding to refuse them)."""
    for b in batch_sizes:
        w = cfg.model_warmup.add(name=f"warmup_batch_{b}", batch_size=b, count=1)
        for t in cfg.input:
            inp = w.inputs[t.name]
            inp.data_type = t.data_type
            inp.dims.extend(t.reshape.shape if t.HasField("reshape") else t.dims)
            if t.data_type == mc.TYPE_STRING:
                inp.input_data_file = WARMUP_IMAGE
            else:
                inp.zero_data = True


def _python(cfg: mc.ModelConfig) -> mc.ModelConfig:
    cfg.backend = "python"
    return cfg


def build_configs(
    ck: Checkpoint,
    target: str,
    max_batch_size: int,
    precision: str,
    instances: Mapping[str, int],
    ort_threads: Mapping[str, int],
    step_mode: str,
    queue_delay_us: int,
    limits: Mapping[str, int],
    runtimes: Mapping[str, str] | None = None,
    inference_precision: str = "fp32",
    encoder_input: str = "float32",
    layout: str = "split",
    queues: Mapping[str, QueuePolicy] | None = None,
) -> dict[str, mc.ModelConfig]:
    s = ck.preprocess.image_size
    u = ck.args.lstm_units
    v = len(ck.vocab)
    if ck.args.vocab_size != v:
        raise RepositoryError(f"checkpoint vocab has {v} words but the model was built for {ck.args.vocab_size}")
    decoding = {"max_length": ck.args.max_length, "length_penalty": ck.decoding.get("length_penalty", 0.7)}
    cpu, gpu = mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_GPU
    accel = gpu if target == "gpu" else cpu
    image, image_type = ([s, s, 3], _UINT8) if encoder_input == "uint8" else ([3, s, s], _FP32)
    runtimes = runtimes or {}

    def runtime(model: str) -> dict[str, str]:
        return {"runtime": runtimes.get(model, "onnxruntime")}

    queues = queues or {}
    pre = _python(_base(PREPROCESS, max_batch_size, instances[PREPROCESS], cpu, queue_delay_us, queues.get(PREPROCESS)))
    pre.input.append(_input("IMAGE", _STRING, [1]))
    _params(pre, {**decoding, "max_image_bytes": limits["max_image_bytes"], "max_image_pixels": limits["max_image_pixels"],
                  "output_type": encoder_input})
    fused = layout == "fused"
    if fused:
        pre.output.extend(_output(n, _FP32, [u]) for n in ENCODER_OUTPUTS)
        _params(pre, {"fused_encoder": 1, "precision": precision, "intra_op_threads": ort_threads[ENCODER],
                      **runtime(ENCODER), "inference_precision": inference_precision})
    else:
        pre.output.append(_output(ENCODER_INPUTS[0], image_type, image))

    enc = _base(ENCODER, max_batch_size, instances[ENCODER], accel, queue_delay_us, queues.get(ENCODER))
    enc.input.append(_input(ENCODER_INPUTS[0], image_type, image))
    enc.output.extend(_output(n, _FP32, [u]) for n in ENCODER_OUTPUTS)
    if target == "gpu":
        enc.platform, enc.default_model_filename = "tensorrt_plan", "model.plan"
        _params(enc, {"precision": precision})
    else:
        _python(enc)
        _params(enc, {"precision": precision, "intra_op_threads": ort_threads[ENCODER], **runtime(ENCODER),
                      "inference_precision": inference_precision})

    # Every live beam of every image is one row of a step: up to max_batch_size * MAX_BEAM.
    dec = _base(DECODER_STEP, max_batch_size * MAX_BEAM, instances[DECODER_STEP], accel, queue_delay_us)
    # A per-row scalar token: Triton needs non-empty dims, the graph takes [batch].
    dec.input.append(_input(STEP_INPUTS[0], _INT64, [1], reshape=[]))
    dec.input.extend(_input(n, _FP32, [u]) for n in STEP_INPUTS[1:])
    dec.output.append(_output(STEP_OUTPUTS[0], _FP32, [v]))
    dec.output.extend(_output(n, _FP32, [u]) for n in STEP_OUTPUTS[1:])
    if target == "gpu":
        dec.platform, dec.default_model_filename = "onnxruntime_onnx", "model.onnx"
    else:
        _python(dec)
        _params(dec, {"intra_op_threads": ort_threads[DECODER_STEP], **runtime(DECODER_STEP)})

    _warmup(pre, (1, max_batch_size) if fused else (1,))
    if target == "cpu":  # TensorRT and onnxruntime backends allocate at load on the GPU
        _warmup(enc, (1, max_batch_size))
    gen = _python(_base(GENERATOR, max_batch_size, instances[GENERATOR], cpu, queue_delay_us, queues.get(GENERATOR)))
    gen.input.extend(_input(n, _FP32, [u]) for n in ENCODER_OUTPUTS)
    gen.output.append(_output("CAPTION", _STRING, [1]))
    gen.output.append(_output("SCORE", _FP32, [1]))
    _params(gen, {**decoding, "step_mode": step_mode, "step_model": DECODER_STEP, "intra_op_threads": ort_threads[GENERATOR],
                  **runtime(GENERATOR)})
    if step_mode == "inprocess":  # a BLS step would call decoder_step before it is ready
        _warmup(gen, (1,))

    ens = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=max_batch_size)
    ens.input.append(_input("IMAGE", _STRING, [1]))
    ens.output.append(_output("CAPTION", _STRING, [1]))
    ens.output.append(_output("SCORE", _FP32, [1]))
    steps = ens.ensemble_scheduling.step
    step = steps.add(model_name=PREPROCESS, model_version=-1)
    step.input_map["IMAGE"] = "IMAGE"
    if not fused:
        step.output_map[ENCODER_INPUTS[0]] = "preprocessed_image"
        step = steps.add(model_name=ENCODER, model_version=-1)
        step.input_map[ENCODER_INPUTS[0]] = "preprocessed_image"
    for n in ENCODER_OUTPUTS:
        step.output_map[n] = f"encoded_{n}"
    step = steps.add(model_name=GENERATOR, model_version=-1)
    for n in ENCODER_OUTPUTS:
        step.input_map[n] = f"encoded_{n}"
    step.output_map["CAPTION"] = "CAPTION"
    step.output_map["SCORE"] = "SCORE"
    _params(ens, {"checkpoint_sha256": ck.sha256, "target": target, "precision": precision, "layout": layout,
                  "encoder_runtime": "tensorrt" if target == "gpu" else runtimes.get(ENCODER, "onnxruntime")})
    return {c.name: c for c in ((pre, dec, gen, ens) if fused else (pre, enc, dec, gen, ens))}


# --- checks ------------------------------------------------------------------------------


def _check_onnx(path: Path, inputs: Mapping[str, list[int]], outputs: Mapping[str, list[int]],
                input_types: Mapping[str, int] | None = None) -> None:
    """Tensor names, the non-batch dims (and the given element types) of an exported graph must match the config."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for i in graph.input:
        want = (input_types or {}).get(i.name)
        if want is not None and i.type.tensor_type.elem_type != want:
            got = onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)
            raise RepositoryError(f"{path.name}: input {i.name} is {got}, expected {onnx.TensorProto.DataType.Name(want)}")

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


def _required_files(cfg: mc.ModelConfig) -> list[str]:
    main = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}.get(cfg.platform, "model.py")
    extra = {
        PREPROCESS: ["preprocess.json"] + (["model.onnx"] if _fused(cfg) else []),
        GENERATOR: ["vocab.json"],
        ENCODER: ["model.onnx"] if cfg.backend == "python" else [],
        DECODER_STEP: ["model.onnx"],
    }[cfg.name]
    if cfg.name == GENERATOR and cfg.parameters["step_mode"].string_value == "inprocess":
        extra.append("decoder_step.onnx")
    return [main] + extra


def _fused(cfg: mc.ModelConfig) -> bool:
    return cfg.name == PREPROCESS and "fused_encoder" in cfg.parameters


def check_repository(repo_dir: str | Path) -> dict[str, mc.ModelConfig]:
    """Parse every config back and assert the repository is complete and consistent."""
    repo_dir = Path(repo_dir)
    configs: dict[str, mc.ModelConfig] = {}
    for name in MODELS:
        path = repo_dir / name / "config.pbtxt"
        if name == ENCODER and _fused(configs[PREPROCESS]):
            if path.exists():
                raise RepositoryError(f"{path}: the fused layout's preprocess runs the encoder; no encoder model")
            continue
        if not path.is_file():
            raise RepositoryError(f"missing {path}")
        text = path.read_text()
        cfg = text_format.Parse(text, mc.ModelConfig())
        if cfg.name != name:
            raise RepositoryError(f"{path}: name is {cfg.name!r}")
        if cfg.max_batch_size < 16:
            raise RepositoryError(f"{path}: max_batch_size {cfg.max_batch_size} < 16")
        for t in list(cfg.input) + list(cfg.output):
            if not t.dims or any(d <= 0 for d in t.dims):
                raise RepositoryError(f"{path}: tensor {t.name} has dims {list(t.dims)}")
            if t.data_type == mc.TYPE_INVALID:
                raise RepositoryError(f"{path}: tensor {t.name} has no data type")
        for k, p in cfg.parameters.items():
            if not p.string_value or "{" in p.string_value:
                raise RepositoryError(f"{path}: parameter {k} is {p.string_value!r}")
        if name != ENSEMBLE:
            if not cfg.HasField("dynamic_batching"):
                raise RepositoryError(f"{path}: no dynamic batching")
            for w in cfg.model_warmup:
                for i in w.inputs.values():
                    if i.input_data_file and not (repo_dir / name / "warmup" / i.input_data_file).is_file():
                        raise RepositoryError(f"{name}: warmup {w.name} needs warmup/{i.input_data_file}")
            version = repo_dir / name / "1"
            for needed in _required_files(cfg):
                if not (version / needed).is_file():
                    raise RepositoryError(f"{name}: missing {version / needed}")
        configs[name] = cfg

    # Follow the ensemble's tensors: every step input is produced before it is used, with
    # the data type and dims the consuming model declares.
    ens = configs[ENSEMBLE]
    if not (repo_dir / ENSEMBLE / "1").is_dir():
        raise RepositoryError(f"{ENSEMBLE}: missing version directory 1")
    known = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            raise RepositoryError(f"ensemble step uses unknown model {step.model_name}")
        ins = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        if set(step.input_map) != set(ins):
            raise RepositoryError(f"ensemble feeds {sorted(step.input_map)} to {model.name}, which takes {sorted(ins)}")
        for inner, outer in step.input_map.items():
            if outer not in known:
                raise RepositoryError(f"ensemble tensor {outer} is used by {model.name} before it is produced")
            if known[outer] != ins[inner]:
                raise RepositoryError(f"ensemble tensor {outer} is {known[outer]}, {model.name}.{inner} wants {ins[inner]}")
        for inner, outer in step.output_map.items():
            if inner not in outs:
                raise RepositoryError(f"{model.name} has no output {inner}")
            known[outer] = outs[inner]
    for t in ens.output:
        if known.get(t.name) != (t.data_type, list(t.dims)):
            raise RepositoryError(f"ensemble output {t.name} is not produced as declared")
    return configs


def write_config(cfg: mc.ModelConfig, path: Path) -> None:
    path.write_text(text_format.MessageToString(cfg))


# --- assembly ---------------------------------------------------------------------------


def assemble(
    ck: Checkpoint,
    repo_dir: str | Path,
    target: str,
    artifacts: Mapping[str, Path],
    max_batch_size: int = 32,
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
    "fused" runs decode and the encoder in the preprocess model (CPU only).
    queues: the load-shedding policy per model (builder/capacity.py; the build measures the
    rates it derives them from); None bounds every admitting queue at four batches."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batch_size < 16:
        raise ValueError(f"max_batch_size must be >= 16, got {max_batch_size}")
    if layout not in LAYOUTS or (layout == "fused" and target != "cpu"):
        raise ValueError(f"layout must be one of {LAYOUTS} (fused on cpu only), got {layout!r} for {target}")
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
    step_mode = step_mode or DEFAULT_STEP_MODE[target]
    if step_mode not in ("inprocess", "bls"):
        raise ValueError(f"step_mode must be inprocess or bls, got {step_mode!r}")
    needed = ["encoder_onnx", "decoder_onnx"] + (["encoder_plan"] if target == "gpu" else [])
    missing = [k for k in needed if k not in artifacts or not Path(artifacts[k]).is_file()]
    if missing:
        raise RepositoryError(f"missing artifacts for target {target}: {missing}")
    instances = {**DEFAULT_INSTANCES[target], **(instance_counts or {})}
    threads = {**DEFAULT_ORT_THREADS, **(ort_threads or {})}
    unknown = (set(instances) | set(threads)) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model names {sorted(unknown)}; models are {MODELS}")

    s, u, v = ck.preprocess.image_size, ck.args.lstm_units, len(ck.vocab)
    u8 = encoder_input == "uint8"
    _check_onnx(Path(artifacts["encoder_onnx"]), {ENCODER_INPUTS[0]: [s, s, 3] if u8 else [3, s, s]},
                {n: [u] for n in ENCODER_OUTPUTS},
                {ENCODER_INPUTS[0]: onnx.TensorProto.UINT8 if u8 else onnx.TensorProto.FLOAT})
    _check_onnx(
        Path(artifacts["decoder_onnx"]),
        {STEP_INPUTS[0]: [], STEP_INPUTS[1]: [u], STEP_INPUTS[2]: [u]},
        {STEP_OUTPUTS[0]: [v], STEP_OUTPUTS[1]: [u], STEP_OUTPUTS[2]: [u]},
    )
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
        queues=queues if queues is not None else policies(None, max_batch_size, fused=layout == "fused"),
    )

    repo_dir = Path(repo_dir)
    repo_dir.mkdir(parents=True, exist_ok=True)
    # Built beside the repository, then moved in, so a failure never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}-", dir=repo_dir.parent))
    try:
        files: dict[str, dict[str, Path | str]] = {
            PREPROCESS: {"preprocess.json": json.dumps(ck.preprocess.to_dict(), indent=1)},
            ENCODER: {"model.plan": Path(artifacts["encoder_plan"])} if target == "gpu" else {"model.onnx": Path(artifacts["encoder_onnx"])},
            DECODER_STEP: {"model.onnx": Path(artifacts["decoder_onnx"])},
            GENERATOR: {"vocab.json": json.dumps(ck.vocab.to_list())},
            ENSEMBLE: {},
        }
        if step_mode == "inprocess":
            files[GENERATOR]["decoder_step.onnx"] = Path(artifacts["decoder_onnx"])
        if layout == "fused":
            files[PREPROCESS]["model.onnx"] = Path(artifacts["encoder_onnx"])
        for name, cfg in configs.items():
            version = staging / name / "1"
            version.mkdir(parents=True)
            if any(i.input_data_file for w in cfg.model_warmup for i in w.inputs.values()):
                (staging / name / "warmup").mkdir()
                (staging / name / "warmup" / WARMUP_IMAGE).write_bytes(_warmup_image(ck.preprocess.image_size))
            write_config(cfg, staging / name / "config.pbtxt")
            if cfg.backend == "python":
                source = FUSED_SOURCE if _fused(cfg) else name
                shutil.copy2(PYTHON_MODELS_DIR / source / "model.py", version / "model.py")
            for filename, content in files[name].items():
                if isinstance(content, Path):
                    shutil.copy2(content, version / filename)
                else:
                    (version / filename).write_text(content)
        check_repository(staging)
        for name in MODELS:
            dest = repo_dir / name
            if dest.exists():
                shutil.rmtree(dest)
            if (staging / name).exists():  # the fused layout has no encoder model
                (staging / name).rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_repository(repo_dir)
    return repo_dir


def _warmup_image(size: int) -> bytes:
    """A shapes-v1 scene as PNG, length-prefixed as Triton reads BYTES warmup data."""
    import struct

    from captioner.scenes import encoded_scenes

    png = encoded_scenes(1, seed=size)[0][0]
    return struct.pack("<I", len(png)) + png


def recorded_checkpoint(repo_dir: str | Path) -> str | None:
    """The sha256 of the checkpoint a repository was assembled from (None: no repository)."""
    path = Path(repo_dir) / ENSEMBLE / "config.pbtxt"
    if not path.is_file():
        return None
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    return cfg.parameters["checkpoint_sha256"].string_value if "checkpoint_sha256" in cfg.parameters else None
