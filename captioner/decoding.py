"""Reference decoding over a decoder step, in numpy.

The same functions run in-process (torch or onnxruntime step) and inside the Triton
`caption_generator` model, so server and reference agree by construction. Every
loop iteration makes ONE batched step call for all live sequences of all images;
finished sequences drop out of the batch.

A step function maps (tokens int64 [N], h float32 [N,U], c float32 [N,U]) to
(log-probs float32 [N,V], h' [N,U], c' [N,U]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

MAX_BEAM = 10
MAX_LENGTH = 50


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, END excluded
    logprob: float  # total log-probability, END included when it was emitted
    finished: bool


@dataclass(frozen=True)
class DecodeParams:
    beam_size: int = 1
    max_length: int = 20
    temperature: float | None = None  # None: deterministic (greedy or beam)
    length_penalty: float = 0.7
    seed: int | None = None

    def validate(self) -> DecodeParams:
        if not 1 <= self.beam_size <= MAX_BEAM:
            raise ValueError(f"beam_size must be in 1..{MAX_BEAM}, got {self.beam_size}")
        if not 1 <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be in 1..{MAX_LENGTH}, got {self.max_length}")
        if self.temperature is not None:
            if not (np.isfinite(self.temperature) and 0.0 < self.temperature <= 100.0):
                raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
            if self.beam_size != 1:
                raise ValueError("temperature (sampling) cannot be combined with beam_size > 1")
        return self


def decode(step: StepFn, h0: np.ndarray, c0: np.ndarray, start: int, end: int, params: DecodeParams) -> list[Hypothesis]:
    params.validate()
    if params.temperature is not None:
        return sample(step, h0, c0, start, end, params.max_length, params.temperature, params.seed)
    if params.beam_size == 1:
        return greedy(step, h0, c0, start, end, params.max_length)
    return beam_search(step, h0, c0, start, end, params.beam_size, params.max_length, params.length_penalty)


def _run_per_token(step, h0, c0, start, end, max_length, choose) -> list[Hypothesis]:
    """Shared loop of greedy and sampling: one batched step per token for live rows."""
    n = h0.shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprob = np.zeros(n, np.float64)
    finished = np.zeros(n, bool)
    live = np.arange(n)
    cur = np.full(n, start, np.int64)
    h, c = np.asarray(h0, np.float32), np.asarray(c0, np.float32)
    for _ in range(max_length):
        logp, h, c = step(cur, h, c)
        nxt = choose(logp)
        logprob[live] += logp[np.arange(len(live)), nxt]
        done = nxt == end
        for row, tok, d in zip(live, nxt, done):
            if d:
                finished[row] = True
            else:
                tokens[row].append(int(tok))
        keep = ~done
        if not keep.any():
            break
        live, cur, h, c = live[keep], nxt[keep].astype(np.int64), h[keep], c[keep]
    return [Hypothesis(tuple(t), float(lp), bool(f)) for t, lp, f in zip(tokens, logprob, finished)]


def greedy(step: StepFn, h0, c0, start: int, end: int, max_length: int) -> list[Hypothesis]:
    return _run_per_token(step, h0, c0, start, end, max_length, lambda logp: np.argmax(logp, axis=1))


def sample(step: StepFn, h0, c0, start: int, end: int, max_length: int, temperature: float, seed=None):
    rng = np.random.default_rng(seed)

    def choose(logp):
        z = logp.astype(np.float64) / temperature
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random((p.shape[0], 1))
        return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)

    return _run_per_token(step, h0, c0, start, end, max_length, choose)


def _normalised(h: Hypothesis, alpha: float) -> float:
    length = len(h.tokens) + (1 if h.finished else 0)
    return h.logprob / (max(length, 1) ** alpha)


def beam_search(
    step: StepFn, h0, c0, start: int, end: int, beam_size: int, max_length: int, length_penalty: float = 0.7
) -> list[Hypothesis]:
    """Batched beam search with length normalisation (score / length**alpha).

    END candidates are accepted only from the top `beam_size` ranks, so beam 1 is
    exactly greedy. An image stops once it has `beam_size` finished hypotheses; beams
    that never emit END compete at `max_length` with their own normalised score."""
    n, u = h0.shape
    # Per live beam: owning image, tokens, logprob; rows of h/c follow the same order.
    owner = np.arange(n)
    seqs: list[tuple[int, ...]] = [() for _ in range(n)]
    scores = np.zeros(n, np.float64)
    cur = np.full(n, start, np.int64)
    h, c = np.asarray(h0, np.float32), np.asarray(c0, np.float32)
    done: list[list[Hypothesis]] = [[] for _ in range(n)]
    closed = np.zeros(n, bool)
    for t in range(max_length):
        logp, h, c = step(cur, h, c)
        cand = scores[:, None] + logp.astype(np.float64)  # [M, V]
        v = cand.shape[1]
        new_rows, new_owner, new_seqs, new_scores, new_tok = [], [], [], [], []
        for img in np.unique(owner):
            rows = np.nonzero(owner == img)[0]
            flat = cand[rows].ravel()
            k = min(2 * beam_size, flat.size)
            top = np.argpartition(-flat, k - 1)[:k]
            top = top[np.lexsort((top, -flat[top]))]  # by score, ties to the lower index (as argmax)
            alive = 0
            for rank, idx in enumerate(top):
                r, tok = rows[idx // v], int(idx % v)
                if tok == end:
                    if rank < beam_size:
                        done[img].append(Hypothesis(seqs[r], float(flat[idx]), True))
                    continue
                new_rows.append(r)
                new_owner.append(img)
                new_seqs.append(seqs[r] + (tok,))
                new_scores.append(flat[idx])
                new_tok.append(tok)
                alive += 1
                if alive == beam_size:
                    break
            if len(done[img]) >= beam_size:
                closed[img] = True
        keep = [i for i, o in enumerate(new_owner) if not closed[o]]
        if t == max_length - 1:
            for i, o in enumerate(new_owner):
                if not closed[o]:
                    done[o].append(Hypothesis(new_seqs[i], float(new_scores[i]), False))
            break
        if not keep:
            break
        sel = np.asarray([new_rows[i] for i in keep])
        owner = np.asarray([new_owner[i] for i in keep])
        seqs = [new_seqs[i] for i in keep]
        scores = np.asarray([new_scores[i] for i in keep], np.float64)
        cur = np.asarray([new_tok[i] for i in keep], np.int64)
        h, c = h[sel], c[sel]
    return [max(hs, key=lambda x: _normalised(x, length_penalty)) for hs in done]


def torch_step(decoder, device=None) -> StepFn:
    """A numpy step function over a torch `Decoder` (the in-process reference), on the
    decoder's device (`device`; default the CPU)."""
    import torch

    def step(tokens, h, c):
        with torch.inference_mode():
            args = (torch.from_numpy(t) for t in (tokens, h, c))
            logp, h2, c2 = decoder.step(*(t.to(device) for t in args) if device is not None else args)
        return logp.cpu().numpy(), h2.cpu().numpy(), c2.cpu().numpy()

    return step


def onnx_step(session) -> StepFn:
    """A numpy step function over an onnxruntime session of the decoder-step graph."""

    def step(tokens, h, c):
        logp, h2, c2 = session.run(["log_probs", "h_out", "c_out"], {"tokens": tokens, "h": h, "c": c})
        return logp, h2, c2

    return step


def texts(hyps: Sequence[Hypothesis], vocab) -> list[str]:
    return [vocab.decode(h.tokens) for h in hyps]
