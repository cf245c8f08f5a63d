"""Parity of the exported graphs with the torch model they came from.

The build runs these checks before it assembles a repository, and the unit tests run
the same functions, so a graph that drifts from torch fails in both places. Each check
returns figures (max abs differences, caption agreement) rather than a bare boolean:
the build prints them and records them in the manifest."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from captioner import scenes
from captioner.checkpoint import Checkpoint
from captioner.decoding import greedy, onnx_step, torch_step
from captioner.preprocess import PreprocessConfig, normalize, prepare

TOLERANCE = 1e-4  # fp32 max abs difference, every output
BATCH_SIZES = (1, 7)
CAPTION_SCENES = 200

# (image float32 [N,3,S,S]) -> (h0, c0)
EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Diff:
    graph: str  # "encoder" | "decoder_step" | "engine"
    inputs: str  # "random" | "scenes"
    batch: int
    max_abs: dict[str, float]  # per output tensor
    ref_max: float = 0.0  # largest |value| of the reference outputs, for relative tolerances

    @property
    def worst(self) -> float:
        return max(self.max_abs.values())


@dataclass
class CaptionParity:
    total: int
    identical: int
    examples: list[dict] = field(default_factory=list)  # first few mismatches, for the log

    @property
    def share(self) -> float:
        return self.identical / self.total if self.total else 0.0


@dataclass
class ParityReport:
    diffs: list[Diff]
    captions: CaptionParity | None
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        tensors_ok = all(d.worst <= self.tolerance for d in self.diffs)
        captions_ok = self.captions is None or self.captions.identical == self.captions.total
        return tensors_ok and captions_ok

    def lines(self) -> list[str]:
        out = []
        for d in self.diffs:
            figures = "  ".join(f"{k}={v:.2e}" for k, v in d.max_abs.items())
            verdict = "ok" if d.worst <= self.tolerance else f"OVER {self.tolerance:.0e}"
            out.append(f"{d.graph:<12} batch {d.batch:<2} {d.inputs:<7} max|diff| {figures}  {verdict}")
        if self.captions is not None:
            c = self.captions
            out.append(f"greedy captions onnx == torch: {c.identical}/{c.total} scenes")
            for ex in c.examples:
                out.append(f"  differs: torch {ex['torch']!r} vs onnx {ex['onnx']!r}")
        return out

    def to_dict(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "passed": self.passed,
            "tensors": [asdict(d) for d in self.diffs],
            "captions": None
            if self.captions is None
            else {
                "total": self.captions.total,
                "identical": self.captions.identical,
                "examples": self.captions.examples,
            },
        }


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def scene_batch(n: int, cfg: PreprocessConfig, seed: int = 0) -> tuple[np.ndarray, list[scenes.Scene]]:
    """`n` shapes-v1 scenes drawn with a fixed seed, prepared by THE preprocessing:
    uint8 [n, S, S, 3] and the ground-truth scenes."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    drawn = [scenes.random_scene(rng) for _ in range(n)]
    images = np.stack([prepare(scenes.render(s, nrng), cfg) for s in drawn])
    return images, drawn


def random_images(n: int, cfg: PreprocessConfig, seed: int = 0) -> np.ndarray:
    """Float images in the normalised domain the encoder sees (roughly unit scale)."""
    s = cfg.image_size
    return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)


def torch_encode(ck: Checkpoint) -> EncodeFn:
    def encode(x: np.ndarray):
        with torch.inference_mode():
            h0, c0 = ck.model.encoder(torch.from_numpy(x))
        return h0.numpy(), c0.numpy()

    return encode


def onnx_encode(sess: ort.InferenceSession) -> EncodeFn:
    def encode(x: np.ndarray):
        h0, c0 = sess.run(["h0", "c0"], {"image": x})
        return h0, c0

    return encode


def _max_abs(a: Sequence[np.ndarray], b: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, float]:
    out = {}
    for name, x, y in zip(names, a, b):
        if x.shape != y.shape:
            raise AssertionError(f"{name}: shape {x.shape} vs {y.shape}")
        out[name] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
    return out


def encoder_diffs(
    ck: Checkpoint,
    candidate: EncodeFn,
    graph: str = "encoder",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seed: int = 0,
    reference: EncodeFn | None = None,
) -> list[Diff]:
    """`candidate` against `reference` (default: the torch encoder) on random inputs
    and on real scenes."""
    reference = reference or torch_encode(ck)
    cfg = ck.preprocess
    diffs = []
    for b in batch_sizes:
        real, _ = scene_batch(b, cfg, seed=seed + b)
        for kind, x in (("random", random_images(b, cfg, seed=seed + b)), ("scenes", normalize(real, cfg))):
            ref = reference(x)
            ref_max = float(max(np.abs(r).max() for r in ref))
            diffs.append(Diff(graph, kind, b, _max_abs(candidate(x), ref, ("h0", "c0")), ref_max))
    return diffs


def decoder_diffs(
    ck: Checkpoint, sess: ort.InferenceSession, batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0
) -> list[Diff]:
    """The decoder-step graph against torch's `Decoder.step`: random tokens and states,
    and the states real scenes produce with the START token (the first step of decoding)."""
    ref, cand = torch_step(ck.model.decoder), onnx_step(sess)
    v, u = ck.args.vocab_size, ck.args.lstm_units
    names = ("log_probs", "h_out", "c_out")
    diffs = []
    for b in batch_sizes:
        rng = np.random.default_rng(seed + b)
        tokens = rng.integers(0, v, size=b, dtype=np.int64)
        h, c = (rng.standard_normal((b, u)).astype(np.float32) * 0.5 for _ in range(2))
        diffs.append(Diff("decoder_step", "random", b, _max_abs(cand(tokens, h, c), ref(tokens, h, c), names)))
        real, _ = scene_batch(b, ck.preprocess, seed=seed + b)
        h0, c0 = torch_encode(ck)(normalize(real, ck.preprocess))
        start = np.full(b, ck.vocab.start, np.int64)
        diffs.append(Diff("decoder_step", "scenes", b, _max_abs(cand(start, h0, c0), ref(start, h0, c0), names)))
    return diffs


def greedy_tokens(
    ck: Checkpoint, encode: EncodeFn, step, images_uint8: np.ndarray, batch_size: int = 64, desc: str | None = None
) -> list[tuple[int, ...]]:
    """Greedy token sequences for prepared uint8 images, through any encoder and step."""
    from tqdm import tqdm

    out: list[tuple[int, ...]] = []
    starts = range(0, len(images_uint8), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", mininterval=2.0, leave=False, disable=desc is None):
        h0, c0 = encode(normalize(images_uint8[i : i + batch_size], ck.preprocess))
        hyps = greedy(step, h0, c0, ck.vocab.start, ck.vocab.end, ck.args.max_length)
        out += [h.tokens for h in hyps]
    return out


def caption_parity(
    ck: Checkpoint, enc_sess: ort.InferenceSession, dec_sess: ort.InferenceSession, n: int = CAPTION_SCENES, seed: int = 1000
) -> CaptionParity:
    """Greedy captions through both ONNX graphs against torch's, scene by scene."""
    images, _ = scene_batch(n, ck.preprocess, seed=seed)
    ref = greedy_tokens(ck, torch_encode(ck), torch_step(ck.model.decoder), images, desc="greedy captions, torch")
    got = greedy_tokens(ck, onnx_encode(enc_sess), onnx_step(dec_sess), images, desc="greedy captions, onnx")
    same = [a == b for a, b in zip(ref, got)]
    examples = [{"torch": ck.vocab.decode(a), "onnx": ck.vocab.decode(b)} for a, b, s in zip(ref, got, same) if not s][:3]
    return CaptionParity(total=n, identical=int(sum(same)), examples=examples)


def check_exports(
    ck: Checkpoint,
    encoder_onnx: str | Path,
    decoder_onnx: str | Path,
    caption_scenes: int = CAPTION_SCENES,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> ParityReport:
    enc, dec = session(encoder_onnx), session(decoder_onnx)
    diffs = encoder_diffs(ck, onnx_encode(enc), batch_sizes=batch_sizes) + decoder_diffs(ck, dec, batch_sizes)
    captions = caption_parity(ck, enc, dec, n=caption_scenes) if caption_scenes else None
    return ParityReport(diffs, captions)
