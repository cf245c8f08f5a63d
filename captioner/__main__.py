"""python -m captioner {caption,train,data,eval,card} ..."""

from __future__ import annotations

import argparse
import os
import sys


def _caption(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m captioner caption", description="Caption images in-process.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default=os.environ.get("CAPTIONER_MODEL"), help="checkpoint dir (default: the shipped model)")
    p.add_argument("--beam", type=int, default=int(os.environ.get("CAPTIONER_BEAM", "1")), help="beam size (1 = greedy)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--temperature", type=float, help="sample at this temperature instead of deterministic decoding")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature)")
    p.add_argument("--batch-size", type=int, default=int(os.environ.get("CAPTIONER_BATCH", "64")))
    p.add_argument(
        "--device", default=os.environ.get("CAPTIONER_DEVICE") or "auto", help="auto (CUDA when available) | cpu | cuda | cuda:N"
    )
    a = p.parse_args(argv)

    import numpy as np

    from .distributed import resolve_device
    from .inference import Captioner
    from .preprocess import ImageError, prepare_path

    try:
        resolve_device(a.device)
    except ValueError as e:
        p.error(str(e))
    try:
        cap = Captioner(a.model, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        hint = "" if a.model else " (no shipped model yet? `make default-model`, or pass --model DIR)"
        p.exit(2, f"{p.prog}: error: cannot load the model: {e}{hint}\n")
    try:
        params = cap.params(beam_size=a.beam, max_length=a.max_length, temperature=a.temperature, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    failed = 0
    good: list[tuple[str, np.ndarray]] = []
    for path in a.images:
        try:
            good.append((path, prepare_path(path, cap.cfg)))
        except ImageError as e:
            failed += 1
            print(f"{path}: error: {e}", file=sys.stderr)
    for i in range(0, len(good), a.batch_size):
        chunk = good[i : i + a.batch_size]
        caps = cap.caption_arrays(np.stack([x for _, x in chunk]), **params.__dict__)
        for (path, _), c in zip(chunk, caps):
            print(f"{path}\t{c.text}", flush=True)
    return 1 if failed else 0


def _data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m captioner data", description="Write shapes-v1 splits in COCO captions layout.")
    p.add_argument("--out", default=os.environ.get("CAPTIONER_DATA", "data/shapes-v1"))
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1, help="split seeds are seed*1000 + 0/1/2")
    a = p.parse_args(argv)
    from .scenes import generate_split

    for i, (split, n) in enumerate([("train", a.train), ("val", a.val), ("test", a.test)]):
        if n:
            print(generate_split(a.out, split, n, seed=a.seed * 1000 + i))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"caption": _caption, "data": _data}
    if not argv or argv[0] not in commands | {"train": 0, "eval": 0, "card": 0}:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as train_main

        train_main(rest)
        return 0
    if cmd == "eval":
        from .evaluate import main as eval_main

        return eval_main(rest)
    if cmd == "card":
        from .modelcard import main as card_main

        return card_main(rest)
    return commands[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
