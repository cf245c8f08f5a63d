"""Triton model `preprocess`: IMAGE (encoded bytes) -> image: float32 [3, S, S], or
uint8 [S, S, 3] when the encoder graph normalises (parameter `output_type`).

Decodes with Pillow through captioner.preprocess, the function training uses, and
checks the request parameters first: every bad input is refused here, per request,
before any model runs. The logic lives in captioner.serving.preprocess."""

import triton_python_backend_utils as pb_utils

from captioner.preprocess import PreprocessConfig
from captioner.serving.params import DecodeDefaults
from captioner.serving.preprocess import REJECT_REASONS, Preprocessor, limits_from_config
from captioner.serving.triton import (
    ExecuteClock,
    RejectMetrics,
    image_responses,
    model_config,
    read_json,
    skip_cancelled,
    version_dir,
)
from captioner.serving.versions import parameters


class TritonPythonModel:
    def initialize(self, args):
        self.clock = ExecuteClock.from_args(args)
        params = parameters(model_config(args), version_dir(args))
        self.pre = Preprocessor(
            cfg=PreprocessConfig.from_dict(read_json(version_dir(args) / "preprocess.json")),
            limits=limits_from_config(params),
            defaults=DecodeDefaults.from_config(params),
            normalise=params.get("output_type", "float32") == "float32",
        )
        self.metrics = RejectMetrics(pb_utils, REJECT_REASONS)

    def execute(self, requests):
        with self.clock:  # the supervisor's hang check: since when this instance is in execute
            return skip_cancelled(pb_utils, requests, self._execute)

    def _execute(self, requests):
        return image_responses(pb_utils, requests, self.pre.run, ("image",), self.metrics, "preprocess")
