"""Checkpoint -> the `config.pbtxt` of every model of the Triton repository.

Every config is built as a `ModelConfig` protobuf message with values taken from the
checkpoint (image size, LSTM units, vocabulary size, max length, decoding defaults);
builder/repository.py writes them with text_format and parses them back to check them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.checkpoint import Checkpoint
from captioner.decoding import MAX_BEAM
from captioner.serving import DECODER_STEP, ENCODER, ENSEMBLE, GENERATOR, PREPROCESS
from captioner.serving.versions import OUTPUT as MODEL_VERSION

from .capacity import QueuePolicy
from .export import ENCODER_INPUTS, ENCODER_OUTPUTS, STEP_INPUTS, STEP_OUTPUTS
from .repository_check import RepositoryError

_FP32, _INT64, _STRING, _UINT8 = mc.TYPE_FP32, mc.TYPE_INT64, mc.TYPE_STRING, mc.TYPE_UINT8
WARMUP_IMAGE = "scene.bin"  # preprocess/warmup/: one encoded scene, Triton's serialized BYTES layout


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


def _base(
    name: str, max_batch_size: int, instances: int, kind: int, queue_delay_us: int, queue: QueuePolicy | None = None
) -> mc.ModelConfig:
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


@dataclass(frozen=True)
class _Shapes:
    """What the configs take from the checkpoint and the build's choices."""

    image: list[int]  # the encoder's image input, without the batch dim
    image_type: int
    units: int  # LSTM units: h0, c0 and the step's state
    vocab: int
    decoding: dict  # the generator's (and preprocess's) decoding defaults


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
    v = len(ck.vocab)
    if ck.args.vocab_size != v:
        raise RepositoryError(f"checkpoint vocab has {v} words but the model was built for {ck.args.vocab_size}")
    shapes = _Shapes(
        image=[s, s, 3] if encoder_input == "uint8" else [3, s, s],
        image_type=_UINT8 if encoder_input == "uint8" else _FP32,
        units=ck.args.lstm_units,
        vocab=v,
        decoding={"max_length": ck.args.max_length, "length_penalty": ck.decoding.get("length_penalty", 0.7)},
    )
    runtimes = runtimes or {}
    queues = queues or {}
    accel = mc.ModelInstanceGroup.KIND_GPU if target == "gpu" else mc.ModelInstanceGroup.KIND_CPU

    def base(
        name: str, kind: int = mc.ModelInstanceGroup.KIND_CPU, batch: int = max_batch_size, admits: bool = True
    ) -> mc.ModelConfig:
        return _base(name, batch, instances[name], kind, queue_delay_us, queues.get(name) if admits else None)

    def runtime(model: str) -> dict[str, str]:
        return {"runtime": runtimes.get(model, "onnxruntime")}

    fused = layout in ("fused", "whole")  # preprocess runs the encoder
    whole = layout == "whole"  # ... and the decode loop, with the step in its process
    pre = _preprocess(
        base(PREPROCESS),
        shapes,
        limits,
        encoder_input,
        fused,
        {
            "precision": precision,
            "intra_op_threads": ort_threads[ENCODER],
            **runtime(ENCODER),
            "inference_precision": inference_precision,
        },
    )
    if whole:
        _whole(
            pre,
            {
                "checkpoint_sha256": ck.sha256,
                "step_intra_op_threads": ort_threads[GENERATOR],
                "step_runtime": runtimes.get(GENERATOR, "onnxruntime"),
            },
        )
    enc = _encoder(
        base(ENCODER, accel),
        shapes,
        target,
        {
            "precision": precision,
            "intra_op_threads": ort_threads[ENCODER],
            **runtime(ENCODER),
            "inference_precision": inference_precision,
        },
    )
    # Every live beam of every image is one row of a step: up to max_batch_size * MAX_BEAM.
    dec = _decoder_step(
        base(DECODER_STEP, accel, max_batch_size * MAX_BEAM, admits=False),
        shapes,
        target,
        {"intra_op_threads": ort_threads[DECODER_STEP], **runtime(DECODER_STEP)},
    )
    _warmup(pre, (1, max_batch_size) if fused else (1,))
    if target == "cpu":  # TensorRT and onnxruntime backends allocate at load on the GPU
        _warmup(enc, (1, max_batch_size))
    gen = _generator(
        base(GENERATOR),
        shapes,
        step_mode,
        {"checkpoint_sha256": ck.sha256, "intra_op_threads": ort_threads[GENERATOR], **runtime(GENERATOR)},
    )
    ens = _ensemble(max_batch_size, fused, whole)
    _params(
        ens,
        {
            "checkpoint_sha256": ck.sha256,
            "target": target,
            "precision": precision,
            "layout": layout,
            "encoder_runtime": "tensorrt" if target == "gpu" else runtimes.get(ENCODER, "onnxruntime"),
        },
    )
    models = (pre, ens) if whole else (pre, dec, gen, ens) if fused else (pre, enc, dec, gen, ens)
    for c in models:  # Triton loads exactly these versions (builder/versions.py lists several)
        c.version_policy.specific.versions.append(1)
    return {c.name: c for c in models}


def _preprocess(
    pre: mc.ModelConfig,
    shapes: _Shapes,
    limits: Mapping[str, int],
    encoder_input: str,
    fused: bool,
    encoder_params: Mapping[str, object],
) -> mc.ModelConfig:
    _python(pre)
    pre.input.append(_input("IMAGE", _STRING, [1]))
    _params(
        pre,
        {
            **shapes.decoding,
            "max_image_bytes": limits["max_image_bytes"],
            "max_image_pixels": limits["max_image_pixels"],
            "output_type": encoder_input,
        },
    )
    if fused:
        pre.output.extend(_output(n, _FP32, [shapes.units]) for n in ENCODER_OUTPUTS)
        _params(pre, {"fused_encoder": 1, **encoder_params})
    else:
        pre.output.append(_output(ENCODER_INPUTS[0], shapes.image_type, shapes.image))
    return pre


def _whole(pre: mc.ModelConfig, params: Mapping[str, object]) -> mc.ModelConfig:
    """The fused preprocess turned into the whole layout's one model: captions out."""
    del pre.output[:]
    pre.output.append(_output("CAPTION", _STRING, [1]))
    pre.output.append(_output("SCORE", _FP32, [1]))
    pre.output.append(_output(MODEL_VERSION, _STRING, [1]))  # "<version>:<checkpoint sha256[:8]>"
    _params(pre, {"fused_generator": 1, **params})
    return pre


def _encoder(enc: mc.ModelConfig, shapes: _Shapes, target: str, params: Mapping[str, object]) -> mc.ModelConfig:
    enc.input.append(_input(ENCODER_INPUTS[0], shapes.image_type, shapes.image))
    enc.output.extend(_output(n, _FP32, [shapes.units]) for n in ENCODER_OUTPUTS)
    if target == "gpu":
        enc.platform, enc.default_model_filename = "tensorrt_plan", "model.plan"
        _params(enc, {"precision": params["precision"]})
    else:
        _python(enc)
        _params(enc, params)
    return enc


def _decoder_step(dec: mc.ModelConfig, shapes: _Shapes, target: str, params: Mapping[str, object]) -> mc.ModelConfig:
    u = shapes.units
    # A per-row scalar token: Triton needs non-empty dims, the graph takes [batch].
    dec.input.append(_input(STEP_INPUTS[0], _INT64, [1], reshape=[]))
    dec.input.extend(_input(n, _FP32, [u]) for n in STEP_INPUTS[1:])
    dec.output.append(_output(STEP_OUTPUTS[0], _FP32, [shapes.vocab]))
    dec.output.extend(_output(n, _FP32, [u]) for n in STEP_OUTPUTS[1:])
    if target == "gpu":
        dec.platform, dec.default_model_filename = "onnxruntime_onnx", "model.onnx"
    else:
        _python(dec)
        _params(dec, params)
    return dec


def _generator(gen: mc.ModelConfig, shapes: _Shapes, step_mode: str, params: Mapping[str, object]) -> mc.ModelConfig:
    _python(gen)
    gen.input.extend(_input(n, _FP32, [shapes.units]) for n in ENCODER_OUTPUTS)
    gen.output.append(_output("CAPTION", _STRING, [1]))
    gen.output.append(_output("SCORE", _FP32, [1]))
    gen.output.append(_output(MODEL_VERSION, _STRING, [1]))  # "<version>:<checkpoint sha256[:8]>"
    _params(gen, {**shapes.decoding, "step_mode": step_mode, "step_model": DECODER_STEP, **params})
    if step_mode == "inprocess":  # a BLS step would call decoder_step before it is ready
        _warmup(gen, (1,))
    return gen


def _ensemble(max_batch_size: int, fused: bool, whole: bool = False) -> mc.ModelConfig:
    """preprocess -> (encoder ->) caption_generator, wired by tensor name; the whole
    layout: preprocess alone, its outputs the ensemble's."""
    ens = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=max_batch_size)
    ens.input.append(_input("IMAGE", _STRING, [1]))
    ens.output.append(_output("CAPTION", _STRING, [1]))
    ens.output.append(_output("SCORE", _FP32, [1]))
    ens.output.append(_output(MODEL_VERSION, _STRING, [1]))
    steps = ens.ensemble_scheduling.step
    # Every step pinned to one version of its model (builder/versions.py re-pins a versioned
    # repository): a request never mixes two versions' models.
    step = steps.add(model_name=PREPROCESS, model_version=1)
    step.input_map["IMAGE"] = "IMAGE"
    if whole:
        for n in ("CAPTION", "SCORE", MODEL_VERSION):
            step.output_map[n] = n
        return ens
    if not fused:
        step.output_map[ENCODER_INPUTS[0]] = "preprocessed_image"
        step = steps.add(model_name=ENCODER, model_version=1)
        step.input_map[ENCODER_INPUTS[0]] = "preprocessed_image"
    for n in ENCODER_OUTPUTS:
        step.output_map[n] = f"encoded_{n}"
    step = steps.add(model_name=GENERATOR, model_version=1)
    for n in ENCODER_OUTPUTS:
        step.input_map[n] = f"encoded_{n}"
    step.output_map["CAPTION"] = "CAPTION"
    step.output_map["SCORE"] = "SCORE"
    step.output_map[MODEL_VERSION] = MODEL_VERSION
    return ens


def write_config(cfg: mc.ModelConfig, path: Path) -> None:
    path.write_text(text_format.MessageToString(cfg))
