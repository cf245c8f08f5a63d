"""python -m captioner eval: caption a split in-process and score it.

Text metrics come from pycocoevalcap (the COCO caption evaluation code): BLEU-1..4,
ROUGE-L, CIDEr, and METEOR when a working `java` is on PATH. The headline
metric, the share of correct captions (docs/shapes-v1.md), is computed against the
ground-truth scenes stored beside shapes-v1 captions. With --robustness the same scenes are also captioned
after a JPEG (quality 75) round trip and after resizing to 64 px and 512 px, each
re-encoded in memory and decoded through captioner.preprocess like any served image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROBUSTNESS_VARIANTS = ("jpeg_q75", "resize_64", "resize_512")
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
MAX_EXAMPLES = 25


def variant_bytes(img: Image.Image, variant: str) -> bytes:
    """The encoded file a user might send instead of the original PNG."""
    buf = io.BytesIO()
    if variant == "jpeg_q75":
        img.save(buf, "JPEG", quality=75)
    elif variant.startswith("resize_"):
        side = int(variant.split("_", 1)[1])
        # compress_level=1: lossless like any PNG, and much faster to write than the default
        img.resize((side, side), Image.Resampling.BICUBIC).save(buf, "PNG", compress_level=1)
    else:
        raise ValueError(f"unknown robustness variant {variant!r}")
    return buf.getvalue()


def java_status(timeout: float = 30.0) -> str | None:
    """None when `java` runs; otherwise why not (METEOR and the PTB tokenizer need it)."""
    java = shutil.which("java")
    if not java:
        return "no `java` on PATH"
    try:
        r = subprocess.run([java, "-version"], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`java -version` failed: {type(e).__name__}: {e}"
    if r.returncode != 0:
        return f"`java -version` exited with {r.returncode}: {r.stderr.decode(errors='replace').strip()[:200]}"
    return None


def _run_with_timeout(fn: Callable, timeout: float, on_timeout: Callable[[], None] | None = None):
    """fn() in a thread; TimeoutError after `timeout` s (after calling on_timeout to unblock it)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if on_timeout:
            on_timeout()
        t.join(5)
        raise TimeoutError(f"no result after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def simple_tokenize(captions: dict) -> dict:
    """Stand-in for the PTB tokenizer without Java: lowercase, punctuation dropped,
    whitespace split. Exact for shapes-v1 captions, close for COCO's."""
    from .vocab import tokenize

    return {k: [" ".join(tokenize(c["caption"])) for c in v] for k, v in captions.items()}


def tokenize_all(gts: dict, res: dict, java_problem: str | None, timeout: float) -> tuple[dict, dict, str]:
    if java_problem is None:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            tok = PTBTokenizer()
            g, r = _run_with_timeout(lambda: (tok.tokenize(gts), tok.tokenize(res)), timeout)
            if all(len(g[k]) == len(gts[k]) for k in gts) and all(len(r[k]) == 1 for k in res):
                return g, r, "ptb (Stanford CoreNLP PTBTokenizer, pycocoevalcap)"
            reason = "PTBTokenizer returned fewer lines than captions"
        except Exception as e:
            reason = f"PTBTokenizer failed: {type(e).__name__}: {e}"
    else:
        reason = java_problem
    return simple_tokenize(gts), simple_tokenize(res), f"simple (lowercase, whitespace; {reason})"


def meteor_score(gts: dict, res: dict, timeout: float) -> float:
    """METEOR 1.5 through pycocoevalcap, killed after `timeout` s so a stuck JVM
    cannot hang an evaluation."""
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    try:
        score, _ = _run_with_timeout(lambda: m.compute_score(gts, res), timeout, on_timeout=m.meteor_p.kill)
        return float(score)
    finally:
        # The wrapper holds its lock while scoring and never releases it on failure;
        # its __del__ takes the same lock, so give it a fresh one before it runs.
        m.lock = threading.Lock()
        if m.meteor_p.poll() is None:
            m.meteor_p.kill()


def text_metrics(gts: dict, res: dict, meteor: bool, meteor_timeout: float) -> tuple[dict, dict, str]:
    """(scores, skipped-with-reason, tokenizer description). gts: id -> [{'caption'}], res: id -> [{'caption'}]."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java_problem = java_status()
    g, r, tokenizer = tokenize_all(gts, res, java_problem, meteor_timeout)
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
    for n, s in enumerate(bleu, 1):
        scores[f"BLEU-{n}"] = float(s)
    scores["ROUGE-L"] = float(Rouge().compute_score(g, r)[0])
    scores["CIDEr"] = float(Cider().compute_score(g, r)[0])
    if not meteor:
        skipped["METEOR"] = "disabled (--no-meteor)"
    elif java_problem:
        skipped["METEOR"] = java_problem
    else:
        try:
            scores["METEOR"] = meteor_score(g, r, meteor_timeout)
        except Exception as e:
            skipped["METEOR"] = f"METEOR failed: {type(e).__name__}: {e}"
    return scores, skipped, tokenizer


def _share(ok: int, n: int) -> float | None:
    return ok / n if n else None


def evaluate(a: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from .data import CocoCaptions
    from .inference import Captioner
    from .preprocess import ImageError, decode_image, prepare_bytes, read_path
    from .scenes import Scene, caption_is_correct

    t0 = time.time()
    ann = Path(a.ann) if a.ann else Path(a.data) / f"captions_{a.split}.json"
    data = CocoCaptions(ann, a.images)
    items = data.items[: a.limit] if a.limit else data.items
    if not items:
        raise SystemExit(f"{ann}: no captioned images to evaluate")
    cap = Captioner(a.model, threads=a.threads, device=a.device)
    params = cap.params(beam_size=a.beam, max_length=a.max_length)
    decode_kw = dict(params.__dict__)

    variants = ("original",) + (ROBUSTNESS_VARIANTS if a.robustness else ())
    has_scenes = bool(data.scenes)
    predictions: dict[str, dict[int, str]] = {v: {} for v in variants}
    unreadable: list[dict] = []
    bar = tqdm(total=len(items), desc=f"captioning {a.split}", unit="img", disable=not a.progress)
    for i in range(0, len(items), a.batch_size):
        chunk = items[i : i + a.batch_size]
        images = []
        for it in chunk:
            try:
                # The file as served (the checkpoint's decode path); the robustness variants
                # are re-encoded from the full-size decode, as a user would re-save the file.
                raw = read_path(it.path)
                full = decode_image(raw) if len(variants) > 1 else None
                images.append((it, prepare_bytes(raw, cap.cfg), full))
            except ImageError as e:
                unreadable.append({"image_id": it.image_id, "file": str(it.path), "error": str(e)})
                for v in variants:
                    predictions[v][it.image_id] = ""
        for v in variants:
            arrays, ids = [], []
            for it, served, full in images:
                if v == "original":
                    arrays.append(served)
                else:
                    assert full is not None  # decoded whenever there are variants beyond the original
                    arrays.append(prepare_bytes(variant_bytes(full, v), cap.cfg))
                ids.append(it.image_id)
            if arrays:
                for image_id, c in zip(ids, cap.caption_arrays(np.stack(arrays), **decode_kw)):
                    predictions[v][image_id] = c.text
            if not has_scenes:
                break  # robustness is scored by the spec's rule only
        bar.update(len(chunk))
    bar.close()

    gts = {it.image_id: [{"caption": c} for c in it.captions] for it in items}
    res = {it.image_id: [{"caption": predictions["original"][it.image_id]}] for it in items}
    scores, skipped, tokenizer = text_metrics(gts, res, a.meteor, a.meteor_timeout)

    report: dict = {
        "model": str(cap.ckpt.path),
        "model_sha256": cap.ckpt.sha256,
        "annotation_file": str(ann),
        "split": a.split,
        "images": len(items),
        "decoding": decode_kw,
        "tokenizer": tokenizer,
        "metrics": {k: scores[k] for k in METRIC_ORDER if k in scores},
        "skipped": skipped,
        "unreadable": unreadable,
    }
    if has_scenes:
        shares: dict[str, dict] = {}
        wrong: list[dict] = []
        for v in variants:
            ok = 0
            for it in items:
                text = predictions[v][it.image_id]
                scene = Scene.from_json(data.scenes[it.image_id])
                good = caption_is_correct(text, scene)
                ok += good
                if not good and len(wrong) < MAX_EXAMPLES:
                    wrong.append(
                        {"variant": v, "image_id": it.image_id, "file": str(it.path), "caption": text, "references": it.captions}
                    )
            shares[v] = {"correct": ok, "total": len(items), "share": _share(ok, len(items))}
        report["share_correct"] = shares["original"]["share"]
        report["correct"] = shares["original"]["correct"]
        if a.robustness:
            report["robustness"] = {v: shares[v] for v in ROBUSTNESS_VARIANTS}
        report["wrong_examples"] = wrong
    else:
        report["share_correct"] = None
        skipped["share correct"] = f"{ann} has no ground-truth `scenes`"
        if a.robustness:
            skipped["robustness"] = f"{ann} has no ground-truth `scenes`"
    report["elapsed_s"] = round(time.time() - t0, 1)
    return report


def format_table(report: dict) -> str:
    rows = [("metric", "value")]
    rows += [(k, f"{v:.4f}") for k, v in report["metrics"].items()]
    if report.get("share_correct") is not None:
        rows.append(("share correct", f"{report['share_correct']:.4f} ({report['correct']}/{report['images']})"))
    for v, s in report.get("robustness", {}).items():
        rows.append((f"share correct, {v}", f"{s['share']:.4f} ({s['correct']}/{s['total']})"))
    for k, why in report["skipped"].items():
        rows.append((k, f"skipped: {why}"))
    w = max(len(r[0]) for r in rows)
    lines = [
        f"model {report['model']}  split {report['split']}  images {report['images']}  "
        f"beam {report['decoding']['beam_size']}  tokenizer {report['tokenizer'].split(' ')[0]}",
    ]
    lines += [f"{k:<{w}}  {v}" for k, v in rows[:1]] + ["-" * (w + 2 + 24)] + [f"{k:<{w}}  {v}" for k, v in rows[1:]]
    if report["unreadable"]:
        lines.append(f"{len(report['unreadable'])} unreadable images counted as wrong (listed in the JSON)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m captioner eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=env("CAPTIONER_MODEL"), help="checkpoint dir or file (default: the shipped model)")
    p.add_argument("--data", default=env("CAPTIONER_DATA", "data/shapes-v1"), help="dataset root holding captions_<split>.json")
    p.add_argument("--split", default=env("CAPTIONER_SPLIT", "test"))
    p.add_argument("--ann", help="a COCO captions JSON to score instead of <data>/captions_<split>.json")
    p.add_argument("--images", help="folder the annotation's file_names are relative to (default: the JSON's folder)")
    p.add_argument("--out", default=env("CAPTIONER_EVAL_OUT"), help="JSON report path (default: reports/eval_<split>.json)")
    p.add_argument("--beam", type=int, default=int(env("CAPTIONER_BEAM", "1")), help="beam size (1 = greedy)")
    p.add_argument("--max-length", type=int, help="decode steps (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=int(env("CAPTIONER_BATCH", "128")))
    p.add_argument("--limit", type=int, help="score only the first N images")
    p.add_argument("--robustness", action="store_true", help="also score JPEG q75 and 64/512 px resized copies")
    p.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR even when Java works")
    p.add_argument(
        "--meteor-timeout",
        type=float,
        default=float(env("CAPTIONER_METEOR_TIMEOUT", "300")),
        help="seconds before METEOR (or the PTB tokenizer) is given up",
    )
    p.add_argument("--threads", type=int, default=int(env("CAPTIONER_THREADS", "0")))
    p.add_argument("--device", default=env("CAPTIONER_DEVICE", "auto"), help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        report = evaluate(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out or f"reports/eval_{a.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
