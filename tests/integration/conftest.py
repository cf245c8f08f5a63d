"""One real tritonserver for the whole integration session, on free local ports.

`triton_server` serves the default checkpoint: models/default when it exists, else the
training run's best-so-far runs/default, else (fresh clone, nothing trained) a
random-weights model of the default architecture, so the server path is still tested
end to end; only the caption-quality test needs the shipped model and says so when it
skips. CAPTIONER_TEST_MODEL overrides the choice. The checkpoint is copied first: a
running training may replace runs/default while the session runs, and the server and
the in-process reference must read the same weights.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from captioner import checkpoint as ckpt_mod
from launcher.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServedModel:
    grpc_url: str  # host:port, as tritonclient.grpc wants it
    http_url: str  # host:port, as tritonclient.http wants it
    metrics_url: str  # full Prometheus URL
    checkpoint: Path  # the directory the server's repository was built from
    repository: Path
    log_file: Path
    shipped: bool  # True when this is the shipped default model (models/default)
    server: TritonServer


def _source() -> tuple[Path | None, bool]:
    if os.environ.get("CAPTIONER_TEST_MODEL"):
        p = ckpt_mod.resolve(os.environ["CAPTIONER_TEST_MODEL"])
        return p, p.parent.resolve() == (ROOT / "models" / "default").resolve()
    for d, shipped in ((ROOT / "models" / "default", True), (ROOT / "runs" / "default", False)):
        if (d / ckpt_mod.FILENAME).is_file():
            return d / ckpt_mod.FILENAME, shipped
    return None, False


def _random_default_model(directory: Path) -> None:
    import torch

    from captioner.checkpoint import Checkpoint
    from captioner.model import CaptionModel, ModelArgs, default_preprocess
    from captioner.scenes import all_captions, random_scene
    from captioner.vocab import Vocabulary

    rng = random.Random(0)
    vocab = Vocabulary.build([c for _ in range(500) for c in all_captions(random_scene(rng))], min_count=1)
    args = ModelArgs(vocab_size=len(vocab))
    torch.manual_seed(0)
    model = CaptionModel(args).eval()
    Checkpoint(args, default_preprocess(args.backbone), vocab, model, meta={"note": "random weights (tests)"}).save(directory)


def default_checkpoint(directory: Path):
    """The checkpoint the integration tests serve (see the module docstring), copied into
    `directory` and loaded: (checkpoint, shipped?)."""
    directory.mkdir()
    source, shipped = _source()
    if source is None:
        _random_default_model(directory)
    else:
        shutil.copy2(source, directory / ckpt_mod.FILENAME)
    return ckpt_mod.load(directory), shipped


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> ServedModel:
    from builder.export import export_decoder_step, export_encoder
    from builder.repository import assemble

    work = tmp_path_factory.mktemp("triton")
    ck_dir = work / "checkpoint"
    ck, shipped = default_checkpoint(ck_dir)
    artifacts = {
        "encoder_onnx": export_encoder(ck, work / "onnx" / "encoder.onnx"),
        "decoder_onnx": export_decoder_step(ck, work / "onnx" / "decoder_step.onnx"),
    }
    repo = assemble(ck, work / "repository", "cpu", artifacts)
    server = TritonServer(repo, log_file=work / "tritonserver.log")
    server.start()
    try:
        yield ServedModel(server.grpc_url, server.http_url, server.metrics_url, ck_dir, repo, server.log_file, shipped, server)
    finally:
        server.close()
