"""The `whole` CPU layout's work: encoded images -> captions in one Python model.

Decode, the encoder (captioner.serving.preprocess.ImageEncoder: one batched run for
every good image of the Triton batch) and the batched decode loop
(captioner.serving.generator.generate: one decoder step per token for every live
sequence) in one process, so a request takes one Python-backend hop and one batcher
instead of the fused layout's two (docs/bench.md, "What limits the ratios"). Every
check and message is the other layouts': a bad parameter or image is refused for that
request alone, before any work is spent on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decoding import StepFn
from ..vocab import Vocabulary
from . import Rejected
from .generator import Captions, GenRequest, caption_arrays, generate
from .params import decode_params
from .preprocess import ImageEncoder


@dataclass
class WholeCaptioner:
    """ImageEncoder (its Preprocessor must hold the decoding defaults: it refuses bad
    parameters first) followed by generate() over the same batch."""

    encoder: ImageEncoder
    step: StepFn
    vocab: Vocabulary

    def __post_init__(self):
        if self.encoder.pre.defaults is None:
            raise ValueError("WholeCaptioner needs a Preprocessor with decoding defaults (it checks request parameters)")

    def run(self, images: Sequence[np.ndarray], parameters: Sequence[Any] | None = None) -> list[Captions | Rejected]:
        """Per request its Captions, or its Rejected."""
        parameters = parameters if parameters is not None else [None] * len(images)
        defaults = self.encoder.pre.defaults
        assert defaults is not None  # __post_init__
        encoded = self.encoder.run(images, parameters)
        out: list[Any] = list(encoded)  # the encoded ones are replaced by their Captions below
        good: list[int] = []
        requests: list[GenRequest] = []
        for i, e in enumerate(encoded):
            if isinstance(e, Rejected):
                continue
            good.append(i)
            # The Preprocessor checked the parameters already: parsing them again cannot fail.
            requests.append(GenRequest(e[0], e[1], decode_params(parameters[i], defaults)))
        if requests:
            for i, captions in zip(good, generate(self.step, self.vocab, requests)):
                out[i] = captions
        return out

    def arrays(self, images: Sequence[np.ndarray], parameters: Sequence[Any] | None, version: str, produced=None) -> list:
        """run(), each request's Captions as its (CAPTION, SCORE, MODEL_VERSION) arrays;
        `produced(captions, tokens)` is called per answered request (the output metrics)."""
        out: list = []
        for r in self.run(images, parameters):
            if isinstance(r, Rejected):
                out.append(r)
                continue
            if produced is not None:
                produced(len(r.texts), r.tokens)
            out.append(caption_arrays(r, version))
        return out
