"""The `preprocess` model's work: every request's encoded images -> one normalised batch.

Decoding goes through captioner.preprocess (the function training uses), one image at
a time because each may fail on its own; normalisation then runs once over every good
image of the whole Triton batch, and the result is split back per request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..preprocess import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageError,
    Limits,
    PreprocessConfig,
    normalize,
    prepare_bytes,
)
from . import Rejected
from .batching import concat, split
from .params import DecodeDefaults, ParamError, decode_params

# Every reason a request can be refused for; metrics pre-create one series per reason.
REJECT_REASONS = (
    "bad_type",
    "empty",
    "too_large",
    "not_an_image",
    "zero_size",
    "too_many_pixels",
    "corrupt",
    "bad_parameter",
)


def limits_from_config(params: Mapping[str, str]) -> Limits:
    """Byte and pixel limits: captioner.preprocess defaults unless the model config overrides them."""
    return Limits(
        max_bytes=int(params.get("max_image_bytes", DEFAULT_MAX_BYTES)),
        max_pixels=int(params.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
    )


@dataclass
class Preprocessor:
    cfg: PreprocessConfig
    limits: Limits
    defaults: DecodeDefaults | None = None  # set: request parameters are checked here, first
    # False: hand the encoder the prepared uint8 [n, S, S, 3] (its graph normalises), a
    # quarter of float32's bytes through Triton's shared memory.
    normalise: bool = True

    def prepare_request(self, images: np.ndarray) -> np.ndarray | Rejected:
        """One request's IMAGE tensor ([n, 1] bytes) -> uint8 [n, S, S, 3], or why not."""
        items = np.asarray(images, dtype=object).reshape(-1)
        if items.size == 0:
            return Rejected("empty", "IMAGE holds no images")
        out = []
        for i, data in enumerate(items):
            try:
                out.append(prepare_bytes(data, self.cfg, self.limits))
            except ImageError as e:
                where = "IMAGE" if items.size == 1 else f"IMAGE[{i}]"
                return Rejected(e.reason, f"{where}: {e}")
        return np.stack(out)

    def check_parameters(self, raw: Any) -> Rejected | None:
        if self.defaults is None:
            return None
        try:
            decode_params(raw, self.defaults)
        except ParamError as e:
            return Rejected("bad_parameter", str(e))
        return None

    def run(self, images: Sequence[np.ndarray], parameters: Sequence[Any] | None = None) -> list[np.ndarray | Rejected]:
        """Per request: float32 [n, 3, S, S] for the encoder (uint8 [n, S, S, 3] when not
        `normalise`), or a Rejected for that request alone.

        A bad parameter is refused before the image is decoded: it is the cheaper check."""
        parameters = parameters if parameters is not None else [None] * len(images)
        prepared = [self.check_parameters(p) or self.prepare_request(x) for x, p in zip(images, parameters)]
        good = [i for i, p in enumerate(prepared) if not isinstance(p, Rejected)]
        if not good or not self.normalise:
            return prepared
        batch, sizes = concat([p for p in prepared if not isinstance(p, Rejected)])
        for i, part in zip(good, split(normalize(batch, self.cfg), sizes)):
            prepared[i] = part
        return prepared


@dataclass
class ImageEncoder:
    """Decode + encoder in one step (the `fused` CPU layout, one process hop fewer): every
    good image of the Triton batch goes through `engine` (onnxruntime session or OpenVINO
    engine) in one run; per request (h0, c0) or its Rejected."""

    pre: Preprocessor
    engine: Any
    outputs: tuple[str, ...] = ("h0", "c0")
    input_name: str = "image"

    def run(self, images: Sequence[np.ndarray], parameters: Sequence[Any] | None = None) -> list[tuple | Rejected]:
        prepared = self.pre.run(images, parameters)
        good = [i for i, p in enumerate(prepared) if not isinstance(p, Rejected)]
        # The Rejected in place; each good request's slot is filled with its outputs below.
        out: list[tuple | Rejected] = [p if isinstance(p, Rejected) else () for p in prepared]
        if not good:
            return out
        batch, sizes = concat([p for p in prepared if not isinstance(p, Rejected)])
        per_output = [split(np.asarray(o), sizes) for o in self.engine.run(list(self.outputs), {self.input_name: batch})]
        for k, i in enumerate(good):
            out[i] = tuple(o[k] for o in per_output)
        return out


def image_encoder(version_dir: Path, params: Mapping[str, str], outputs: Sequence[str]) -> ImageEncoder:
    """The fused and whole layouts' front, as one model version holds it: its encoder graph
    (`model.onnx`) through the runtime its config parameters name, behind a Preprocessor
    from its `preprocess.json`, limits and decoding defaults."""
    from . import runtime

    engine = runtime.load(version_dir / "model.onnx", runtime.EngineSettings.from_config(params, version_dir))
    pre = Preprocessor(
        cfg=PreprocessConfig.from_dict(json.loads((version_dir / "preprocess.json").read_text())),
        limits=limits_from_config(params),
        defaults=DecodeDefaults.from_config(params),
        normalise=runtime.input_dtype(engine, "image") != np.uint8,
    )
    return ImageEncoder(pre, engine, tuple(outputs))
