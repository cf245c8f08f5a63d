"""Short training runs through `python -m captioner train`'s code path."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import load
from captioner.data import CocoCaptions
from captioner.inference import Captioner
from captioner.scenes import Scene, caption_is_correct
from captioner.train import main as train_main

MEMO_SCENES = 16  # as in conftest.py

# Stated accuracies (observed in brackets, see conftest.py):
MEMO_SHARE_CORRECT = 0.75  # greedy captions right on the 16 memorised scenes [seed 1: 1.0; seeds 0-2: 0.69-1.0]
LANGUAGE_WORD_ACC = 0.45  # next-word accuracy on unseen scenes after ~80 steps [0.55; untrained ~0.05]


def history(run):
    return json.loads((run / "history.json").read_text())


def test_training_learns_to_caption_the_images(memorised_run, shapes_data):
    """Only the image tells the 16 scenes apart, so captioning them right means the
    encoder -> h0 -> LSTM path learned; a language-only model gets ~1 of 16."""
    h = history(memorised_run)
    assert [e["epoch"] for e in h] == list(range(1, 13))
    best = max(e["val_share_correct"] for e in h)
    assert best >= MEMO_SHARE_CORRECT, h
    assert h[-1]["train_loss"] < 0.4 * h[0]["train_loss"]
    assert h[-1]["val_word_acc"] > 0.8

    # model.pt is the best epoch, and in-process inference reproduces its score.
    ck = load(memorised_run)
    assert ck.meta["metrics"]["val_share_correct"] == best
    assert ck.preprocess.image_size == 32, "the run's preprocessing travels in the checkpoint"
    data = CocoCaptions(shapes_data / "memo_val.json")
    assert len(data) == MEMO_SCENES
    caps = Captioner(memorised_run).caption_images([it.path for it in data.items])
    ok = sum(caption_is_correct(c.text, Scene.from_json(data.scenes[it.image_id])) for c, it in zip(caps, data.items))
    assert ok / MEMO_SCENES == pytest.approx(best)

    png = Image.open(memorised_run / "loss_curve.png")
    assert png.format == "PNG" and png.size[0] >= 600
    assert (memorised_run / "last.pt").is_file()


def run_train(args, capsys):
    train_main(args)
    return capsys.readouterr().out


def test_training_generalises_and_resumes(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    common = [
        "--data",
        str(shapes_data),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--lr",
        "3e-3",
        "--augment-share",
        "0",
        "--val-decode",
        "20",
        "--threads",
        "1",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    run_train([*common, "--epochs", "4", "--time-budget", "0.0001"], capsys)
    first = history(out)
    assert len(first) == 1, "the time budget stops after the epoch that crosses it"
    text = run_train([*common, "--epochs", "4", "--resume"], capsys)
    assert re.search(r"resumed from .*last\.pt at epoch 2", text)
    h = history(out)
    assert [e["epoch"] for e in h] == [1, 2, 3, 4]
    assert h[0] == first[0], "resuming keeps the history"
    assert h[-1]["val_word_acc"] >= LANGUAGE_WORD_ACC, h
    assert h[-1]["val_loss"] < h[0]["val_loss"]
    ck = load(out)
    assert ck.vocab.itos[4:] == sorted(ck.vocab.itos[4:]) and "triangle" in ck.vocab.stoi
    assert ck.meta["train_images"] == 600
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 4 and state["optimizer"]["state"], "optimizer moments are saved for resuming"


def test_frozen_backbone_caches_features_and_keeps_the_weight_file(shapes_data, tmp_path, capsys):
    """The seed's recipe: a torchvision backbone from a weight file, frozen; its features
    computed once and kept on disk; only the bottleneck and decoder learn."""
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "resnet50.pth"
    reference = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(reference, weights)
    out = tmp_path / "frozen"
    args = [
        "--data",
        str(shapes_data),
        "--out",
        str(out),
        "--backbone",
        "resnet50",
        "--backbone-weights",
        str(weights),
        "--mode",
        "frozen",
        "--image-size",
        "64",
        "--limit",
        "96",
        "--batch-size",
        "32",
        "--augment-share",
        "0",
        "--val-decode",
        "0",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]  # compared with the CPU backbone below
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_train([*args, "--epochs", "1"], capsys)
    feats = np.load(out / "features_train.npy")
    assert feats.shape == (96, 2048) and np.isfinite(feats).all()
    assert np.load(out / "features_val.npy").shape == (100, 2048)
    stamp = (out / "features_train.npy").stat().st_mtime_ns
    with warnings.catch_warnings(record=True) as more:
        warnings.simplefilter("always")
        run_train([*args, "--epochs", "2", "--resume"], capsys)
    assert not [w for w in seen + more if "RANDOM" in str(w.message)], "weights came from the file, then from last.pt"
    assert (out / "features_train.npy").stat().st_mtime_ns == stamp, "cached features are reused"
    h = history(out)
    assert [e["epoch"] for e in h] == [1, 2] and h[1]["train_loss"] < h[0]["train_loss"]

    ck = load(out)
    assert ck.args.backbone == "resnet50" and ck.preprocess.image_size == 64
    got = ck.model.encoder.backbone.net.state_dict()
    for k, v in reference.items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), f"frozen backbone tensor {k} changed"
    # The cached features are what the saved backbone computes.
    from captioner.data import cache_images
    from captioner.preprocess import normalize

    imgs = cache_images(CocoCaptions(shapes_data / "captions_train.json"), ck.preprocess, progress=False)[:4]
    with torch.inference_mode():
        again = ck.model.encoder.backbone(torch.from_numpy(normalize(imgs, ck.preprocess))).numpy()
    np.testing.assert_allclose(again, feats[:4], rtol=1e-4, atol=1e-4)
