"""The COCO captions loader on a tiny COCO-2014-style fixture (real layout, made-up images)."""

import json

import numpy as np
import pytest
from PIL import Image

from captioner.data import CocoCaptions, cache_images, encode_captions
from captioner.preprocess import PreprocessConfig
from captioner.vocab import Vocabulary

COLOURS = {42: (200, 30, 30), 73: (30, 200, 30), 99: (30, 30, 200), 7: (128, 128, 128)}


def coco_fixture(tmp_path, annotations=None):
    """annotations/captions_val2014.json + val2014/COCO_val2014_<12 digits>.jpg, as COCO ships them."""
    img_dir = tmp_path / "val2014"
    img_dir.mkdir()
    images = []
    for image_id, rgb in COLOURS.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        w, h = 96 + image_id, 64  # COCO images are not square
        Image.new("RGB", (w, h), rgb).save(img_dir / name, quality=95)
        images.append({"license": 3, "file_name": name, "coco_url": "", "height": h, "width": w, "id": image_id})
    if annotations is None:
        annotations = [
            {"image_id": 42, "id": 1, "caption": "A red wall in the sun."},
            {"image_id": 42, "id": 2, "caption": "a RED   surface\n"},
            {"image_id": 73, "id": 3, "caption": "Green grass."},
            {"image_id": 99, "id": 4, "caption": "The blue sky"},
            {"image_id": 99, "id": 5, "caption": "A blue sky with no clouds"},
            {"image_id": 99, "id": 6, "caption": "blue"},
            # image 7 has no captions
        ]
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    ann = ann_dir / "captions_val2014.json"
    ann.write_text(json.dumps({"info": {"year": 2014}, "licenses": [], "images": images, "annotations": annotations}))
    return ann, img_dir


def test_loads_coco_2014_layout(tmp_path):
    ann, img_dir = coco_fixture(tmp_path)
    data = CocoCaptions(ann, img_dir)
    assert len(data) == 3, "the image without captions is dropped"
    assert [it.image_id for it in data.items] == [42, 73, 99]
    assert data[0].path == img_dir / "COCO_val2014_000000000042.jpg" and data[0].path.is_file()
    assert data[0].captions == ["A red wall in the sun.", "a RED   surface"]
    assert len(data[2].captions) == 3
    assert data.all_captions()[:3] == ["A red wall in the sun.", "a RED   surface", "Green grass."]
    assert data.scenes == {} and data.info == {"year": 2014}


def test_default_image_root_is_the_annotation_folder(tmp_path):
    ann, img_dir = coco_fixture(tmp_path)
    data = CocoCaptions(ann)
    assert data[0].path == ann.parent / "COCO_val2014_000000000042.jpg"


def test_captions_naming_unknown_images_are_an_error(tmp_path):
    ann, img_dir = coco_fixture(
        tmp_path,
        annotations=[
            {"image_id": 42, "id": 1, "caption": "a red wall"},
            {"image_id": 1234, "id": 2, "caption": "an orphan"},
        ],
    )
    with pytest.raises(ValueError, match="unknown image ids.*1234"):
        CocoCaptions(ann, img_dir)


def test_cache_images_resizes_in_dataset_order(tmp_path):
    ann, img_dir = coco_fixture(tmp_path)
    data = CocoCaptions(ann, img_dir)
    cfg = PreprocessConfig(image_size=24)
    arr = cache_images(data, cfg, progress=False)
    assert arr.shape == (3, 24, 24, 3) and arr.dtype == np.uint8
    for i, it in enumerate(data.items):
        assert np.all(np.abs(arr[i].reshape(-1, 3).mean(0) - COLOURS[it.image_id]) < 4)


def test_cache_images_augmentation_keeps_the_content(tmp_path):
    ann, img_dir = coco_fixture(tmp_path)
    data = CocoCaptions(ann, img_dir)
    cfg = PreprocessConfig(image_size=24)
    arr = cache_images(data, cfg, augment_share=1.0, seed=3, progress=False)
    assert arr.shape == (3, 24, 24, 3)
    for i, it in enumerate(data.items):
        assert np.all(np.abs(arr[i].reshape(-1, 3).mean(0) - COLOURS[it.image_id]) < 8)


def test_encode_captions_pads_and_keeps_owners(tmp_path):
    ann, img_dir = coco_fixture(tmp_path)
    data = CocoCaptions(ann, img_dir)
    vocab = Vocabulary.build(data.all_captions(), min_count=2)
    assert vocab.itos[4:] == ["a", "blue", "red", "sky", "the"]
    toks, owner = encode_captions(data, vocab, max_tokens=6)
    assert toks.shape == (6, 6) and owner.tolist() == [0, 0, 1, 2, 2, 2]
    assert toks[0].tolist() == vocab.encode("A red wall in the sun.")[:6]  # truncated at max_tokens
    assert toks[5].tolist() == [vocab.start, vocab.stoi["blue"], vocab.end, vocab.pad, vocab.pad, vocab.pad]
    assert vocab.decode(toks[2]) == f"{vocab.itos[vocab.unk]} {vocab.itos[vocab.unk]}"  # green grass
    assert vocab.decode(toks[3]) == "the blue sky"


def test_shapes_split_has_scenes(shapes_data):
    data = CocoCaptions(shapes_data / "captions_val.json")
    assert len(data) == 100
    assert set(data.scenes) == {it.image_id for it in data.items}
    assert all(it.path.is_file() for it in data.items)
