"""Triton model `preprocess`: IMAGE (encoded bytes) -> image: float32 [3, S, S], or
uint8 [S, S, 3] when the encoder graph normalises (parameter `output_type`).

Decodes with Pillow through captioner.preprocess, the function training uses, and
checks the request parameters first: every bad input is refused here, per request,
before any model runs. The logic lives in captioner.serving.preprocess."""
import triton_python_backend_utils as pb_utils

from captioner.preprocess import PreprocessConfig
from captioner.serving import Rejected
from captioner.serving.params import DecodeDefaults
from captioner.serving.preprocess import REJECT_REASONS, Preprocessor, limits_from_config
from captioner.serving.triton import (
    RejectMetrics,
    config_parameters,
    input_array,
    internal_error_responses,
    model_config,
    read_json,
    rejected_response,
    skip_cancelled,
    version_dir,
)


class TritonPythonModel:
    def initialize(self, args):
        params = config_parameters(model_config(args))
        self.pre = Preprocessor(
            cfg=PreprocessConfig.from_dict(read_json(version_dir(args) / "preprocess.json")),
            limits=limits_from_config(params),
            defaults=DecodeDefaults.from_config(params),
            normalise=params.get("output_type", "float32") == "float32",
        )
        self.metrics = RejectMetrics(pb_utils, REJECT_REASONS)

    def execute(self, requests):
        return skip_cancelled(pb_utils, requests, self._execute)

    def _execute(self, requests):
        try:
            images = [input_array(pb_utils, r, "IMAGE") for r in requests]
            results = self.pre.run(images, [r.parameters() for r in requests])
        except Exception as e:  # a bug, not a bad input: log it, fail this batch only
            return internal_error_responses(pb_utils, len(requests), "preprocess", e)
        responses = []
        for result in results:
            if isinstance(result, Rejected):
                self.metrics.rejected(result.reason)
                responses.append(rejected_response(pb_utils, result))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", result)]))
        return responses
