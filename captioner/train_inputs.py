"""What a training or validation step is fed: captions per image as token rows, images
(or cached backbone features), and where tensors are computed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .data import CocoCaptions, ImageDataset, encode_captions, loader
from .model import CaptionModel
from .preprocess import PreprocessConfig, normalize_tensor
from .progress import bar
from .vocab import Vocabulary


@dataclass
class Split:
    data: CocoCaptions
    inputs: np.ndarray | None  # uint8 images [N,S,S,3], or float32 backbone features [N,F] when frozen
    tokens: np.ndarray  # [M, T]
    owner: np.ndarray  # [M] image index of each caption, ascending
    by_image: list[np.ndarray]

    def pick_captions(self, idx: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """One caption row per image, chosen by `draw` in [0, 1) per image."""
        first = np.searchsorted(self.owner, idx)
        count = np.searchsorted(self.owner, idx, side="right") - first
        return first + np.minimum((draw[idx] * count).astype(np.int64), count - 1)


def make_split(data: CocoCaptions, inputs: np.ndarray | None, vocab: Vocabulary, max_tokens: int) -> Split:
    tokens, owner = encode_captions(data, vocab, max_tokens)
    images = np.arange(len(data))
    bounds = zip(np.searchsorted(owner, images), np.searchsorted(owner, images, side="right"))
    by_image = [np.arange(lo, hi) for lo, hi in bounds]  # owner is ascending
    return Split(data, inputs, tokens, owner, by_image)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed; one per run."""

    device: torch.device
    amp: str
    channels_last: bool
    workers: int

    def images(self, x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
        """uint8 NHWC (any device) -> the normalised float batch on this device."""
        return normalize_tensor(x.to(self.device, non_blocking=True), cfg, self.channels_last)

    def autocast(self):
        return D.autocast(self.device, self.amp)


def backbone_features(
    model: CaptionModel,
    data: CocoCaptions,
    cfg,
    cache: Path,
    rt: Runtime,
    write: bool,
    augment_share: float = 0.0,
    seed: int = 0,
    batch: int = 256,
) -> np.ndarray:
    """Backbone features, computed once in batches on the device and kept on disk (the
    seed's frozen-encoder recipe). Every process that finds no cache computes its own
    (no shared disk needed); only `write` saves it."""
    if cache.exists():
        feats = np.load(cache)
        if len(feats) == len(data):
            return feats
    model.encoder.backbone.eval()
    images = loader(
        ImageDataset(data, cfg, augment_share, seed), batch_size=batch, workers=rt.workers, pin=rt.device.type == "cuda"
    )
    out = np.empty((len(data), model.encoder.backbone.out_dim), np.float32)
    with torch.inference_mode(), rt.autocast():
        for idx, x in bar(images, desc=f"features {cache.name}", unit="batch", disable=not write):
            out[idx.numpy()] = model.encoder.backbone(rt.images(x, cfg)).float().cpu().numpy()
    if write:
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out


def encode(model: CaptionModel, x: np.ndarray, cfg, frozen: bool, rt: Runtime):
    t = torch.from_numpy(x)
    with rt.autocast():
        if frozen:
            h0 = model.encoder.from_features(t.to(rt.device))
            h0, c0 = h0, h0
        else:
            h0, c0 = model.encoder(rt.images(t, cfg))
    return h0.float(), c0.float()


def batch_tokens(split: Split, rows: np.ndarray, pad: int) -> torch.Tensor:
    toks = split.tokens[rows]
    width = int((toks != pad).sum(1).max())
    return torch.from_numpy(toks[:, :width])
