"""COCO-format captions: one loader for real COCO 2014/2017 files and for shapes-v1."""

from __future__ import annotations

import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .preprocess import PreprocessConfig, decode_side, load_path, prepare
from .vocab import Vocabulary


@dataclass
class CocoItem:
    image_id: int
    path: Path
    captions: list[str]


class CocoCaptions:
    """Reads `captions_*.json` (`images`: id/file_name, `annotations`: image_id/caption).

    `image_root` is the folder `file_name` is relative to: for COCO 2014 that is the
    `train2014/` folder itself; for shapes-v1, the dataset root. Images without captions
    are dropped; captions that name a missing image raise."""

    def __init__(self, annotation_file: str | Path, image_root: str | Path | None = None):
        self.annotation_file = Path(annotation_file)
        raw = json.loads(self.annotation_file.read_text())
        root = Path(image_root) if image_root else self.annotation_file.parent
        by_image: dict[int, list[str]] = defaultdict(list)
        for ann in raw["annotations"]:
            by_image[int(ann["image_id"])].append(str(ann["caption"]).strip())
        known = {int(im["id"]) for im in raw["images"]}
        orphans = set(by_image) - known
        if orphans:
            raise ValueError(f"{annotation_file}: {len(orphans)} captions name unknown image ids, e.g. {sorted(orphans)[:3]}")
        self.items = [
            CocoItem(int(im["id"]), root / im["file_name"], by_image[int(im["id"])])
            for im in raw["images"]
            if by_image.get(int(im["id"]))
        ]
        self.scenes = {int(s["image_id"]): s for s in raw.get("scenes", [])}
        self.info = raw.get("info", {})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> CocoItem:
        return self.items[i]

    def all_captions(self) -> list[str]:
        return [c for it in self.items for c in it.captions]


def robustness_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """What a served image may have been through: JPEG, resizing, soft edges from
    another renderer. One draw per image (see ImageDataset): every epoch sees the same
    version, as when images are cached once."""
    kind = rng.random()
    if kind < 0.35:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(60, 95))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind < 0.7:
        side = rng.choice([48, 64, 96, 200, 300, 512, 1024])
        filt = rng.choice(
            [Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS]
        )
        return img.resize((side, side), filt)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))


class ImageDataset:
    """Images of a dataset, decoded, augmented and resized on demand: what DataLoader
    workers run in parallel. An image's augmentation depends only on (seed, index), so
    the data is the same whichever worker, process or cache mode produces it.

    `__getitems__` serves a whole batch as (indices int64 [B], uint8 [B, S, S, 3]) tensors."""

    def __init__(self, dataset: CocoCaptions, cfg: PreprocessConfig, augment_share: float = 0.0, seed: int = 0):
        self.paths = [it.path for it in dataset.items]
        self.cfg, self.augment_share, self.seed = cfg, augment_share, seed

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        img = load_path(self.paths[i], min_side=decode_side(self.cfg))
        if self.augment_share:
            rng = random.Random(self.seed * 1_000_003 + i)
            if rng.random() < self.augment_share:
                img = robustness_augment(img, rng)
        return prepare(img, self.cfg)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.load(i)

    def __getitems__(self, indices) -> tuple:
        import torch

        idx = np.asarray(indices, np.int64)
        return torch.from_numpy(idx), torch.from_numpy(np.stack([self.load(int(i)) for i in idx]))


class ArrayDataset:
    """Rows of an in-memory array (cached images or backbone features), batch by batch."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitems__(self, indices) -> tuple:
        import torch

        idx = np.asarray(indices, np.int64)
        return torch.from_numpy(idx), torch.from_numpy(self.array[idx])


def whole_batch(batch):
    """DataLoader collate for datasets whose __getitems__ already returns the batch
    (module level so that worker processes can pickle it)."""
    return batch


def loader(dataset, *, batch_size: int | None = None, batch_sampler=None, workers: int = 0, pin: bool = False):
    import torch

    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return torch.utils.data.DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=whole_batch,
        pin_memory=pin,
        persistent_workers=workers > 0 and batch_sampler is not None,
        prefetch_factor=4 if workers else None,
    )


def cache_images(
    dataset: CocoCaptions,
    cfg: PreprocessConfig,
    augment_share: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    workers: int = 0,
) -> np.ndarray:
    """All images through `prepare` into one uint8 [N, S, S, 3] array, in dataset order,
    decoded by `workers` processes (0: this one)."""
    from .progress import bar

    s = cfg.image_size
    out = np.empty((len(dataset), s, s, 3), np.uint8)
    batches = loader(ImageDataset(dataset, cfg, augment_share, seed), batch_size=64, workers=workers)
    with bar(total=len(dataset), desc=f"caching {dataset.annotation_file.name}", disable=not progress, unit="img") as b:
        for idx, x in batches:
            out[idx.numpy()] = x.numpy()
            b.update(len(idx))
    return out


def encode_captions(dataset: CocoCaptions, vocab: Vocabulary, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """All captions as a padded int64 matrix [M, T] and their image index [M]."""
    rows, owners = [], []
    for i, item in enumerate(dataset.items):
        for cap in item.captions:
            ids = vocab.encode(cap)[:max_tokens]
            rows.append(ids)
            owners.append(i)
    t = max(len(r) for r in rows)
    mat = np.full((len(rows), t), vocab.pad, np.int64)
    for j, r in enumerate(rows):
        mat[j, : len(r)] = r
    return mat, np.asarray(owners, np.int64)
