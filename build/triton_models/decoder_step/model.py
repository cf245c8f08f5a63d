"""Triton model `decoder_step` on CPU: (tokens, h, c) -> (log_probs, h_out, c_out)
through onnxruntime, every request stacked into one run. On GPU the repository serves
the same ONNX graph with the onnxruntime backend instead."""
import triton_python_backend_utils as pb_utils

from captioner.serving.batching import run_batched
from captioner.serving.ort import OrtSettings, session
from captioner.serving.triton import config_parameters, input_array, internal_error_responses, model_config, version_dir


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.session = session(version_dir(args) / "model.onnx", OrtSettings.from_config(config_parameters(config)))

    def _run(self, tokens, h, c):
        # The config carries tokens as [batch, 1] (Triton needs a non-empty shape); the graph takes [batch].
        return self.session.run(self.outputs, dict(zip(self.inputs, (tokens.reshape(-1), h, c))))

    def execute(self, requests):
        try:
            per_request = run_batched(self._run, [[input_array(pb_utils, r, n) for n in self.inputs] for r in requests])
        except Exception as e:
            return internal_error_responses(pb_utils, len(requests), "decoder_step", e)
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in zip(self.outputs, arrays)])
            for arrays in per_request
        ]
