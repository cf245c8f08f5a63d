"""Training across processes (torchrun, gloo on the CPU), mixed precision, DataLoader
workers, and the bare machine a GPU image may be: what a user of --device, --amp,
--workers and torchrun relies on, on the CPU (pinned with --device cpu, also on a GPU
machine). The CUDA paths: tests/unit/test_cuda.py and scripts/gpu_smoke.sh, both run by
scripts/gpu_check.sh on a GPU machine."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_RUN_ARGS

from captioner.checkpoint import load
from captioner.preprocess import IMAGENET, PreprocessConfig, normalize, normalize_tensor
from captioner.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
# What one step computes in 1 process and in 2 differs by float rounding (4e-7 seen);
# with BatchNorm over each process's half instead of the global batch it differs by 2e-4.
STEP1_TOLERANCE = 1e-5


def small_run(shapes_data, out, *extra):
    # --device cpu: these are the CPU's figures on a GPU machine too (`auto` would pick CUDA
    # and bf16); a --device in `extra` comes later and wins. tests/unit/test_cuda.py: CUDA.
    return [
        "--data",
        str(shapes_data),
        "--out",
        str(out),
        *SMALL_RUN_ARGS,
        "--device",
        "cpu",
        *extra,
    ]


def step1_loss(log: str) -> float:
    (loss,) = re.findall(r"^step 1: loss ([0-9.]+) over a global batch of 32 images$", log, re.M)
    return float(loss)


def torchrun(args, timeout=300):
    # `python -m torch.distributed.run` is the `torchrun` command itself, from this interpreter.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "captioner",
            "train",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def history(run):
    return json.loads((run / "history.json").read_text())


def test_two_processes_train_what_one_would_and_resume(shapes_data, tmp_path, capsys):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    log = torchrun(small_run(shapes_data, ddp, "--epochs", "1", "--device", "cpu", "--augment-share", "0.5"))
    assert "world size 2 (gloo), device cpu" in log and "global batch 32 = 2 x 16" in log
    # Rank 0 alone logs and writes.
    assert len(re.findall(r"^step 1: ", log, re.M)) == 1 and len(re.findall(r"^best so far", log, re.M)) == 1
    assert sorted(p.name for p in ddp.iterdir()) == ["history.json", "last.pt", "loss_curve.png", "model.pt"]
    assert re.search(r"^epoch 1: [0-9.]+ img/s \(320 images in [0-9.]+ s, 2 processes on cpu\)$", log, re.M)
    ck = load(ddp)
    assert ck.meta["world_size"] == 2 and ck.meta["epoch"] == 1
    assert all(
        t.device.type == "cpu"
        for t in torch.load(ddp / "model.pt", map_location="cpu", weights_only=False)["state_dict"].values()
    )

    train_main([*small_run(shapes_data, single, "--epochs", "1", "--threads", "1", "--augment-share", "0.5")])
    one = capsys.readouterr().out
    assert "world size 1, device cpu" in one
    assert step1_loss(log) == pytest.approx(step1_loss(one), abs=STEP1_TOLERANCE)
    h2, h1 = history(ddp)[0], history(single)[0]
    assert h2["world_size"] == 2 and h1["world_size"] == 1
    # Same global batches, so the epoch ends at (nearly) the same weights and scores.
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
    assert h2["val_loss"] == pytest.approx(h1["val_loss"], rel=1e-4)
    assert h2["val_word_acc"] == pytest.approx(h1["val_word_acc"], abs=0.01)

    log = torchrun(small_run(shapes_data, ddp, "--epochs", "2", "--device", "cpu", "--augment-share", "0.5", "--resume"))
    assert re.search(r"resumed from .*last\.pt at epoch 2", log) and not re.search(r"^step 1: ", log, re.M)
    h = history(ddp)
    assert [e["epoch"] for e in h] == [1, 2] and h[0] == h2 and h[1]["train_loss"] < h[0]["train_loss"]
    assert torch.load(ddp / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 2


def test_workers_and_streaming_give_the_same_batches_as_the_memory_cache(shapes_data, tmp_path, capsys):
    """Augmentation is drawn per image, so decoding in 2 worker processes every epoch
    (--cache none) trains on exactly the pixels the in-memory cache holds."""
    losses = {}
    for name, extra in {"memory": ["--workers", "0"], "stream": ["--cache", "none", "--workers", "2"]}.items():
        out = tmp_path / name
        train_main(
            small_run(shapes_data, out, "--epochs", "1", "--max-steps", "4", "--threads", "1", "--augment-share", "0.5", *extra)
        )
        log = capsys.readouterr().out
        assert f"{extra[-1]} loader workers per process" in log
        losses[name] = history(out)[0]
        assert losses[name]["steps"] == 4
    assert losses["memory"]["train_loss"] == losses["stream"]["train_loss"]
    assert losses["memory"]["val_loss"] == losses["stream"]["val_loss"]


def test_bf16_autocast_and_channels_last_train_and_save_float32_cpu_weights(shapes_data, tmp_path, capsys):
    out = tmp_path / "bf16"
    train_main(
        small_run(
            shapes_data,
            out,
            "--epochs",
            "1",
            "--max-steps",
            "3",
            "--threads",
            "1",
            "--amp",
            "bf16",
            "--channels-last",
            "on",
            "--augment-share",
            "0",
        )
    )
    log = capsys.readouterr().out
    assert "amp bf16, channels_last on" in log
    assert np.isfinite(history(out)[0]["train_loss"]) and history(out)[0]["train_loss"] < step1_loss(log)
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(t.dtype in (torch.float32, torch.int64) and t.is_contiguous() for t in state.values())
    load(out)  # loads into the plain model


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 is for CUDA devices"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_device_choices_are_clear_errors(shapes_data, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_main(small_run(shapes_data, tmp_path / "x", "--epochs", "1", *flags))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_says_so(shapes_data, tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
        train_main(small_run(shapes_data, tmp_path / "x", "--epochs", "1", "--device", "cuda"))


def test_images_are_normalised_on_the_device_exactly_as_in_numpy():
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    for cfg in (PreprocessConfig(40), PreprocessConfig(40, **IMAGENET)):
        want = normalize(x, cfg)
        plain = normalize_tensor(torch.from_numpy(x), cfg)
        nhwc = normalize_tensor(torch.from_numpy(x), cfg, channels_last=True)
        assert np.array_equal(plain.numpy(), want) and np.array_equal(nhwc.numpy(), want)
        assert plain.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)


# Packages this project installs that a GPU image need not have. None in sys.modules is how
# Python marks a module as absent: `import` raises ModuleNotFoundError, find_spec says None.
BARE_MACHINE = """
import sys
for name in ("tqdm", "matplotlib", "tritonclient", "onnx", "onnxruntime", "pycocoevalcap", "grpc", "locust",
             "fastapi", "uvicorn", "pytriton", "tensorrt", "onnxconverter_common", "gevent"):
    sys.modules[name] = None
"""


def test_training_needs_only_torch_torchvision_numpy_and_pillow(tmp_path):
    """A GPU image (scripts/gpu_smoke.sh) may have nothing but torch, torchvision and
    numpy: `captioner data` and `captioner train` must run there without progress bars
    and plots, and import nothing that serves."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE_MACHINE)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}, "PYTHONPATH": str(site)}

    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "captioner", *a], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )

    r = run("data", "--out", str(tmp_path / "d"), "--train", "64", "--val", "16", "--test", "0")
    assert r.returncode == 0, r.stderr
    r = run(
        "train",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "r"),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--min-count",
        "1",
        "--val-decode",
        "8",
        "--threads",
        "1",
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "matplotlib is not installed: loss_curve.png not drawn" in r.stdout and "img/s" in r.stdout
    assert load(tmp_path / "r").meta["epoch"] == 1
