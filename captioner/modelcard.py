"""python -m captioner card: write a model card from a checkpoint, its training
history and an evaluation report, so the card's figures are never typed by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import checkpoint as ckpt_mod


def render(ck: ckpt_mod.Checkpoint, history: list[dict], report: dict, command: str, note: str = "") -> str:
    a, p = ck.args, ck.preprocess
    n_params = sum(t.numel() for t in ck.model.parameters())
    best = ck.meta.get("metrics", {})
    rob = report.get("robustness", {})
    lines = [
        "# Model card: `models/default` (shapes-v1 captioner)",
        "",
        "The default model that `make serve` serves. Trained here, on the CPU, with the project's own code.",
        "",
        "## Model",
        f"- Architecture: Show-and-Tell. Encoder `{a.backbone}` (channels {list(a.cnn_channels)}, coordinate channels "
        f"{'on' if a.coord_channels else 'off'}, {a.cnn_grid}x{a.cnn_grid} pooled grid flattened) → "
        f"Dense({a.image_bottleneck}, elu) → "
        f"Dense({a.lstm_units}, elu) = h0 = c0; decoder Embedding({a.embedding_dim}) → LSTM({a.lstm_units}) → "
        f"Dense({a.logit_bottleneck}, elu) → Dense({a.vocab_size}).",
        f"- Parameters: {n_params / 1e6:.2f} M; checkpoint `model.pt` sha256 `{ck.sha256[:16]}…`.",
        f"- Preprocessing (stored in the checkpoint): resize to {p.image_size}x{p.image_size} ({p.resize}), "
        f"mean {list(p.mean)}, std {list(p.std)}.",
        f"- Vocabulary: {a.vocab_size} tokens (minimum count 5, with PAD/START/END/UNK), stored in the checkpoint.",
        f"- Decoding defaults: max length {a.max_length} steps, length penalty {ck.decoding.get('length_penalty')}.",
        "",
        "## Data",
        f"- shapes-v1 (the dataset spec: `docs/shapes-v1.md` in the repository), written by `python -m captioner data` (seed 1): "
        f"{ck.meta.get('train_images', '?')} training scenes, 2,000 validation, 2,000 test, "
        "five references each where the templates allow.",
        "- Half the training images pass once through a robustness augmentation at cache time (JPEG q60–95, resizing "
        "to 48–1024 px with a random filter, or a slight blur) so that served JPEGs, resized images and other renderers "
        "of the spec are captioned as well as the generator's PNGs.",
        "",
        "## Training",
        f"- Reproduce: `{command}`" + (f". {note}" if note else ""),
        f"- Adam, cosine learning-rate schedule from 2e-3 with warm-up, batch 128, gradient clipping at 5, masked "
        f"cross-entropy, {len(history)} epochs; the checkpoint kept is the epoch with the best greedy share correct on "
        f"the validation split (epoch {best.get('epoch', '?')}).",
        "",
        "| epoch | train loss | val loss | val next-word acc | val share correct |",
        "| --- | --- | --- | --- | --- |",
    ]
    for h in history:
        lines.append(
            f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['val_word_acc']:.4f} | "
            f"{h.get('val_share_correct', float('nan')):.4f} |"
        )
    lines += [
        "",
        "![loss curve](loss_curve.png)",
        "",
        f"## Evaluation (`{report['split']}` split, {report['images']} scenes, greedy)",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| share correct (the spec's rule) | {report['share_correct']:.4f} ({report['correct']}/{report['images']}) |",
    ]
    for name, r in rob.items():
        lines.append(f"| share correct, {name.replace('_', ' ')} | {r['share']:.4f} ({r['correct']}/{r['total']}) |")
    for name, v in report.get("metrics", {}).items():
        lines.append(f"| {name} | {v:.4f} |")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} |")
    lines += [
        "",
        f"Tokenizer: {report.get('tokenizer')}. Full report: `eval_test.json` beside this card.",
        "",
        "## Limits",
        "- It knows shapes-v1 only: six colours, three shapes, two sizes, one or two objects. Any other image gets a "
        "caption in that vocabulary, which is wrong by construction.",
        "- Speed figures are in `docs/bench.md`, not here.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m captioner card", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint dir")
    p.add_argument("--history", required=True, help="history.json of the training run")
    p.add_argument("--eval", required=True, help="evaluation report JSON")
    p.add_argument("--command", required=True, help="the command that reproduces the model")
    p.add_argument("--note", default="", help="how this particular checkpoint's run differed from the command")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    ck = ckpt_mod.load(a.model)
    text = render(ck, json.loads(Path(a.history).read_text()), json.loads(Path(a.eval).read_text()), a.command, a.note)
    Path(a.out).write_text(text)
    print(f"wrote {a.out}")
    return 0
