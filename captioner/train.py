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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .checkpoint import Checkpoint
from .cli import env
from .data import ArrayDataset, CocoCaptions, ImageDataset, cache_images, loader
from .model import BACKBONES, CaptionModel, ModelArgs, default_preprocess, masked_cross_entropy
from .preprocess import PreprocessConfig
from .progress import bar
from .train_inputs import Runtime, Split, backbone_features, batch_tokens, make_split
from .validation import evaluate, plot_history, score
from .vocab import Vocabulary


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


@dataclass
class _Run:
    """One training run: what every epoch reads, and the progress it carries forward."""

    a: argparse.Namespace
    dd: D.Dist
    rt: Runtime
    out: Path
    train_ann: Path
    train_data: CocoCaptions
    vocab: Vocabulary
    args: ModelArgs
    cfg: PreprocessConfig
    frozen: bool
    model: CaptionModel
    history: list = field(default_factory=list)
    best: dict | None = None
    step: int = 0

    @property
    def device(self) -> torch.device:
        return self.rt.device


def _train(a: argparse.Namespace, dd: D.Dist, device: torch.device) -> Path:
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    D.tune_for(device)
    if a.batch_size % dd.world:
        raise ValueError(f"--batch-size {a.batch_size} is the global batch; it must divide evenly over {dd.world} processes")
    out = Path(a.out)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    train_ann, train_data, val_data = _datasets(a)
    resume_path = out / "last.pt"
    state = None
    if a.resume:
        # Rank 0 reads last.pt and sends it: other nodes need no shared disk.
        mine = dd.main and resume_path.exists()
        state = dd.broadcast(torch.load(resume_path, map_location="cpu", weights_only=False) if mine else None)
    vocab, args, cfg, frozen, model = _model_from_state(state) if state else _new_model(a, train_data)
    rt = _place(a, dd, device, model, frozen)
    run = _Run(a, dd, rt, out, train_ann, train_data, vocab, args, cfg, frozen, model)
    if dd.main:
        _describe(run)
    tr, train_src, va = _splits(run, val_data)
    per_rank = a.batch_size // dd.world
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        range(len(train_data)),  # type: ignore[arg-type]  # stubs want a Dataset; the sampler only takes its len()
        num_replicas=dd.world,
        rank=dd.rank,
        shuffle=True,
        seed=a.seed,
    )
    batches = torch.utils.data.BatchSampler(sampler, per_rank, drop_last=False)
    # Memory-backed batches are a slice of an array: cheaper here than in a worker.
    train_loader = loader(
        train_src,
        batch_sampler=batches,
        workers=0 if isinstance(train_src, ArrayDataset) else rt.workers,
        pin=device.type == "cuda",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt, scaler, sched = _optimizer(a, params, device, rt.amp, len(batches))
    start_epoch = 1
    if state:
        start_epoch = _restore(run, state, opt, sched, scaler)
        if dd.main:
            print(f"resumed from {resume_path} at epoch {start_epoch}")
    net: nn.Module = TrainStep(model, frozen)
    if dd.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    t_start = time.time()
    for epoch in range(start_epoch, a.epochs + 1):
        sampler.set_epoch(epoch)
        sums, n_steps, train_s = _epoch(run, net, tr, train_loader, len(batches), params, opt, scaler, sched, epoch)
        stop = bool(a.max_steps and run.step >= a.max_steps)
        if dd.main:
            images_seen = min(n_steps * a.batch_size, len(train_data))
            metrics = _epoch_metrics(run, va, epoch, sums, n_steps, train_s, images_seen, t_start)
            _save(run, metrics, opt, sched, scaler, resume_path)
            if a.time_budget and time.time() - t_start > a.time_budget * 60 and epoch < a.epochs:
                print(f"time budget of {a.time_budget} min spent after epoch {epoch}; stopping (resume with --resume)")
                stop = True
            elif stop and epoch < a.epochs:
                print(f"--max-steps {a.max_steps} reached in epoch {epoch}; stopping")
        if dd.broadcast(stop):
            break
    if dd.main:
        print(f"best: {json.dumps(run.best)}")
    return out / "model.pt"


def _datasets(a: argparse.Namespace) -> tuple[Path, CocoCaptions, CocoCaptions]:
    def ann(given: str | None, name: str) -> Path:
        if given:
            return Path(given)
        if not a.data:
            raise ValueError(f"no --data folder to find {name} in: give --data, or --train-ann and --val-ann")
        return Path(a.data) / name

    train_ann = ann(a.train_ann, "captions_train.json")
    val_ann = ann(a.val_ann, "captions_val.json")
    train_data = CocoCaptions(train_ann, a.train_images)
    val_data = CocoCaptions(val_ann, a.val_images)
    if a.limit:
        train_data.items = train_data.items[: a.limit]
    return train_ann, train_data, val_data


def _new_model(
    a: argparse.Namespace, train_data: CocoCaptions
) -> tuple[Vocabulary, ModelArgs, PreprocessConfig, bool, CaptionModel]:
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
    return vocab, args, cfg, a.mode == "frozen", CaptionModel(args, a.backbone_weights)


def _place(a: argparse.Namespace, dd: D.Dist, device: torch.device, model: CaptionModel, frozen: bool) -> Runtime:
    """The model on its device and memory layout (BatchNorm synchronised across processes)."""
    amp = D.resolve_amp(a.amp, device)
    channels_last = a.channels_last == "on" or (a.channels_last == "auto" and device.type == "cuda")
    workers = D.default_workers(device) if a.workers is None else a.workers
    model.to(device)
    if channels_last:
        model.encoder.backbone.to(memory_format=torch.channels_last)
    if dd.world > 1 and not frozen and a.sync_batchnorm == "on":
        D.sync_batchnorm(model, device)
    return Runtime(device, amp, channels_last, workers)


def _describe(run: _Run) -> None:
    a, dd, rt, device = run.a, run.dd, run.rt, run.device
    print(
        f"model: {run.args.backbone}, vocab {len(run.vocab)}, "
        f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M parameters, "
        f"input {run.cfg.image_size}px, mode {'frozen' if run.frozen else 'end-to-end'}"
    )
    print(
        f"world size {dd.world}{f' ({dd.backend})' if dd.backend else ''}, device {device}"
        f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, amp {rt.amp}, "
        f"channels_last {'on' if rt.channels_last else 'off'}, {rt.workers} loader workers per process, "
        f"global batch {a.batch_size} = {dd.world} x {a.batch_size // dd.world}"
    )


def _splits(run: _Run, val_data: CocoCaptions) -> tuple[Split, ArrayDataset | ImageDataset, Split | None]:
    """The training caption rows and what the loader draws images (or cached features)
    from; rank 0's validation split."""
    a, dd, model, cfg, rt, out = run.a, run.dd, run.model, run.cfg, run.rt, run.out
    train_src: ArrayDataset | ImageDataset
    if run.frozen:
        for p in model.encoder.backbone.parameters():
            p.requires_grad_(False)
        train_src = ArrayDataset(
            backbone_features(model, run.train_data, cfg, out / "features_train.npy", rt, dd.main, a.augment_share, a.seed)
        )
        val_in = backbone_features(model, val_data, cfg, out / "features_val.npy", rt, True) if dd.main else None
    else:
        if a.cache == "memory":
            train_src = ArrayDataset(
                cache_images(run.train_data, cfg, a.augment_share, a.seed, progress=dd.main, workers=rt.workers)
            )
        else:
            train_src = ImageDataset(run.train_data, cfg, a.augment_share, a.seed)
        val_in = cache_images(val_data, cfg, progress=True, workers=rt.workers) if dd.main else None
    tr = make_split(run.train_data, None, run.vocab, run.args.max_length + 1)
    va = make_split(val_data, val_in, run.vocab, run.args.max_length + 1) if dd.main else None
    return tr, train_src, va


def _optimizer(a: argparse.Namespace, params: list, device: torch.device, amp: str, steps_per_epoch: int):
    """Adam, the loss scaler, and warm-up then cosine decay to 5 % over the whole run."""
    opt = torch.optim.Adam(params, lr=a.lr)
    scaler = D.grad_scaler(device, amp)
    total = steps_per_epoch * a.epochs
    warm = min(200, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * (0.5 * (1 + math.cos(math.pi * min(s, total) / total)) * 0.95 + 0.05)
    )
    return opt, scaler, sched


def _restore(run: _Run, state: dict, opt, sched, scaler) -> int:
    """Weights, optimizer, schedule, scaler, history and RNG from last.pt; the epoch to start at."""
    run.model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if state.get("scaler") and scaler.is_enabled():  # empty when the run before had no loss scaling
        scaler.load_state_dict(state["scaler"])
    run.history, run.best = state["history"], state.get("best")
    run.step = state.get("step", sched.last_epoch)
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"] + 1


def _epoch(
    run: _Run, net: nn.Module, tr: Split, train_loader, n_batches: int, params: list, opt, scaler, sched, epoch: int
) -> tuple[torch.Tensor, int, float]:
    """One pass over the training images; returns (loss x tokens and tokens summed over
    the global batches, steps, seconds)."""
    a, dd, rt, device, vocab = run.a, run.dd, run.rt, run.device, run.vocab
    run.model.train()
    if run.frozen:
        run.model.encoder.backbone.eval()
    # Each image's caption this epoch: the same draw on every process.
    draw = np.random.default_rng([a.seed, epoch]).random(len(run.train_data))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    t_epoch, n_steps = time.time(), 0
    progress = bar(train_loader, desc=f"epoch {epoch}/{a.epochs}", unit="batch", disable=not dd.main)
    for idx, x in progress:
        rows = tr.pick_captions(idx.numpy(), draw)
        toks = batch_tokens(tr, rows, vocab.pad).to(device, non_blocking=True)
        x = x.to(device, non_blocking=True) if run.frozen else rt.images(x, run.cfg)
        with rt.autocast():
            logits = net(x, toks[:, :-1])
        tgt = toks[:, 1:]
        loss_sum = masked_cross_entropy(logits.float(), tgt, vocab.pad, reduction="sum")
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
        run.step += 1
        n_steps += 1
        if run.step == 1 and dd.main:
            print(f"step 1: loss {float(glob[0] / glob[1]):.7f} over a global batch of {a.batch_size} images")
        if dd.main and (n_steps % 20 == 0 or n_steps == n_batches):
            progress.set_postfix(loss=f"{float(sums[0] / sums[1]):.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if a.max_steps and run.step >= a.max_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sums, n_steps, time.time() - t_epoch


def _epoch_metrics(
    run: _Run, va: Split | None, epoch: int, sums: torch.Tensor, n_steps: int, train_s: float, images_seen: int, t_start: float
) -> dict:
    """Rank 0: the epoch's training loss and speed with the validation figures, printed."""
    assert va is not None, "rank 0 holds the validation split"
    a, dd, device = run.a, run.dd, run.device
    metrics = {
        "epoch": epoch,
        "train_loss": float(sums[0] / sums[1]),
        **evaluate(run.model, va, run.cfg, run.vocab, run.frozen, run.args.max_length, a.val_decode, run.rt),
    }
    metrics.update(steps=n_steps, train_s=round(train_s, 2), train_img_per_s=round(images_seen / train_s, 1), world_size=dd.world)
    if device.type == "cuda":
        metrics["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    metrics["elapsed_s"] = round(time.time() - t_start, 1)
    run.history.append(metrics)
    print(json.dumps(metrics))
    print(
        f"epoch {epoch}: {metrics['train_img_per_s']:.1f} img/s ({images_seen} images in {train_s:.1f} s, "
        f"{dd.world} process{'es' if dd.world > 1 else ''} on {device.type})"
    )
    return metrics


def _save(run: _Run, metrics: dict, opt, sched, scaler, resume_path: Path) -> None:
    """Rank 0: the best checkpoint so far, last.pt to resume from, history and curves."""
    a, dd, out, model = run.a, run.dd, run.out, run.model
    meta = {
        "epoch": metrics["epoch"],
        "metrics": metrics,
        "train_data": str(run.train_ann),
        "train_images": len(run.train_data),
        "command": a.command,
        "device": str(run.device.type),
        "amp": run.rt.amp,
        "world_size": dd.world,
    }
    ck = Checkpoint(run.args, run.cfg, run.vocab, model, meta=meta)
    if run.best is None or score(metrics) > score(run.best):
        run.best = metrics
        ck.save(out)
        print(f"best so far: epoch {metrics['epoch']} -> {out / 'model.pt'}")
    last = D.cpu_copy(
        {
            "vocab": run.vocab.to_list(),
            "model_args": run.args.to_dict(),
            "preprocess": run.cfg.to_dict(),
            "frozen": run.frozen,
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "history": run.history,
            "epoch": metrics["epoch"],
            "step": run.step,
            "best": run.best,
            "torch_rng": torch.get_rng_state(),
        }
    )
    torch.save(last, out / "last.pt.tmp")
    (out / "last.pt.tmp").replace(resume_path)
    (out / "history.json").write_text(json.dumps(run.history, indent=1))
    plot_history(run.history, out / "loss_curve.png")


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
    g.add_argument(
        "--amp",
        choices=D.AMP,
        default=env("CAPTIONER_AMP", "auto"),
        help="autocast precision: bf16, fp16 (with loss scaling) or off; auto = bf16 on a GPU that has it, off on the CPU",
    )
    g.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="NHWC memory layout for the conv backbone; auto = on for CUDA",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=env("CAPTIONER_WORKERS", None, int),
        help="DataLoader processes per training process that decode and augment images (default: 0 on the CPU, up to 8 per GPU)",
    )
    g.add_argument(
        "--cache",
        choices=("memory", "none"),
        default="memory",
        help="memory: decode every image once and keep them in RAM (each process holds a copy); "
        "none: decode in the workers every epoch (large images, many GPUs per node)",
    )
    g.add_argument(
        "--sync-batchnorm",
        choices=("on", "off"),
        default="on",
        help="with several processes, BatchNorm statistics over the global batch (on) or each process's share (off: faster)",
    )
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
