"""Training: end to end (small backbones) or the seed's way (frozen backbone, features
cached on disk, only bottleneck + decoder trained). Teacher forcing, masked
cross-entropy, Adam, gradient clipping, best checkpoint by validation, resumable."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .data import CocoCaptions, cache_images, encode_captions
from .decoding import greedy, torch_step
from .model import BACKBONES, CaptionModel, ModelArgs, default_preprocess, masked_cross_entropy
from .preprocess import normalize
from .scenes import Scene, caption_is_correct
from .vocab import Vocabulary


@dataclass
class Split:
    data: CocoCaptions
    inputs: np.ndarray  # uint8 images [N,S,S,3], or float32 backbone features [N,F] when frozen
    tokens: np.ndarray  # [M, T]
    owner: np.ndarray  # [M] image index of each caption
    by_image: list[np.ndarray]


def _split(data: CocoCaptions, inputs: np.ndarray, vocab: Vocabulary, max_tokens: int) -> Split:
    tokens, owner = encode_captions(data, vocab, max_tokens)
    by_image = [np.nonzero(owner == i)[0] for i in range(len(data))]
    return Split(data, inputs, tokens, owner, by_image)


def _features(model: CaptionModel, images: np.ndarray, cfg, cache: Path, batch: int = 64) -> np.ndarray:
    """Backbone features, computed once and kept on disk (the seed's frozen-encoder recipe)."""
    from tqdm import tqdm

    if cache.exists():
        feats = np.load(cache)
        if len(feats) == len(images):
            return feats
    model.encoder.backbone.eval()
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), batch), desc=f"features {cache.name}", unit="batch"):
            out.append(model.encoder.backbone(torch.from_numpy(normalize(images[i : i + batch], cfg))).numpy())
    feats = np.concatenate(out)
    np.save(cache, feats)
    return feats


def _encode(model: CaptionModel, x: np.ndarray, cfg, frozen: bool):
    if frozen:
        h0 = model.encoder.from_features(torch.from_numpy(x))
        return h0, h0
    return model.encoder(torch.from_numpy(normalize(x, cfg)))


def _batch_tokens(split: Split, rows: np.ndarray, pad: int) -> torch.Tensor:
    toks = split.tokens[rows]
    width = int((toks != pad).sum(1).max())
    return torch.from_numpy(toks[:, :width])


def evaluate(model, split: Split, cfg, vocab: Vocabulary, frozen: bool, max_length: int, decode_n: int, batch: int = 256) -> dict:
    """Validation loss and next-word accuracy on every caption; greedy share correct
    (the spec's rule) on the first `decode_n` images when ground-truth scenes exist."""
    model.eval()
    tot_loss = tot_tok = correct_tok = 0.0
    with torch.inference_mode():
        for i in range(0, len(split.data), batch):
            idx = np.arange(i, min(i + batch, len(split.data)))
            h0, c0 = _encode(model, split.inputs[idx], cfg, frozen)
            rows = np.concatenate([split.by_image[j] for j in idx])
            local = np.concatenate([np.full(len(split.by_image[j]), k) for k, j in enumerate(idx)])
            toks = _batch_tokens(split, rows, vocab.pad)
            logits = model.decoder(toks[:, :-1], h0[local], c0[local])
            tgt = toks[:, 1:]
            mask = tgt != vocab.pad
            n = int(mask.sum())
            tot_loss += float(masked_cross_entropy(logits, tgt, vocab.pad)) * n
            correct_tok += float(((logits.argmax(-1) == tgt) & mask).sum())
            tot_tok += n
    out = {"val_loss": tot_loss / tot_tok, "val_word_acc": correct_tok / tot_tok}
    if decode_n and split.data.scenes:
        n = min(decode_n, len(split.data))
        step = torch_step(model.decoder)
        ok = 0
        with torch.inference_mode():
            for i in range(0, n, batch):
                idx = np.arange(i, min(i + batch, n))
                h0, c0 = _encode(model, split.inputs[idx], cfg, frozen)
                hyps = greedy(step, h0.numpy(), c0.numpy(), vocab.start, vocab.end, max_length)
                for j, hyp in zip(idx, hyps):
                    scene = Scene.from_json(split.data.scenes[split.data[j].image_id])
                    ok += caption_is_correct(vocab.decode(hyp.tokens), scene)
        out["val_share_correct"] = ok / n
    return out


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    ax[0].set(xlabel="epoch", ylabel="masked cross-entropy", title="loss")
    ax[0].legend()
    ax[1].plot(ep, [h["val_word_acc"] for h in history], "o-", label="next-word accuracy")
    if "val_share_correct" in history[0]:
        ax[1].plot(ep, [h["val_share_correct"] for h in history], "o-", label="share correct (greedy)")
    ax[1].set(xlabel="epoch", title="validation", ylim=(min(0.5, ax[1].get_ylim()[0]), 1.0))
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _score(m: dict) -> tuple:
    return (m.get("val_share_correct", 0.0), -m["val_loss"])


def train(a: argparse.Namespace) -> Path:
    from tqdm import tqdm

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(a.data) if a.data else None
    train_ann = Path(a.train_ann) if a.train_ann else data_root / "captions_train.json"
    val_ann = Path(a.val_ann) if a.val_ann else data_root / "captions_val.json"
    train_data = CocoCaptions(train_ann, a.train_images)
    val_data = CocoCaptions(val_ann, a.val_images)
    if a.limit:
        train_data.items = train_data.items[: a.limit]

    resume_path = out / "last.pt"
    state = torch.load(resume_path, map_location="cpu", weights_only=False) if a.resume and resume_path.exists() else None
    if state:
        vocab = Vocabulary(state["vocab"])
        args = ModelArgs.from_dict(state["model_args"])
        from .preprocess import PreprocessConfig

        cfg = PreprocessConfig.from_dict(state["preprocess"])
        frozen = state["frozen"]
    else:
        vocab = Vocabulary.build(train_data.all_captions(), a.min_count)
        args = ModelArgs(
            vocab_size=len(vocab),
            backbone=a.backbone,
            image_bottleneck=a.image_bottleneck,
            lstm_units=a.lstm_units,
            embedding_dim=a.embedding_dim,
            logit_bottleneck=a.logit_bottleneck,
            max_length=a.max_length,
        )
        cfg = default_preprocess(a.backbone, a.image_size)
        frozen = a.mode == "frozen"
    if state:
        import warnings

        with warnings.catch_warnings():
            # Resuming: the backbone's weights come from last.pt, not from random init.
            warnings.simplefilter("ignore", UserWarning)
            model = CaptionModel(args)
    else:
        model = CaptionModel(args, a.backbone_weights)
    print(f"model: {args.backbone}, vocab {len(vocab)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, input {cfg.image_size}px, mode {'frozen' if frozen else 'end-to-end'}")

    train_imgs = cache_images(train_data, cfg, a.augment_share, a.seed)
    val_imgs = cache_images(val_data, cfg)
    if frozen:
        for p in model.encoder.backbone.parameters():
            p.requires_grad_(False)
        train_in = _features(model, train_imgs, cfg, out / "features_train.npy")
        val_in = _features(model, val_imgs, cfg, out / "features_val.npy")
    else:
        train_in, val_in = train_imgs, val_imgs
    tr = _split(train_data, train_in, vocab, args.max_length + 1)
    va = _split(val_data, val_in, vocab, args.max_length + 1)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr)
    steps_per_epoch = math.ceil(len(train_data) / a.batch_size)
    total = steps_per_epoch * a.epochs
    warm = min(200, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * (0.5 * (1 + math.cos(math.pi * min(s, total) / total)) * 0.95 + 0.05)
    )
    history, start_epoch, best = [], 1, None
    if state:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start_epoch, best = state["history"], state["epoch"] + 1, state.get("best")
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {resume_path} at epoch {start_epoch}")

    rng = np.random.default_rng(a.seed + start_epoch)
    t_start = time.time()
    for epoch in range(start_epoch, a.epochs + 1):
        model.train()
        if frozen:
            model.encoder.backbone.eval()
        order = rng.permutation(len(train_data))
        run_loss = n_loss = 0.0
        bar = tqdm(range(0, len(order), a.batch_size), desc=f"epoch {epoch}/{a.epochs}", unit="batch")
        for i in bar:
            idx = order[i : i + a.batch_size]
            rows = np.asarray([rng.choice(tr.by_image[j]) for j in idx])
            toks = _batch_tokens(tr, rows, vocab.pad)
            h0, c0 = _encode(model, tr.inputs[idx], cfg, frozen)
            logits = model.decoder(toks[:, :-1], h0, c0)
            loss = masked_cross_entropy(logits, toks[:, 1:], vocab.pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, a.clip)
            opt.step()
            sched.step()
            run_loss += loss.item()
            n_loss += 1
            bar.set_postfix(loss=f"{run_loss / n_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        metrics = {"epoch": epoch, "train_loss": run_loss / n_loss, **evaluate(model, va, cfg, vocab, frozen, args.max_length, a.val_decode)}
        metrics["elapsed_s"] = round(time.time() - t_start, 1)
        history.append(metrics)
        print(json.dumps(metrics))
        ck = Checkpoint(args, cfg, vocab, model, meta={"epoch": epoch, "metrics": metrics, "train_data": str(train_ann), "train_images": len(train_data), "command": a.command})
        if best is None or _score(metrics) > _score(best):
            best = metrics
            ck.save(out)
            print(f"best so far: epoch {epoch} -> {out / 'model.pt'}")
        torch.save(
            {
                "vocab": vocab.to_list(),
                "model_args": args.to_dict(),
                "preprocess": cfg.to_dict(),
                "frozen": frozen,
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "epoch": epoch,
                "best": best,
                "torch_rng": torch.get_rng_state(),
            },
            resume_path,
        )
        (out / "history.json").write_text(json.dumps(history, indent=1))
        plot_history(history, out / "loss_curve.png")
        if a.time_budget and time.time() - t_start > a.time_budget * 60 and epoch < a.epochs:
            print(f"time budget of {a.time_budget} min spent after epoch {epoch}; stopping (resume with --resume)")
            break
    print(f"best: {json.dumps(best)}")
    return out / "model.pt"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    env = os.environ.get
    p = p or argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=env("CAPTIONER_DATA", "data/shapes-v1"), help="dataset root with captions_{train,val}.json")
    p.add_argument("--train-ann", help="COCO captions JSON (overrides --data)")
    p.add_argument("--train-images", help="folder the train file_names are relative to")
    p.add_argument("--val-ann")
    p.add_argument("--val-images")
    p.add_argument("--out", default=env("CAPTIONER_OUT", "runs/default"))
    p.add_argument("--backbone", choices=BACKBONES, default="small_cnn")
    p.add_argument("--backbone-weights", help="torchvision state-dict file for inception_v3/resnet50")
    p.add_argument("--mode", choices=["end2end", "frozen"], default="end2end")
    p.add_argument("--image-size", type=int)
    p.add_argument("--image-bottleneck", type=int, default=120)
    p.add_argument("--lstm-units", type=int, default=300)
    p.add_argument("--embedding-dim", type=int, default=100)
    p.add_argument("--logit-bottleneck", type=int, default=120)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--augment-share", type=float, default=0.5, help="share of training images through JPEG/resize/blur")
    p.add_argument("--val-decode", type=int, default=1000, help="val images decoded greedily each epoch for checkpoint choice")
    p.add_argument("--limit", type=int, help="use only the first N training images")
    p.add_argument("--time-budget", type=float, help="minutes; stop after the epoch that crosses it")
    p.add_argument("--threads", type=int, default=int(env("CAPTIONER_THREADS", "0")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    return p


def main(argv=None) -> None:
    import sys

    a = build_parser().parse_args(argv)
    a.command = "python -m captioner train " + " ".join(argv if argv is not None else sys.argv[1:])
    train(a)


if __name__ == "__main__":
    main()
