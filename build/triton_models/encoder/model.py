"""Triton model `encoder` on CPU: image (float32 [3, S, S]) -> h0, c0 through onnxruntime.

Every request of the Triton batch is stacked into one tensor and run once. On GPU the
repository uses a TensorRT plan instead of this model."""
import triton_python_backend_utils as pb_utils

from captioner.serving.ort import OrtSettings, session
from captioner.serving.triton import batched_responses, config_parameters, model_config, version_dir


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.session = session(version_dir(args) / "model.onnx", OrtSettings.from_config(config_parameters(config)))

    def _run(self, *arrays):
        return self.session.run(self.outputs, dict(zip(self.inputs, arrays)))

    def execute(self, requests):
        return batched_responses(pb_utils, requests, self._run, self.inputs, self.outputs, "encoder")
