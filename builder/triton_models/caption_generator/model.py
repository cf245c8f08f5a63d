"""Triton model `caption_generator`: (h0, c0) -> CAPTION, SCORE, MODEL_VERSION.

One execution merges every request of its batch, groups them by decoding parameters
and runs captioner.decoding (one batched decoder step per token for all live
sequences) once per group. The step runs in this process through onnxruntime or
OpenVINO (`step_mode: inprocess`, parameter `runtime`) or calls the `decoder_step` model through BLS
(`step_mode: bls`); the README explains the choice. MODEL_VERSION names this model version and
its checkpoint (captioner.serving.versions)."""

import triton_python_backend_utils as pb_utils

from captioner.decoding import onnx_step
from captioner.serving import Rejected, runtime
from captioner.serving.generator import GenRequest, bls_step, caption_arrays, generate
from captioner.serving.params import DecodeDefaults, ParamError, decode_params
from captioner.serving.triton import (
    ExecuteClock,
    OutputMetrics,
    input_array,
    internal_error_responses,
    model_config,
    read_json,
    rejected_response,
    skip_cancelled,
    version_dir,
)
from captioner.serving.versions import OUTPUT as MODEL_VERSION
from captioner.serving.versions import label, parameters
from captioner.vocab import Vocabulary


class TritonPythonModel:
    def initialize(self, args):
        self.clock = ExecuteClock.from_args(args)
        here = version_dir(args)
        params = parameters(model_config(args), here)
        self.version = label(args["model_version"], params["checkpoint_sha256"])
        self.vocab = Vocabulary(read_json(here / "vocab.json"))
        self.defaults = DecodeDefaults.from_config(params)
        mode = params.get("step_mode", "inprocess")
        if mode == "inprocess":
            settings = runtime.EngineSettings.from_config(params, here)
            self.step = onnx_step(runtime.load(here / "decoder_step.onnx", settings))
        elif mode == "bls":
            # The decoder_step of this same version: never another version's graph.
            self.step = bls_step(pb_utils, params.get("step_model", "decoder_step"), int(args["model_version"]))
        else:
            raise ValueError(f"step_mode must be inprocess or bls, got {mode!r}")
        self.metrics = OutputMetrics(pb_utils, self.version)

    def _parse(self, request):
        try:
            params = decode_params(request.parameters(), self.defaults)
        except ParamError as e:
            return Rejected("bad_parameter", str(e))
        return GenRequest(input_array(pb_utils, request, "h0"), input_array(pb_utils, request, "c0"), params)

    def execute(self, requests):
        with self.clock:  # the supervisor's hang check: since when this instance is in execute
            return skip_cancelled(pb_utils, requests, self._execute)

    def _execute(self, requests):
        try:
            parsed = [self._parse(r) for r in requests]
            good = [p for p in parsed if not isinstance(p, Rejected)]
            results = iter(generate(self.step, self.vocab, good))
        except Exception as e:
            return internal_error_responses(pb_utils, len(requests), "caption_generator", e)
        responses = []
        for p in parsed:
            if isinstance(p, Rejected):
                responses.append(rejected_response(pb_utils, p))
                continue
            out = next(results)
            self.metrics.produced(len(out.texts), out.tokens)
            arrays = caption_arrays(out, self.version)
            tensors = [pb_utils.Tensor(n, a) for n, a in zip(("CAPTION", "SCORE", MODEL_VERSION), arrays)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
