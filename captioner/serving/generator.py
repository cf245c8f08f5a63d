"""The `caption_generator` model's work: (h0, c0) of every request in a Triton batch ->
captions, with one batched decoder step per token for all live sequences.

Requests whose decoding parameters are equal are merged into one batch and decoded by
captioner.decoding.decode (the reference's own loop), so the server produces exactly
what the in-process reference produces. Requests with different parameters (beam
size, max length, temperature) decode in separate groups within the same execution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..decoding import DecodeParams, StepFn, decode, texts
from ..vocab import Vocabulary
from .batching import concat

STEP_INPUTS = ("tokens", "h", "c")
STEP_OUTPUTS = ("log_probs", "h_out", "c_out")
STEP_MODES = ("inprocess", "bls")


@dataclass
class GenRequest:
    h0: np.ndarray  # float32 [n, U]
    c0: np.ndarray  # float32 [n, U]
    params: DecodeParams


@dataclass
class Captions:
    texts: list[str]
    scores: np.ndarray  # float32 [n]: total log-probability, END included when emitted
    tokens: int  # caption tokens produced, END excluded


def generate(step: StepFn, vocab: Vocabulary, requests: Sequence[GenRequest]) -> list[Captions]:
    groups: dict[DecodeParams, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.params, []).append(i)
    out: list[Captions | None] = [None] * len(requests)
    for params, members in groups.items():
        h0, sizes = concat([np.asarray(requests[i].h0, np.float32) for i in members])
        c0, _ = concat([np.asarray(requests[i].c0, np.float32) for i in members])
        hyps = decode(step, h0, c0, vocab.start, vocab.end, params)
        bounds = np.cumsum([0] + sizes)
        for i, lo, hi in zip(members, bounds[:-1], bounds[1:]):
            part = hyps[lo:hi]
            out[i] = Captions(
                texts=texts(part, vocab),
                scores=np.asarray([h.logprob for h in part], np.float32),
                tokens=sum(len(h.tokens) for h in part),
            )
    return out  # type: ignore[return-value]


def caption_arrays(out: Captions, version: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One request's CAPTION (UTF-8 bytes), SCORE and MODEL_VERSION tensors, [n, 1] each."""
    caption = np.array([t.encode("utf-8") for t in out.texts], dtype=np.object_).reshape(-1, 1)
    version_rows = np.full((len(out.texts), 1), version.encode(), dtype=np.object_)
    return caption, out.scores.reshape(-1, 1), version_rows


def bls_step(pb_utils, model_name: str = "decoder_step", model_version: int = -1) -> StepFn:
    """A step function that calls the `decoder_step` Triton model through BLS: version
    `model_version` (-1: the latest loaded; a versioned repository passes the caller's own).

    Outputs are asked for in CPU memory so that a GPU decoder_step works unchanged."""
    memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def step(tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        request = pb_utils.InferenceRequest(
            model_name=model_name,
            model_version=model_version,
            requested_output_names=list(STEP_OUTPUTS),
            inputs=[
                pb_utils.Tensor("tokens", np.ascontiguousarray(tokens, np.int64).reshape(-1, 1)),
                pb_utils.Tensor("h", np.ascontiguousarray(h, np.float32)),
                pb_utils.Tensor("c", np.ascontiguousarray(c, np.float32)),
            ],
            preferred_memory=memory,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model_name} failed: {response.error().message()}")
        return tuple(pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in STEP_OUTPUTS)

    return step
