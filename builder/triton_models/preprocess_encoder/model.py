"""Triton model `preprocess` of the fused CPU layout: IMAGE (encoded bytes) -> h0, c0.

Decode (captioner.preprocess, with every request check of the split layout's
preprocess model) and the encoder (onnxruntime or OpenVINO, parameter `runtime`) in
one process: for a small encoder the hop between two Python models costs more than
the encoder (docs/bench.md). The logic lives in captioner.serving.preprocess.ImageEncoder."""

import triton_python_backend_utils as pb_utils

from captioner.serving.preprocess import REJECT_REASONS, image_encoder
from captioner.serving.triton import (
    ExecuteClock,
    RejectMetrics,
    image_responses,
    model_config,
    skip_cancelled,
    version_dir,
)
from captioner.serving.versions import parameters


class TritonPythonModel:
    def initialize(self, args):
        self.clock = ExecuteClock.from_args(args)
        config = model_config(args)
        here = version_dir(args)
        params = parameters(config, here)
        self.outputs = tuple(t["name"] for t in config["output"])
        self.encoder = image_encoder(here, params, self.outputs)
        self.metrics = RejectMetrics(pb_utils, REJECT_REASONS)

    def execute(self, requests):
        with self.clock:  # the supervisor's hang check: since when this instance is in execute
            return skip_cancelled(pb_utils, requests, self._execute)

    def _execute(self, requests):
        return image_responses(pb_utils, requests, self.encoder.run, self.outputs, self.metrics, "preprocess")
