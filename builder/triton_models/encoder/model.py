"""Triton model `encoder` on CPU: image -> h0, c0 through onnxruntime or OpenVINO (the
build's choice, config parameter `runtime`). The image is float32 [3, S, S], or uint8
[S, S, 3] when the graph normalises inside (parameter `output_type` of preprocess).

Every request of the Triton batch is stacked into one tensor and run once. On GPU the
repository uses a TensorRT plan instead of this model."""

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

    def _run(self, *arrays):
        return self.session.run(self.outputs, dict(zip(self.inputs, arrays)))

    def execute(self, requests):
        with self.clock:  # the supervisor's hang check: since when this instance is in execute
            return batched_responses(pb_utils, requests, self._run, self.inputs, self.outputs, "encoder")
