"""Checkpoint format. A checkpoint directory holds `model.pt` with everything needed
to rebuild the model and feed it: model args, preprocessing, vocabulary, decoding
defaults, and the weights. Nothing downstream retypes any of these."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import CaptionModel, ModelArgs
from .preprocess import PreprocessConfig
from .vocab import Vocabulary

FORMAT = "captioner-checkpoint-v1"
FILENAME = "model.pt"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


@dataclass
class Checkpoint:
    args: ModelArgs
    preprocess: PreprocessConfig
    vocab: Vocabulary
    model: CaptionModel
    decoding: dict = field(default_factory=lambda: {"length_penalty": 0.7})
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "model_args": self.args.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "vocab": self.vocab.to_list(),
            "decoding": dict(self.decoding),
            "meta": dict(self.meta),
            # CPU and contiguous whatever device and memory format trained it: loads anywhere.
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
        }
        if extra:
            payload.update(extra)
        tmp = d / (FILENAME + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(d / FILENAME)  # a crash mid-save never leaves a broken checkpoint
        return d / FILENAME

    @property
    def sha256(self) -> str:
        if self.path is None:
            raise ValueError("checkpoint was not loaded from disk")
        return file_sha256(self.path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(path: str | Path | None) -> Path:
    p = Path(path) if path else DEFAULT_MODEL_DIR
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return p


def load_raw(path: str | Path | None) -> dict:
    p = resolve(path)
    payload = torch.load(p, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{p} is not a {FORMAT} file")
    return payload


def load(path: str | Path | None = None) -> Checkpoint:
    """Load a checkpoint directory or file (default: the shipped model), in eval mode."""
    p = resolve(path)
    payload = load_raw(p)
    args = ModelArgs.from_dict(payload["model_args"])
    import warnings

    with warnings.catch_warnings():
        # The random-weights warning is for fresh backbones; these weights come from the file.
        warnings.simplefilter("ignore", UserWarning)
        model = CaptionModel(args)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(
        args=args,
        preprocess=PreprocessConfig.from_dict(payload["preprocess"]),
        vocab=Vocabulary(payload["vocab"]),
        model=model,
        decoding=payload.get("decoding", {}),
        meta=payload.get("meta", {}),
        path=p,
    )
