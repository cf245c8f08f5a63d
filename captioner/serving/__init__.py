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


@dataclass(frozen=True)
class Rejected:
    """One request's error: `message` goes to the client, `reason` is a metric label."""

    reason: str
    message: str
