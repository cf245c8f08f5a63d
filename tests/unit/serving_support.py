"""Small real artifacts for the serving unit tests: a random-weights checkpoint with
the shipped architecture scaled down, its ONNX exports and an assembled repository."""

from __future__ import annotations

import importlib.util
import io
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import Checkpoint
from captioner.decoding import DecodeParams, decode, torch_step
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig, preprocess_bytes
from captioner.scenes import all_captions, random_scene, render
from captioner.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[2]


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = Vocabulary.build([c for _ in range(300) for c in all_captions(random_scene(rng))], min_count=1)
    args = ModelArgs(
        vocab_size=len(vocab),
        cnn_channels=(8, 16),
        cnn_grid=2,
        image_bottleneck=16,
        lstm_units=24,
        embedding_dim=8,
        logit_bottleneck=16,
        max_length=12,
    )
    torch.manual_seed(seed)
    model = CaptionModel(args).eval()
    return Checkpoint(args, PreprocessConfig(32), vocab, model, decoding={"length_penalty": 0.7}).save(directory)


def scene_png(seed: int, size: int | None = None, fmt: str = "PNG") -> bytes:
    img = render(random_scene(random.Random(seed)), np.random.default_rng(seed))
    if size:
        img = img.resize((size, size))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def load_model_py(name: str, pb_utils: types.ModuleType):
    """Import builder/triton_models/<name>/model.py against the fake pb_utils."""
    sys.modules["triton_python_backend_utils"] = pb_utils
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", ROOT / "builder" / "triton_models" / name / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initialize(module, repo: Path, name: str):
    """TritonPythonModel.initialize with the args the Python backend passes."""
    import json

    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
            "model_repository": str(repo / name),
            "model_version": "1",
            "model_name": name,
            "model_instance_kind": "CPU",
            "model_instance_name": f"{name}_0",
            "model_instance_device_id": "0",
        }
    )
    return model


def image_request(*items):
    """A request's IMAGE input: one encoded image (or any object) per row."""
    return {"IMAGE": np.array([[x] for x in items], dtype=object)}


def torch_reference(ck, images, **params):
    """The in-process path: same preprocessing, torch encoder and decoder."""
    import torch

    x = torch.from_numpy(np.stack([preprocess_bytes(b, ck.preprocess) for b in images]))
    with torch.inference_mode():
        h0, c0 = ck.model.encoder(x)
    p = DecodeParams(**{"max_length": ck.args.max_length, **params})
    hyps = decode(torch_step(ck.model.decoder), h0.numpy(), c0.numpy(), ck.vocab.start, ck.vocab.end, p)
    return [ck.vocab.decode(h.tokens) for h in hyps], [h.logprob for h in hyps], sum(len(h.tokens) for h in hyps)
