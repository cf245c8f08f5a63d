"""Triton model `preprocess` of the whole CPU layout: IMAGE -> CAPTION, SCORE, MODEL_VERSION.

Decode, the encoder and the batched decode loop in one process: one Python-backend hop
and one batcher per request (the fused layout takes two). The front model keeps its name
(`preprocess`), its queue policy and its request checks; captioner.serving.whole composes
the fused layout's ImageEncoder with caption_generator's generate()."""

import triton_python_backend_utils as pb_utils

from captioner.decoding import onnx_step
from captioner.serving import runtime
from captioner.serving.preprocess import REJECT_REASONS, image_encoder
from captioner.serving.triton import (
    ExecuteClock,
    OutputMetrics,
    RejectMetrics,
    image_responses,
    model_config,
    read_json,
    skip_cancelled,
    version_dir,
)
from captioner.serving.versions import OUTPUT as MODEL_VERSION
from captioner.serving.versions import label, parameters
from captioner.serving.whole import WholeCaptioner
from captioner.vocab import Vocabulary

OUTPUTS = ("CAPTION", "SCORE", MODEL_VERSION)
ENCODER_OUTPUTS = ("h0", "c0")


class TritonPythonModel:
    def initialize(self, args):
        self.clock = ExecuteClock.from_args(args)
        here = version_dir(args)
        params = parameters(model_config(args), here)
        self.version = label(args["model_version"], params["checkpoint_sha256"])
        step = runtime.load(here / "decoder_step.onnx", runtime.EngineSettings.from_config(params, here, prefix="step_"))
        self.captioner = WholeCaptioner(
            image_encoder(here, params, ENCODER_OUTPUTS), onnx_step(step), Vocabulary(read_json(here / "vocab.json"))
        )
        self.rejects = RejectMetrics(pb_utils, REJECT_REASONS)
        self.produced = OutputMetrics(pb_utils, self.version).produced

    def execute(self, requests):
        with self.clock:  # the supervisor's hang check: since when this instance is in execute
            return skip_cancelled(pb_utils, requests, self._execute)

    def _execute(self, requests):
        return image_responses(pb_utils, requests, self._run, OUTPUTS, self.rejects, "preprocess")

    def _run(self, images, request_parameters):
        return self.captioner.arrays(images, request_parameters, self.version, self.produced)
