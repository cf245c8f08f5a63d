"""Triton-free logic behind the Triton models in builder/triton_models/.

Each model.py only moves tensors between Triton and these functions, so everything
that decides an answer (parameter validation, decoding images, batching, decoding
captions, error messages) is reachable by unit tests without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

# The Triton models' names: builder.repository writes them, the launcher (which runs in
# serving images without the build package) drains the ensemble by name.
ENSEMBLE = "captioner"
PREPROCESS, ENCODER, DECODER_STEP, GENERATOR = "preprocess", "encoder", "decoder_step", "caption_generator"
# The encoder precisions a repository is built with (its configs' `precision` parameter):
# fp16 is TensorRT's (GPU only), bf16 OpenVINO's inference-precision hint (CPU only). The
# build checks them and the launcher passes one on to the build.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Rejected:
    """One request's error: `message` goes to the client, `reason` is a metric label."""

    reason: str
    message: str
