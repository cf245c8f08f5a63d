"""`seed-inception`: the seed project's sizes on an InceptionV3 encoder, with RANDOM
weights. SPEED-ONLY: its captions are meaningless. It exists so that benchmarks can
measure the serving stack at the cost of the original model (299 px InceptionV3,
2048 -> 120 -> 300, embedding 100, logit bottleneck 120, 8,769-word vocabulary)
without pretrained weights, which cannot be downloaded here.

`python -m builder.seed_inception [--out DIR]` writes the checkpoint; the build CLI
resolves `--model seed-inception` to it, creating it on first use."""

from __future__ import annotations

import argparse
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from captioner import checkpoint as ckpt_mod
from captioner import scenes
from captioner.checkpoint import Checkpoint
from captioner.model import CaptionModel, ModelArgs, default_preprocess
from captioner.preprocess import normalize, prepare
from captioner.vocab import SPECIALS, Vocabulary

NAME = "seed-inception"
VOCAB_SIZE = 8769  # the seed's vocabulary size, specials included
# Decode steps, END included. Random weights rarely emit END, so every caption costs the
# full MAX_LENGTH steps; benchmarks that send max_length for this model take it from here.
MAX_LENGTH = 20
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "artifacts" / NAME
SPEED_ONLY_NOTE = "random weights: captions are meaningless; for speed measurements only"
BN_CALIBRATION_IMAGES = 8


def synthetic_vocab(size: int = VOCAB_SIZE) -> Vocabulary:
    words = [f"w{i:04d}" for i in range(1, size - len(SPECIALS) + 1)]
    return Vocabulary(list(SPECIALS) + words)


def _calibrate_batchnorm(model: CaptionModel, images: torch.Tensor, batch_size: int = 8) -> None:
    """Random conv weights with BatchNorm's initial running stats (mean 0, var 1)
    blow activations up layer after layer (to ~1e11 at the pooled features), which
    would make every fp32 comparison meaningless. Re-estimating the running stats on
    a few real scenes puts activations back at the scale a trained network has."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            model.encoder.backbone(images[i : i + batch_size])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def make_checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    vocab = synthetic_vocab()
    args = ModelArgs(vocab_size=len(vocab), backbone="inception_v3", max_length=MAX_LENGTH)
    cfg = default_preprocess(args.backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning: that is the point here
        model = CaptionModel(args)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    batch = np.stack([prepare(scenes.render(scenes.random_scene(rng), nrng), cfg) for _ in range(BN_CALIBRATION_IMAGES)])
    _calibrate_batchnorm(model, torch.from_numpy(normalize(batch, cfg)))
    meta = {"name": NAME, "speed_only": True, "note": SPEED_ONLY_NOTE, "seed": seed}
    return Checkpoint(args=args, preprocess=cfg, vocab=vocab, model=model, meta=meta)


def ensure(directory: str | Path = DEFAULT_DIR, force: bool = False) -> Path:
    """The checkpoint directory, created when missing (deterministic for a seed)."""
    d = Path(directory)
    if force or not (d / ckpt_mod.FILENAME).is_file():
        print(f"{NAME}: creating the SPEED-ONLY checkpoint ({SPEED_ONLY_NOTE}) in {d}", flush=True)
        make_checkpoint().save(d)
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        default=os.environ.get("CAPTIONER_SEED_INCEPTION_DIR", str(DEFAULT_DIR)),
        help="checkpoint directory (env CAPTIONER_SEED_INCEPTION_DIR)",
    )
    p.add_argument("--force", action="store_true", help="recreate even if it exists")
    a = p.parse_args(argv)
    d = ensure(a.out, force=a.force)
    print(f"{NAME}: {d / ckpt_mod.FILENAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
