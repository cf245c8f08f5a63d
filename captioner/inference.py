"""In-process captioning from a checkpoint: the reference the server must match."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_mod
from .decoding import DecodeParams, Hypothesis, decode, torch_step
from .preprocess import ImageError, Limits, normalize_tensor, prepare, prepare_bytes, prepare_path


@dataclass
class Caption:
    text: str
    score: float
    tokens: tuple[int, ...]


class Captioner:
    def __init__(self, model: str | Path | None = None, threads: int | None = None, device: str = "cpu"):
        """`device`: cpu, cuda, cuda:N or auto (CUDA when available). Decoding stays in float32."""
        from .distributed import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.ckpt = ckpt_mod.load(model)
        self.ckpt.model.to(self.device)
        self.cfg = self.ckpt.preprocess
        self.vocab = self.ckpt.vocab
        self.step = torch_step(self.ckpt.model.decoder, self.device)

    def params(self, **overrides) -> DecodeParams:
        base = dict(max_length=self.ckpt.args.max_length, length_penalty=self.ckpt.decoding.get("length_penalty", 0.7))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return DecodeParams(**base).validate()

    def encode(self, batch_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            h0, c0 = self.ckpt.model.encoder(normalize_tensor(torch.from_numpy(np.asarray(batch_hwc)).to(self.device), self.cfg))
        return h0.cpu().numpy(), c0.cpu().numpy()

    def caption_arrays(self, batch_hwc: np.ndarray, **params) -> list[Caption]:
        h0, c0 = self.encode(batch_hwc)
        hyps = decode(self.step, h0, c0, self.vocab.start, self.vocab.end, self.params(**params))
        return [self._caption(h) for h in hyps]

    def _caption(self, h: Hypothesis) -> Caption:
        return Caption(self.vocab.decode(h.tokens), h.logprob, h.tokens)

    def caption_images(self, images: Iterable, batch_size: int = 64, **params) -> list[Caption]:
        """Pillow images, bytes or paths -> captions (ImageError for a bad one)."""
        arrays = [self._prepare(x) for x in images]
        out: list[Caption] = []
        for i in range(0, len(arrays), batch_size):
            out += self.caption_arrays(np.stack(arrays[i : i + batch_size]), **params)
        return out

    def _prepare(self, x) -> np.ndarray:
        """Encoded bytes and files go through the checkpoint's decode path; a Pillow
        image is already decoded and is only resized."""
        if isinstance(x, (bytes, bytearray)):
            return prepare_bytes(x, self.cfg, Limits())
        if isinstance(x, (str, Path)):
            return prepare_path(x, self.cfg)
        return prepare(x, self.cfg)


__all__ = ["Captioner", "Caption", "ImageError"]
