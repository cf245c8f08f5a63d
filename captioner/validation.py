"""Validation during training: loss, next-word accuracy and the greedy share correct
that picks the best checkpoint, and the loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .decoding import greedy, torch_step
from .model import masked_cross_entropy
from .scenes import Scene, caption_is_correct
from .train_inputs import Runtime, Split, batch_tokens, encode
from .vocab import Vocabulary


def evaluate(
    model,
    split: Split,
    cfg,
    vocab: Vocabulary,
    frozen: bool,
    max_length: int,
    decode_n: int,
    rt: Runtime | None = None,
    batch: int = 256,
) -> dict:
    """Validation loss and next-word accuracy on every caption; greedy share correct
    (the spec's rule, docs/shapes-v1.md) on the first `decode_n` images when
    ground-truth scenes exist. One process runs it, so the figures do not depend on
    how many trained."""
    if split.inputs is None:
        raise ValueError("evaluate needs a split with its inputs (images or features)")
    inputs = split.inputs
    rt = rt or Runtime(torch.device("cpu"), "off", False, 0)
    model.eval()
    tot_loss = tot_tok = correct_tok = 0.0
    with torch.inference_mode():
        for i in range(0, len(split.data), batch):
            idx = np.arange(i, min(i + batch, len(split.data)))
            h0, c0 = encode(model, inputs[idx], cfg, frozen, rt)
            rows = np.concatenate([split.by_image[j] for j in idx])
            owners = np.concatenate([np.full(len(split.by_image[j]), k) for k, j in enumerate(idx)])
            local = torch.from_numpy(owners).to(rt.device)
            toks = batch_tokens(split, rows, vocab.pad).to(rt.device)
            with rt.autocast():
                logits = model.decoder(toks[:, :-1], h0[local], c0[local])
            tgt = toks[:, 1:]
            mask = tgt != vocab.pad
            tot_loss += float(masked_cross_entropy(logits.float(), tgt, vocab.pad, reduction="sum"))
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
                h0, c0 = encode(model, inputs[idx], cfg, frozen, rt)
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


def score(m: dict) -> tuple:
    return (m.get("val_share_correct", 0.0), -m["val_loss"])
