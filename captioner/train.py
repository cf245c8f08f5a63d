"""Training: end to end (small backbones) or the seed's way (frozen backbone, features
cached on disk, only bottleneck + decoder trained). Teacher forcing, masked
cross-entropy, Adam, gradient clipping, best checkpoint by validation, resumable.

Runs on the CPU or a GPU (--device, --amp), in one process or one per device under
torchrun (DistributedDataParallel). --batch-size is the global batch: N processes
each take 1/N of it, the loss is normalised by the global batch's token count and
BatchNorm sees the global batch, so a step computes what one process would on the
same images. Rank 0 alone evaluates and writes checkpoints, history and plots."""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .checkpoint import Checkpoint
from .cli import env
from .data import ArrayDataset, CocoCaptions, ImageDataset, cache_images, encode_captions, loader
from .decoding import greedy, torch_step
from .model import BACKBONES, CaptionModel, ModelArgs, default_preprocess
from .preprocess import PreprocessConfig, normalize_tensor
from .progress import bar
from .scenes import Scene, caption_is_correct
from .vocab import Vocabulary


@dataclass
class Split:
    data: CocoCaptions
    inputs: np.ndarray | None  # uint8 images [N,S,S,3], or float32 backbone features [N,F] when frozen
    tokens: np.ndarray  # [M, T]
    owner: np.ndarray  # [M] image index of each caption, ascending
    by_image: list[np.ndarray]

    def pick_captions(self, idx: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """One caption row per image, chosen by `draw` in [0, 1) per image."""
        first = np.searchsorted(self.owner, idx)
        count = np.searchsorted(self.owner, idx, side="right") - first
        return first + np.minimum((draw[idx] * count).astype(np.int64), count - 1)


def _split(data: CocoCaptions, inputs: np.ndarray | None, vocab: Vocabulary, max_tokens: int) -> Split:
    tokens, owner = encode_captions(data, vocab, max_tokens)
    images = np.arange(len(data))
    bounds = zip(np.searchsorted(owner, images), np.searchsorted(owner, images, side="right"))
    by_image = [np.arange(lo, hi) for lo, hi in bounds]  # owner is ascending
    return Split(data, inputs, tokens, owner, by_image)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed; one per run."""

    device: torch.device
    amp: str
    channels_last: bool
    workers: int

    def images(self, x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
        """uint8 NHWC (any device) -> the normalised float batch on this device."""
        return normalize_tensor(x.to(self.device, non_blocking=True), cfg, self.channels_last)

    def autocast(self):
        return D.autocast(self.device, self.amp)


class TrainStep(nn.Module):
    """images (or cached features) and input tokens -> logits: the one forward that
    DistributedDataParallel wraps, so its gradient hooks see every trained parameter."""

    def __init__(self, model: CaptionModel, frozen: bool):
        super().__init__()
        self.model, self.frozen = model, frozen

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            h0 = c0 = self.model.encoder.from_features(x)
        else:
            h0, c0 = self.model.encoder(x)
        # Under autocast the state comes out in bf16/fp16 while the embeddings are float32;
        # the LSTM needs one dtype (autocast lowers it again where the LSTM has such kernels).
        return self.model.decoder(tokens, h0.float(), c0.float())


def _features(model: CaptionModel, data: CocoCaptions, cfg, cache: Path, rt: Runtime, write: bool,
              augment_share: float = 0.0, seed: int = 0, batch: int = 256) -> np.ndarray:
    """Backbone features, computed once in batches on the device and kept on disk (the
    seed's frozen-encoder recipe). Every process that finds no cache computes its own
    (no shared disk needed); only `write` saves it."""
    if cache.exists():
        feats = np.load(cache)
        if len(feats) == len(data):
            return feats
    model.encoder.backbone.eval()
    images = loader(ImageDataset(data, cfg, augment_share, seed), batch_size=batch, workers=rt.workers, pin=rt.device.type == "cuda")
    out = np.empty((len(data), model.encoder.backbone.out_dim), np.float32)
    with torch.inference_mode(), rt.autocast():
        for idx, x in bar(images, desc=f"features {cache.name}", unit="batch", disable=not write):
            out[idx.numpy()] = model.encoder.backbone(rt.images(x, cfg)).float().cpu().numpy()
    if write:
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache)
    return out


def _encode(model: CaptionModel, x: np.ndarray, cfg, frozen: bool, rt: Runtime):
    x = torch.from_numpy(x)
    with rt.autocast():
        if frozen:
            h0 = model.encoder.from_features(x.to(rt.device))
            h0, c0 = h0, h0
        else:
            h0, c0 = model.encoder(rt.images(x, cfg))
    return h0.float(), c0.float()


def _batch_tokens(split: Split, rows: np.ndarray, pad: int) -> torch.Tensor:
    toks = split.tokens[rows]
    width = int((toks != pad).sum(1).max())
    return torch.from_numpy(toks[:, :width])


def evaluate(model, split: Split, cfg, vocab: Vocabulary, frozen: bool, max_length: int, decode_n: int,
             rt: Runtime | None = None, batch: int = 256) -> dict:
    """Validation loss and next-word accuracy on every caption; greedy share correct
    (the spec's rule, docs/shapes-v1.md) on the first `decode_n` images when
    ground-truth scenes exist. One process runs it, so the figures do not depend on
    how many trained."""
    rt = rt or Runtime(torch.device("cpu"), "off", False, 0)
    model.eval()
    tot_loss = tot_tok = correct_tok = 0.0
    with torch.inference_mode():
        for i in range(0, len(split.data), batch):
            idx = np.arange(i, min(i + batch, len(split.data)))
            h0, c0 = _encode(model, split.inputs[idx], cfg, frozen, rt)
            rows = np.concatenate([split.by_image[j] for j in idx])
            local = torch.from_numpy(np.concatenate([np.full(len(split.by_image[j]), k) for k, j in enumerate(idx)])).to(rt.device)
            toks = _batch_tokens(split, rows, vocab.pad).to(rt.device)
            with rt.autocast():
                logits = model.decoder(toks[:, :-1], h0[local], c0[local])
            tgt = toks[:, 1:]
            mask = tgt != vocab.pad
            tot_loss += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                              ignore_index=vocab.pad, reduction="sum"))
            correct_tok += float(((logits.argmax(-1) == tgt) & mask).sum())
            tot_tok += int(mask.sum())
    out = {"val_loss": tot_loss / tot_tok, "val_word_acc": correct_tok / tot_tok}
    if decode_n and split.data.scenes:
        n = min(decode_n, len(split.data))
        step = torch_step(model.decoder, rt.device)
        ok = 0
        with torch.inference_mode():
            for i in range(0, n, batch):
                idx = np.arange(i, min(i + batch, n))
                h0, c0 = _encode(model, split.inputs[idx], cfg, frozen, rt)
                hyps = greedy(step, h0.cpu().numpy(), c0.cpu().numpy(), vocab.start, vocab.end, max_length)
                for j, hyp in zip(idx, hyps):
                    scene = Scene.from_json(split.data.scenes[split.data[j].image_id])
                    ok += caption_is_correct(vocab.decode(hyp.tokens), scene)
        out["val_share_correct"] = ok / n
    return out


def plot_history(history: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU image; history.json has the same figures
        print(f"matplotlib is not installed: {path.name} not drawn")
        return

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


def _model_from_state(state: dict) -> tuple[Vocabulary, ModelArgs, PreprocessConfig, bool, CaptionModel]:
    args = ModelArgs.from_dict(state["model_args"])
    import warnings

    with warnings.catch_warnings():
        # Resuming: the backbone's weights come from last.pt, not from random init.
        warnings.simplefilter("ignore", UserWarning)
        model = CaptionModel(args)
    return Vocabulary(state["vocab"]), args, PreprocessConfig.from_dict(state["preprocess"]), state["frozen"], model


def train(a: argparse.Namespace) -> Path:
    dd, device = D.setup(a.device)
    try:
        return _train(a, dd, device)
    finally:
        D.teardown(dd)


def _train(a: argparse.Namespace, dd: D.Dist, device: torch.device) -> Path:
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    D.tune_for(device)
    if a.batch_size % dd.world:
        raise ValueError(f"--batch-size {a.batch_size} is the global batch; it must divide evenly over {dd.world} processes")
    per_rank = a.batch_size // dd.world
    out = Path(a.out)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    data_root = Path(a.data) if a.data else None
    train_ann = Path(a.train_ann) if a.train_ann else data_root / "captions_train.json"
    val_ann = Path(a.val_ann) if a.val_ann else data_root / "captions_val.json"
    train_data = CocoCaptions(train_ann, a.train_images)
    val_data = CocoCaptions(val_ann, a.val_images)
    if a.limit:
        train_data.items = train_data.items[: a.limit]

    resume_path = out / "last.pt"
    state = None
    if a.resume:
        # Rank 0 reads last.pt and sends it: other nodes need no shared disk.
        state = dd.broadcast(torch.load(resume_path, map_location="cpu", weights_only=False) if dd.main and resume_path.exists() else None)
    if state:
        vocab, args, cfg, frozen, model = _model_from_state(state)
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
        model = CaptionModel(args, a.backbone_weights)
    amp = D.resolve_amp(a.amp, device)
    channels_last = a.channels_last == "on" or (a.channels_last == "auto" and device.type == "cuda")
    workers = D.default_workers(device) if a.workers is None else a.workers
    rt = Runtime(device, amp, channels_last, workers)
    model.to(device)
    if channels_last:
        model.encoder.backbone.to(memory_format=torch.channels_last)
    if dd.world > 1 and not frozen and a.sync_batchnorm == "on":
        D.sync_batchnorm(model, device)
    if dd.main:
        print(f"model: {args.backbone}, vocab {len(vocab)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"input {cfg.image_size}px, mode {'frozen' if frozen else 'end-to-end'}")
        print(f"world size {dd.world}{f' ({dd.backend})' if dd.backend else ''}, device {device}"
              f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, amp {amp}, "
              f"channels_last {'on' if channels_last else 'off'}, {workers} loader workers per process, "
              f"global batch {a.batch_size} = {dd.world} x {per_rank}")

    if frozen:
        for p in model.encoder.backbone.parameters():
            p.requires_grad_(False)
        train_src = ArrayDataset(_features(model, train_data, cfg, out / "features_train.npy", rt, dd.main, a.augment_share, a.seed))
        val_in = _features(model, val_data, cfg, out / "features_val.npy", rt, True) if dd.main else None
    else:
        if a.cache == "memory":
            train_src = ArrayDataset(cache_images(train_data, cfg, a.augment_share, a.seed, progress=dd.main, workers=workers))
        else:
            train_src = ImageDataset(train_data, cfg, a.augment_share, a.seed)
        val_in = cache_images(val_data, cfg, progress=True, workers=workers) if dd.main else None
    tr = _split(train_data, None, vocab, args.max_length + 1)
    va = _split(val_data, val_in, vocab, args.max_length + 1) if dd.main else None

    sampler = torch.utils.data.DistributedSampler(range(len(train_data)), num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=a.seed)
    batches = torch.utils.data.BatchSampler(sampler, per_rank, drop_last=False)
    # Memory-backed batches are a slice of an array: cheaper here than in a worker.
    train_loader = loader(train_src, batch_sampler=batches, workers=0 if isinstance(train_src, ArrayDataset) else workers,
                          pin=device.type == "cuda")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr)
    scaler = D.grad_scaler(device, amp)
    steps_per_epoch = len(batches)
    total = steps_per_epoch * a.epochs
    warm = min(200, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * (0.5 * (1 + math.cos(math.pi * min(s, total) / total)) * 0.95 + 0.05)
    )
    history, start_epoch, best, step = [], 1, None, 0
    if state:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler") and scaler.is_enabled():  # empty when the run before had no loss scaling
            scaler.load_state_dict(state["scaler"])
        history, start_epoch, best = state["history"], state["epoch"] + 1, state.get("best")
        step = state.get("step", sched.last_epoch)
        torch.set_rng_state(state["torch_rng"])
        if dd.main:
            print(f"resumed from {resume_path} at epoch {start_epoch}")

    net: nn.Module = TrainStep(model, frozen)
    if dd.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    t_start = time.time()
    for epoch in range(start_epoch, a.epochs + 1):
        model.train()
        if frozen:
            model.encoder.backbone.eval()
        sampler.set_epoch(epoch)
        # Each image's caption this epoch: the same draw on every process.
        draw = np.random.default_rng([a.seed, epoch]).random(len(train_data))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
        t_epoch, n_steps = time.time(), 0
        progress = bar(train_loader, desc=f"epoch {epoch}/{a.epochs}", unit="batch", disable=not dd.main)
        for idx, x in progress:
            rows = tr.pick_captions(idx.numpy(), draw)
            toks = _batch_tokens(tr, rows, vocab.pad).to(device, non_blocking=True)
            x = x.to(device, non_blocking=True) if frozen else rt.images(x, cfg)
            with rt.autocast():
                logits = net(x, toks[:, :-1])
            tgt = toks[:, 1:]
            loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=vocab.pad, reduction="sum")
            here = torch.stack([loss_sum.detach().double(), (tgt != vocab.pad).sum().double()])
            glob = dd.sum_(here.clone())
            # Mean over the global batch's tokens; DDP averages gradients over processes, hence x world.
            loss = loss_sum * (dd.world / glob[1].float())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, a.clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            sums += glob
            step += 1
            n_steps += 1
            if step == 1 and dd.main:
                print(f"step 1: loss {float(glob[0] / glob[1]):.7f} over a global batch of {a.batch_size} images")
            if dd.main and (n_steps % 20 == 0 or n_steps == len(batches)):
                progress.set_postfix(loss=f"{float(sums[0] / sums[1]):.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
            if a.max_steps and step >= a.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.time() - t_epoch
        images_seen = min(n_steps * a.batch_size, len(train_data))
        stop = bool(a.max_steps and step >= a.max_steps)
        if dd.main:
            metrics = {"epoch": epoch, "train_loss": float(sums[0] / sums[1]),
                       **evaluate(model, va, cfg, vocab, frozen, args.max_length, a.val_decode, rt)}
            metrics.update(steps=n_steps, train_s=round(train_s, 2), train_img_per_s=round(images_seen / train_s, 1), world_size=dd.world)
            if device.type == "cuda":
                metrics["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            metrics["elapsed_s"] = round(time.time() - t_start, 1)
            history.append(metrics)
            print(json.dumps(metrics))
            print(f"epoch {epoch}: {metrics['train_img_per_s']:.1f} img/s ({images_seen} images in {train_s:.1f} s, "
                  f"{dd.world} process{'es' if dd.world > 1 else ''} on {device.type})")
            meta = {"epoch": epoch, "metrics": metrics, "train_data": str(train_ann), "train_images": len(train_data),
                    "command": a.command, "device": str(device.type), "amp": amp, "world_size": dd.world}
            ck = Checkpoint(args, cfg, vocab, model, meta=meta)
            if best is None or _score(metrics) > _score(best):
                best = metrics
                ck.save(out)
                print(f"best so far: epoch {epoch} -> {out / 'model.pt'}")
            last = D.cpu_copy({
                "vocab": vocab.to_list(),
                "model_args": args.to_dict(),
                "preprocess": cfg.to_dict(),
                "frozen": frozen,
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "history": history,
                "epoch": epoch,
                "step": step,
                "best": best,
                "torch_rng": torch.get_rng_state(),
            })
            torch.save(last, out / "last.pt.tmp")
            (out / "last.pt.tmp").replace(resume_path)
            (out / "history.json").write_text(json.dumps(history, indent=1))
            plot_history(history, out / "loss_curve.png")
            if a.time_budget and time.time() - t_start > a.time_budget * 60 and epoch < a.epochs:
                print(f"time budget of {a.time_budget} min spent after epoch {epoch}; stopping (resume with --resume)")
                stop = True
            elif stop and epoch < a.epochs:
                print(f"--max-steps {a.max_steps} reached in epoch {epoch}; stopping")
        if dd.broadcast(stop):
            break
    if dd.main:
        print(f"best: {json.dumps(best)}")
    return out / "model.pt"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m captioner train", description=__doc__.split("\n\n")[0])
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
    g = p.add_argument_group("devices and processes (docs: README, Training on GPUs and across processes)")
    g.add_argument("--device", default=env("CAPTIONER_DEVICE", "auto"), help="auto (CUDA when available) | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=D.AMP, default=env("CAPTIONER_AMP", "auto"),
                   help="autocast precision: bf16, fp16 (with loss scaling) or off; auto = bf16 on a GPU that has it, off on the CPU")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="NHWC memory layout for the conv backbone; auto = on for CUDA")
    g.add_argument("--workers", type=int, default=env("CAPTIONER_WORKERS", None, int),
                   help="DataLoader processes per training process that decode and augment images "
                        "(default: 0 on the CPU, up to 8 per GPU)")
    g.add_argument("--cache", choices=("memory", "none"), default="memory",
                   help="memory: decode every image once and keep them in RAM (each process holds a copy); "
                        "none: decode in the workers every epoch (large images, many GPUs per node)")
    g.add_argument("--sync-batchnorm", choices=("on", "off"), default="on",
                   help="with several processes, BatchNorm statistics over the global batch (on) or each process's share (off: faster)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (smoke runs)")
    return p


def main(argv=None) -> None:
    import sys

    a = build_parser().parse_args(argv)
    a.command = "python -m captioner train " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.workers is not None and a.workers < 0:
        raise SystemExit("python -m captioner train: error: --workers must be >= 0")
    try:
        train(a)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"python -m captioner train: error: {e}") from None


if __name__ == "__main__":
    main()
