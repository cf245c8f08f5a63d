"""Triton model `decoder_step` on CPU: (tokens, h, c) -> (log_probs, h_out, c_out)
through onnxruntime or OpenVINO (config parameter `runtime`), every request stacked into one run. On GPU the repository serves
the same ONNX graph with the onnxruntime backend instead."""

import triton_python_backend_utils as pb_utils

from captioner.serving import runtime
from captioner.serving.triton import ExecuteClock, batched_responses, model_config, version_dir
from captioner.serving.versions import parameters


class TritonPythonModel:
    def initialize(self, args):
        self.clock = ExecuteClock.from_args(args)
        config = model_config(args)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        settings = runtime.EngineSettings.from_config(parameters(config, version_dir(args)), version_dir(args))
        self.session = runtime.load(version_dir(args) / "model.onnx", settings)

    def _run(self, tokens, h, c):
        # The config carries tokens as [batch, 1] (Triton needs a non-empty shape); the graph takes [batch].
        return self.session.run(self.outputs, dict(zip(self.inputs, (tokens.reshape(-1), h, c))))

    def execute(self, requests):
        with self.clock:  # the supervisor's hang check: since when this instance is in execute
            return batched_responses(pb_utils, requests, self._run, self.inputs, self.outputs, "decoder_step")
