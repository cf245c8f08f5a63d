"""The CUDA code paths: training with --device cuda (bf16 and fp16 autocast, fp32/TF32,
streamed batches, frozen features), its checkpoints on a CPU-only machine, in-process
captioning and `eval` on a GPU against the CPU, and torchrun/NCCL on one GPU.

Every test here is skipped without a CUDA device (CI has none): `bash scripts/gpu_check.sh`
runs them on a GPU machine. Measured figures (loss differences, shares correct, feature
agreement) are recorded with `record_property`, so `pytest --junitxml` keeps them."""

import json
import os
import random
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEMO_SCENES, MEMO_TRAIN_ARGS, SMALL_RUN_ARGS
from test_train import MEMO_SHARE_CORRECT

from captioner import distributed as D
from captioner import evaluate as ev
from captioner import scenes as sc
from captioner.checkpoint import DEFAULT_MODEL_DIR, load
from captioner.data import CocoCaptions, cache_images
from captioner.inference import Captioner
from captioner.model import CaptionModel
from captioner.preprocess import PreprocessConfig, normalize, normalize_tensor, prepare
from captioner.scenes import Scene, caption_is_correct
from captioner.train import main as train_main

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
    f"built for CUDA {torch.version.cuda or 'none'}); run scripts/gpu_check.sh on a GPU machine",
)

# The first step, CUDA vs CPU on the same images and initial weights (--max-steps 1):
# - its loss. Strict fp32 on both differs by summation order and cuDNN's algorithms (~1e-5
#   expected); CUDA's default for --amp off uses TF32 in matmuls and convolutions (10-bit
#   mantissa): ~1e-4 expected. At initialisation the loss hardly depends on the image:
#   measured on the CPU, --seed 6 instead of 5 moves it by 3.7e-3, --augment-share 0
#   instead of 0.5 by 1.8e-5 only.
# - the direction it moves each weight. Adam's first step moves every weight by about
#   +-lr, the sign of its gradient: the share of weights moved the same way is the sharper
#   test of "same batch, same model". Measured on the CPU: 1 vs 2 threads 1.0;
#   --augment-share 0 instead of 0.5: 0.978; bf16 autocast instead of fp32: 0.982.
STEP1_LOSS = {"fp32": 2e-4, "tf32": 1e-3}
STEP1_AGREEMENT = {"fp32": 0.995, "tf32": 0.97}  # TF32 (a sanity bound; the fp32 runs carry the comparison)
DEFAULT_MODEL_SHARE = 0.98  # the default model's bar on unseen scenes (test_default_model.BAR)


@pytest.fixture(autouse=True)
def fresh_process_flags():
    """Each test starts from the global torch flags a new process has: training calls
    D.tune_for (cuDNN autotuning, TF32 matmuls) and --threads, which stay set in-process."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.get_num_threads(),
    )
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]
    torch.set_num_threads(saved[3])


def history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def tensors(obj):
    """Every tensor inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def clean_env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}, **extra}


def small_run(shapes_data, out, *extra):
    """test_train_devices.small_run's run (320 images, 32 px, seed 5)."""
    return [
        "--data",
        str(shapes_data),
        "--out",
        str(out),
        *SMALL_RUN_ARGS,
        *extra,
    ]


def test_device_choices_on_a_cuda_machine():
    n = torch.cuda.device_count()
    assert D.resolve_device("cuda") == D.resolve_device("auto") == torch.device("cuda", 0)
    assert D.resolve_device("cuda", local_rank=n - 1) == torch.device("cuda", n - 1), "torchrun: LOCAL_RANK picks the GPU"
    with pytest.raises(ValueError, match=f"only {n} are visible"):
        D.resolve_device(f"cuda:{n}")
    cuda = torch.device("cuda", 0)
    assert D.resolve_amp("auto", cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "off")
    assert D.resolve_amp("fp16", cuda) == "fp16"
    assert D.grad_scaler(cuda, "fp16").is_enabled() and not D.grad_scaler(cuda, "bf16").is_enabled()
    assert 1 <= D.default_workers(cuda) <= 8


def test_images_are_normalised_on_the_gpu_as_in_numpy(record_property):
    """Images travel to the GPU as uint8 and are normalised there. On the CPU this is
    bit-identical to numpy (test_train_devices); CUDA may divide by 255 as a multiply by
    the reciprocal, so it is allowed a float32 rounding step or two."""
    x = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    cfg = PreprocessConfig(40)
    want = normalize(x, cfg)
    for channels_last in (False, True):
        got = normalize_tensor(torch.from_numpy(x).cuda(), cfg, channels_last)
        assert got.is_cuda and got.dtype == torch.float32 and got.shape == (4, 3, 40, 40)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        diff = float(np.abs(got.cpu().numpy() - want).max())
        record_property(f"normalize_max_abs_diff_channels_last_{channels_last}", diff)
        assert diff <= 1e-6


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_memorises_the_scenes_and_saves_a_cpu_checkpoint(amp, memo_data, tmp_path, capsys, record_property):
    """The conftest memorisation run (12 epochs, 16 scenes) with --device cuda: it learns
    them as on the CPU (test_train's bar), fp16 with loss scaling, and the checkpoint it
    writes is plain float32 CPU tensors that a machine without CUDA loads and captions with."""
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bfloat16")
    train_ann, val_ann = memo_data
    out = tmp_path / amp
    train_main(
        [
            "--train-ann",
            str(train_ann),
            "--val-ann",
            str(val_ann),
            "--out",
            str(out),
            *MEMO_TRAIN_ARGS,
            "--device",
            "cuda",
            "--amp",
            amp,
        ]
    )
    log = capsys.readouterr().out
    assert "world size 1, device cuda:0 (" in log and f"amp {amp}, channels_last on" in log, log[:2000]

    h = history(out)
    assert [e["epoch"] for e in h] == list(range(1, 13))
    assert all(np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in h), h
    assert all(e["peak_mem_gib"] > 0 for e in h), "history keeps the peak GPU memory on CUDA"
    best = max(e["val_share_correct"] for e in h)
    record_property(f"{amp}_val_share_correct_per_epoch", [e["val_share_correct"] for e in h])
    assert best >= MEMO_SHARE_CORRECT, [(e["epoch"], e["train_loss"], e["val_share_correct"]) for e in h]
    assert h[-1]["train_loss"] < 0.4 * h[0]["train_loss"]
    assert h[-1]["val_word_acc"] > 0.8

    # No map_location: tensors saved from the GPU would come back on it.
    model_pt = torch.load(out / "model.pt", weights_only=False)
    state = model_pt["state_dict"]
    assert all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64) and t.is_contiguous() for t in state.values()
    ), {k: (t.device, t.dtype) for k, t in state.items()}
    assert model_pt["meta"]["device"] == "cuda" and model_pt["meta"]["amp"] == amp
    last = torch.load(out / "last.pt", weights_only=False)
    assert all(t.device.type == "cpu" for t in tensors(last)), "last.pt (optimizer moments too) loads without CUDA"
    if amp == "fp16":
        assert last["scaler"]["scale"] > 0, "fp16 trains with a GradScaler, and last.pt keeps its scale"
        record_property("fp16_final_loss_scale", last["scaler"]["scale"])
    else:
        assert last["scaler"] == {}, "bf16 needs no loss scaling"

    # A CPU-only machine: no CUDA visible, the default --device auto.
    data = CocoCaptions(val_ann)
    assert len(data) == MEMO_SCENES
    paths = [it.path for it in data.items]
    r = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", "--model", str(out), *map(str, paths)],
        cwd=REPO,
        env=clean_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    texts = [ln.split("\t", 1)[1] for ln in r.stdout.splitlines()]
    assert texts == [c.text for c in Captioner(out, device="cpu").caption_images(paths)]
    cpu_share = (
        sum(caption_is_correct(t, Scene.from_json(data.scenes[it.image_id])) for t, it in zip(texts, data.items)) / MEMO_SCENES
    )
    record_property(f"{amp}_best_val_share_correct", best)
    record_property(f"{amp}_cpu_share_correct", cpu_share)
    # Validation decoded under autocast picked model.pt; the CPU decodes it in float32:
    # the same score, give or take one borderline scene.
    assert abs(cpu_share - best) <= 1 / MEMO_SCENES + 1e-9, (cpu_share, best)


def first_step(out: Path, seed: int = 5) -> tuple[float, dict]:
    """(loss, update) of a --max-steps 1 run: the step's loss and what it changed in every
    trained tensor (model.pt after it, minus the initial weights that --seed rebuilds)."""
    ck = load(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as train.py does before building the model on the CPU
        init = CaptionModel(ck.args).state_dict()
    after = ck.model.state_dict()
    return history(out)[0]["train_loss"], {k: after[k] - init[k] for k, _ in ck.model.named_parameters()}


def sign_agreement(want: dict, got: dict, floor: float = 1e-4) -> float:
    """Share of the weights `want` moved (by more than `floor`) that `got` moved the same way."""
    same = moved = 0
    for k, u in want.items():
        big = u.abs() > floor
        same += int(((u.sign() == got[k].sign()) & big).sum())
        moved += int(big.sum())
    return same / moved


@pytest.fixture(scope="module")
def cpu_step1(shapes_data, tmp_path_factory) -> tuple[float, dict]:
    out = tmp_path_factory.mktemp("step1-cpu")
    threads = torch.get_num_threads()
    try:
        train_main(
            small_run(
                shapes_data,
                out,
                "--epochs",
                "1",
                "--max-steps",
                "1",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--augment-share",
                "0.5",
            )
        )
    finally:
        torch.set_num_threads(threads)
    loss, update = first_step(out)
    lr = 2e-3  # train.py's default --lr; warm-up is 1 step here, so step 1 runs at it
    median = float(torch.cat([u.abs().flatten() for u in update.values()]).median())
    assert median == pytest.approx(lr, rel=0.05), "the initial weights were rebuilt as train.py built them"
    return loss, update


@pytest.mark.parametrize(
    "precision, extra",
    [
        ("tf32", []),  # --amp off as a user gets it: D.tune_for allows TF32
        ("fp32", []),
        ("fp32", ["--cache", "none", "--workers", "2"]),  # decoded by worker processes every epoch, pinned
    ],
    ids=["amp-off-tf32", "strict-fp32", "strict-fp32-streamed"],
)
def test_first_step_on_cuda_is_the_cpus(precision, extra, cpu_step1, shapes_data, tmp_path, monkeypatch, capsys, record_property):
    """Same seed, same images (augmented), same initial weights: the GPU's first step has
    the CPU's loss and moves the weights the same way, up to float rounding, so the GPU
    trains the model the CPU would."""
    if precision == "fp32":
        tune = D.tune_for

        def strict(device):
            tune(device)
            torch.set_float32_matmul_precision("highest")
            torch.backends.cudnn.allow_tf32 = False

        monkeypatch.setattr(D, "tune_for", strict)
    out = tmp_path / "cuda"
    train_main(
        small_run(
            shapes_data,
            out,
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--device",
            "cuda",
            "--amp",
            "off",
            "--augment-share",
            "0.5",
            *extra,
        )
    )
    log = capsys.readouterr().out
    assert "device cuda:0 (" in log and "amp off" in log
    cpu_loss, cpu_update = cpu_step1
    loss, update = first_step(out)
    name = f"{precision}{'_streamed' if extra else ''}"
    agreement = sign_agreement(cpu_update, update)
    record_property(f"step1_loss_abs_diff_{name}", abs(loss - cpu_loss))
    record_property(f"step1_update_sign_agreement_{name}", agreement)
    assert loss == pytest.approx(cpu_loss, abs=STEP1_LOSS[precision])
    assert agreement >= STEP1_AGREEMENT[precision]


def default_model_scenes(n: int = 200, seed: int = 880_101):
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sc.random_scene(rng)
        out.append((sc.render(scene, nrng), scene))
    return out


def test_captions_on_cuda_are_the_cpus_for_the_default_model(record_property):
    """models/default on 200 unseen scenes: the GPU gives the CPU's greedy and beam-3
    captions (what the served model is checked against), and they are right."""
    cpu, gpu = Captioner(device="cpu"), Captioner(device="cuda")
    assert next(gpu.ckpt.model.parameters()).is_cuda and gpu.device == torch.device("cuda", 0)
    drawn = default_model_scenes()
    batch = np.stack([prepare(img, cpu.cfg) for img, _ in drawn])
    (h_cpu, _), (h_gpu, _) = cpu.encode(batch), gpu.encode(batch)
    # cuDNN convolutions use TF32 by default (torch.backends.cudnn.allow_tf32). Simulated on
    # the CPU (inputs and weights of every conv rounded to TF32) this model's h0, up to ~175
    # in size, moved by 0.047 (2.7e-4 of its largest value) and no caption changed.
    rel = float(np.abs(h_cpu - h_gpu).max() / np.abs(h_cpu).max())
    record_property("default_model_h0_max_abs_diff_relative_to_max", rel)
    assert h_gpu.dtype == np.float32 and rel <= 2e-3
    for beam in (1, 3):
        want = [c.text for c in cpu.caption_arrays(batch, beam_size=beam)]
        got = [c.text for c in gpu.caption_arrays(batch, beam_size=beam)]
        differ = [(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
        record_property(f"default_model_beam{beam}_captions_differing", len(differ))
        assert not differ, differ[:10]
        share = sum(caption_is_correct(t, s) for t, (_, s) in zip(got, drawn)) / len(drawn)
        record_property(f"default_model_beam{beam}_share_correct_cuda", share)
        assert share >= DEFAULT_MODEL_SHARE


def test_eval_on_cuda_reports_what_the_cpu_does(shapes_data, tmp_path, monkeypatch, record_property):
    """`python -m captioner eval --device cuda` on the default model: the same captions,
    shares correct (robustness variants too) and text metrics as --device cpu. Where
    pycocoevalcap is not installed (a bare GPU image) the text metrics are stubbed and the
    captions compared directly."""
    have_coco = find_spec("pycocoevalcap") is not None
    real = ev.text_metrics
    scored: dict[str, dict] = {}

    reports = {}
    for device in ("cpu", "cuda"):

        def recording(gts, res, meteor, meteor_timeout, device=device):
            scored[device] = {k: v[0]["caption"] for k, v in res.items()}
            if have_coco:
                return real(gts, res, meteor, meteor_timeout)
            return {}, {"text metrics": "pycocoevalcap is not installed"}, "none (stubbed in test_cuda)"

        monkeypatch.setattr(ev, "text_metrics", recording)
        out = tmp_path / f"{device}.json"
        rc = ev.main(
            [
                "--ann",
                str(shapes_data / "captions_test.json"),
                "--limit",
                "60",
                "--robustness",
                "--no-meteor",
                "--no-progress",
                "--batch-size",
                "32",
                "--device",
                device,
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        reports[device] = json.loads(out.read_text())
    assert reports["cuda"]["model"] == str(DEFAULT_MODEL_DIR / "model.pt")
    assert scored["cuda"] == scored["cpu"] and len(scored["cpu"]) == 60
    cpu, gpu = ({k: v for k, v in r.items() if k != "elapsed_s"} for r in reports.values())
    assert gpu == cpu
    record_property("eval_share_correct_cuda", gpu["share_correct"])
    record_property("eval_robustness_cuda", {v: s["share"] for v, s in gpu["robustness"].items()})
    assert gpu["share_correct"] >= DEFAULT_MODEL_SHARE


def test_frozen_features_are_computed_on_the_gpu_and_reused(shapes_data, tmp_path, capsys, record_property):
    """--mode frozen on CUDA: the backbone's features are extracted in batches on the GPU
    (bf16 by default), cached, reused on resume, and agree with the CPU's float32 features
    of the saved backbone."""
    out = tmp_path / "frozen"
    args = [
        "--data",
        str(shapes_data),
        "--out",
        str(out),
        "--backbone",
        "resnet50",
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
        "--device",
        "cuda",
    ]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        train_main([*args, "--epochs", "1"])
    feats = np.load(out / "features_train.npy")
    assert feats.shape == (96, 2048) and np.isfinite(feats).all()
    assert np.load(out / "features_val.npy").shape == (100, 2048)
    stamp = (out / "features_train.npy").stat().st_mtime_ns
    train_main([*args, "--epochs", "2", "--resume"])
    log = capsys.readouterr().out
    assert "device cuda:0 (" in log and "resumed from" in log
    assert (out / "features_train.npy").stat().st_mtime_ns == stamp, "cached features are reused"
    h = history(out)
    assert [e["epoch"] for e in h] == [1, 2] and h[1]["train_loss"] < h[0]["train_loss"]

    ck = load(out)
    imgs = cache_images(CocoCaptions(shapes_data / "captions_train.json"), ck.preprocess, progress=False)[:8]
    with torch.inference_mode():
        ref = ck.model.encoder.backbone(torch.from_numpy(normalize(imgs, ck.preprocess))).numpy()
    cos = (ref * feats[:8]).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(feats[:8], axis=1))
    record_property("frozen_feature_min_cosine_vs_cpu_fp32", float(cos.min()))
    assert cos.min() > 0.999, cos  # bf16 autocast on the CPU, same backbone: 0.99998


def torchrun(*args, timeout=150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_torchrun_with_one_gpu_trains_as_one_process(shapes_data, tmp_path):
    """`torchrun --nproc_per_node 1 ... --device cuda`: LOCAL_RANK 0 picks GPU 0. With one
    process there is no process group (distributed.setup starts NCCL only for world > 1)."""
    out = tmp_path / "torchrun"
    r = torchrun(
        "-m", "captioner", "train", *small_run(shapes_data, out, "--epochs", "1", "--max-steps", "3", "--device", "cuda")
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world size 1, device cuda:0 (" in r.stdout and "global batch 32 = 1 x 32" in r.stdout
    h = history(out)
    assert h[0]["world_size"] == 1 and h[0]["steps"] == 3 and "peak_mem_gib" in h[0]
    assert load(out).meta["world_size"] == 1


NCCL_SCRIPT = """
import math, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist, torch.nn.functional as F
from captioner import distributed as D
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig, normalize_tensor
from captioner.train import TrainStep

local = int(os.environ["LOCAL_RANK"])
device = D.resolve_device("cuda", local)
torch.cuda.set_device(device)
# What distributed.setup does for world > 1 on CUDA.
dist.init_process_group("nccl", timeout=D.COLLECTIVE_TIMEOUT, device_id=device)
assert dist.get_backend() == "nccl"
torch.manual_seed(0)
model = CaptionModel(ModelArgs(vocab_size=20)).to(device)
plain = {{k: v.shape for k, v in model.state_dict().items()}}
model.encoder.backbone.to(memory_format=torch.channels_last)  # train.py's order: layout, then SyncBatchNorm
D.sync_batchnorm(model, device)
assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
net = torch.nn.parallel.DistributedDataParallel(TrainStep(model, False), device_ids=[device.index])
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
x = normalize_tensor(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g).to(device), PreprocessConfig(32), True)
toks = torch.randint(4, 20, (8, 7), generator=g).to(device)
before = [p.detach().clone() for p in model.parameters()]
losses = []
for _ in range(3):  # a second backward checks DDP's reducer (every parameter used)
    with D.autocast(device, "bf16"):
        logits = net(x, toks[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, 20), toks[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss))
assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
# The collectives the training loop makes: float64 sums, rank 0's object to all.
sums = torch.tensor([1.5, 2.0], dtype=torch.float64, device=device)
dist.all_reduce(sums)
assert sums.tolist() == [1.5 * dist.get_world_size(), 2.0 * dist.get_world_size()]
box = [{{"epoch": 3, "t": torch.arange(3)}} if dist.get_rank() == 0 else None]
dist.broadcast_object_list(box, src=0)
assert box[0]["epoch"] == 3 and box[0]["t"].tolist() == [0, 1, 2]
# The checkpoint of a SyncBatchNorm model loads into the plain one.
state = D.cpu_copy(model.state_dict())
assert {{k: v.shape for k, v in state.items()}} == plain and all(v.device.type == "cpu" for v in state.values())
CaptionModel(ModelArgs(vocab_size=20)).load_state_dict(state)
dist.destroy_process_group()
print("NCCL_OK", torch.cuda.nccl.version(), losses)
"""


def test_nccl_ddp_and_syncbatchnorm_steps_on_one_gpu(tmp_path, record_property):
    """The multi-GPU pieces that one GPU can run: an NCCL process group (world 1) started
    as distributed.setup starts it, DDP over TrainStep with SyncBatchNorm and bf16 for
    three steps, the loop's float64 all-reduce and object broadcast, and the SyncBatchNorm
    model's checkpoint loading into the plain model. Cross-GPU traffic needs 2+ GPUs."""
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT.format(repo=str(REPO)))
    r = torchrun(str(script))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("NCCL_OK")]
    record_property("nccl", line)
