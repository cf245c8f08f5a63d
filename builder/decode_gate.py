"""The gate of the fast decode path (captioner.preprocess, `PreprocessConfig.decode`), like
the reduced-precision gates of builder/quantize.py: on scenes the model has never seen,
re-encoded as the photos callers send (captioner/photos.py: about 1024 px, JPEG q90 and
PNG, some stored turned with an EXIF orientation tag), greedy captions through the fast
path must be identical to the exact path's on at least MIN_AGREEMENT of the images, and
the share correct by the spec's rule (captioner.scenes.caption_is_correct) must not drop.

The build runs it when asked for the fast path (`--decode fast`, the default), records
the outcome in build_manifest.json, and serves the exact path when it fails. An image
whose prepared pixels are identical on both paths (e.g. a PNG under twice the rule's
side: nothing to reduce) agrees without being captioned."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from captioner import scenes
from captioner.checkpoint import Checkpoint
from captioner.photos import Photo, encode_photo
from captioner.preprocess import DECODES, PreprocessConfig, prepare_bytes

MIN_AGREEMENT = 0.99
GATE_SCENES = 240  # JPEGs; every PNG_EVERY-th scene also as PNG: 320 images
PNG_EVERY = 3
GATE_SEED = 180_018  # distinct from the parity, calibration and evaluation seeds
# Cycled over the scenes: photo sides around 1024 (1000 is no multiple of the 8 px DCT
# block nor of the box reductions) and EXIF orientations (1 = none; 3, 6, 8 = turned).
SIDES = (1024, 1000, 768, 1024)
ORIENTATIONS = (1, 6, 1, 3, 1, 8)

# prepared uint8 [N, S, S, 3] -> greedy token sequences
TokensFn = Callable[[np.ndarray], list[tuple[int, ...]]]


def gate_set(n: int = GATE_SCENES, seed: int = GATE_SEED) -> list[Photo]:
    """`n` fresh scenes as JPEG q90 photos, every PNG_EVERY-th also as a PNG photo (fast
    compression: lossless, so the same pixels as any level), sides and orientations
    cycled."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out: list[Photo] = []
    for i in range(n):
        scene = scenes.random_scene(rng)
        img = scenes.render(scene, nrng)
        side, turn = SIDES[i % len(SIDES)], ORIENTATIONS[i % len(ORIENTATIONS)]
        out.append(Photo(encode_photo(img, "jpeg", side, orientation=turn), "jpeg", side, turn, scene))
        if i % PNG_EVERY == 0:
            png = encode_photo(img, "png", side, orientation=turn, png_compress_level=1)
            out.append(Photo(png, "png", side, turn, scene))
    return out


@dataclass
class GateReport:
    total: int
    agree: int
    identical_pixels: int  # images prepared bit-identically by both paths
    exact_correct: int
    fast_correct: int
    by_kind: dict[str, dict[str, int]]  # "jpeg" / "png" / "turned" -> total, agree
    evaluated_on: str
    min_agreement: float = MIN_AGREEMENT
    examples: list[dict] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.agree / self.total if self.total else 0.0

    @property
    def passed(self) -> bool:
        return self.share >= self.min_agreement and self.fast_correct >= self.exact_correct

    def lines(self) -> list[str]:
        verdict = "PASSED" if self.passed else "REFUSED"
        out = [
            f"greedy captions fast == exact decode on {self.evaluated_on}: {self.agree}/{self.total} = "
            f"{self.share:.2%} (needs {self.min_agreement:.0%})",
            f"captions correct by the scene spec: exact {self.exact_correct}/{self.total} = "
            f"{self.exact_correct / self.total:.2%}, fast {self.fast_correct}/{self.total} = "
            f"{self.fast_correct / self.total:.2%} (must not drop)",
            "by kind: "
            + ", ".join(f"{k} {v['agree']}/{v['total']}" for k, v in self.by_kind.items())
            + f"; {self.identical_pixels} images prepared identically by both paths",
        ]
        out += [f"  differs: exact {e['exact']!r} vs fast {e['fast']!r} ({e['image']})" for e in self.examples]
        out.append(f"fast decode {verdict}")
        return out

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "total": self.total,
            "agree": self.agree,
            "share": self.share,
            "min_agreement": self.min_agreement,
            "identical_pixels": self.identical_pixels,
            "exact_correct": self.exact_correct,
            "fast_correct": self.fast_correct,
            "exact_correct_share": self.exact_correct / self.total if self.total else None,
            "fast_correct_share": self.fast_correct / self.total if self.total else None,
            "by_kind": self.by_kind,
            "evaluated_on": self.evaluated_on,
            "examples": self.examples,
        }


@functools.lru_cache(maxsize=2)
def prepared(cfg: PreprocessConfig, n: int = GATE_SCENES, seed: int = GATE_SEED) -> tuple:
    """(exact uint8 [N, S, S, 3], fast uint8 [N, S, S, 3], the photos without their bytes):
    the gate set prepared on both paths for `cfg`'s model input, kept for the next build
    in the same process (the unit tests build several times)."""
    photos = gate_set(n, seed)
    exact = np.stack([prepare_bytes(ph.data, replace(cfg, decode="exact")) for ph in photos])
    fast = np.stack([prepare_bytes(ph.data, replace(cfg, decode="fast")) for ph in photos])
    for a in (exact, fast):
        a.setflags(write=False)
    return exact, fast, tuple(replace(ph, data=b"") for ph in photos)


def torch_tokens(ck: Checkpoint) -> TokensFn:
    """Greedy tokens through the checkpoint's own torch model."""
    from captioner.decoding import torch_step

    from . import parity

    encode, step = parity.torch_encode(ck), torch_step(ck.model.decoder)
    return lambda images: parity.greedy_tokens(ck, encode, step, images)


def check(
    ck: Checkpoint,
    tokens: TokensFn | None = None,
    n: int = GATE_SCENES,
    seed: int = GATE_SEED,
    min_agreement: float = MIN_AGREEMENT,
) -> GateReport:
    """Prepare every gate image on both paths, caption the ones whose pixels differ, and
    compare: agreement of the greedy token sequences, and correctness of each path."""
    tokens = tokens or torch_tokens(ck)
    exact, fast, images = prepared(replace(ck.preprocess, decode="exact"), n, seed)
    same = np.array([np.array_equal(a, b) for a, b in zip(exact, fast)])
    ref = tokens(exact)
    got: list[tuple[int, ...]] = list(ref)
    differ = np.flatnonzero(~same)
    if len(differ):
        for i, t in zip(differ, tokens(fast[differ])):
            got[i] = t
    agree = [a == b for a, b in zip(ref, got)]
    exact_ok = [scenes.caption_is_correct(ck.vocab.decode(t), ph.scene) for t, ph in zip(ref, images)]
    fast_ok = [scenes.caption_is_correct(ck.vocab.decode(t), ph.scene) for t, ph in zip(got, images)]
    by_kind: dict[str, dict[str, int]] = {}
    for ph, ok in zip(images, agree):
        for kind in (ph.fmt,) + (("turned",) if ph.orientation != 1 else ()):
            k = by_kind.setdefault(kind, {"total": 0, "agree": 0})
            k["total"] += 1
            k["agree"] += int(ok)
    examples = [
        {"exact": ck.vocab.decode(a), "fast": ck.vocab.decode(b), "image": ph.label}
        for a, b, ph in zip(ref, got, images)
        if a != b
    ][:3]
    n_jpeg = sum(ph.fmt == "jpeg" for ph in images)
    where = (
        f"{len(images)} fresh scenes as photos ({n_jpeg} JPEG q90, {len(images) - n_jpeg} PNG; "
        f"sides {'/'.join(map(str, sorted(set(SIDES))))} px; {by_kind.get('turned', {}).get('total', 0)} "
        "with an EXIF orientation)"
    )
    return GateReport(
        len(images),
        int(sum(agree)),
        int(same.sum()),
        int(sum(exact_ok)),
        int(sum(fast_ok)),
        by_kind,
        where,
        min_agreement,
        examples,
    )


def choose(
    ck: Checkpoint,
    requested: str,
    tokens: TokensFn | None = None,
    log: Callable[[str], None] = print,
    n: int = GATE_SCENES,
    min_agreement: float | None = None,
) -> tuple[PreprocessConfig, dict]:
    """The preprocessing config the repository serves, and the manifest's `decode` entry:
    `exact` as asked; `fast` when the gate passes, else `exact` (and the build says so).
    min_agreement: None is MIN_AGREEMENT; 0 only measures and reports the agreement (a
    speed-only model with random weights, as the precision gate is run for it)."""
    if requested not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {requested!r}")
    entry: dict = {"requested": requested, "checkpoint": ck.preprocess.decode}
    if requested == "exact":
        log("exact decode requested (--decode exact): every image decoded at full size")
        entry.update(served="exact", gate=None)
        return replace(ck.preprocess, decode="exact"), entry
    report = check(ck, tokens, n=n, min_agreement=MIN_AGREEMENT if min_agreement is None else min_agreement)
    for line in report.lines():
        log(line)
    served = "fast" if report.passed else "exact"
    if not report.passed:
        log("the fast decode path is REFUSED: the repository serves the exact path")
    entry.update(served=served, gate=report.to_dict())
    return replace(ck.preprocess, decode=served), entry
