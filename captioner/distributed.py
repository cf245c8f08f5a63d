"""Where training runs: the device, mixed precision, and torchrun's process group.

One process per device. Under `torchrun` the environment names this process's place
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without it there is one process and
no process group. CUDA processes talk over NCCL, CPU processes over gloo.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

DEVICES = ("auto", "cpu", "cuda")
AMP = ("auto", "bf16", "fp16", "off")
# Rank 0 alone evaluates and writes between epochs while the others wait at a barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> a torch device; under torchrun, `cuda` is
    the GPU numbered LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'})"
            )
        index = int(name.split(":", 1)[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: process {local_rank} on this node needs GPU {index}, "
                f"but only {torch.cuda.device_count()} are visible (one process per GPU)"
            )
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")


def resolve_amp(amp: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU that has it, else off; bf16 on a GPU without it is refused."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp not in AMP:
        raise ValueError(f"unknown --amp {amp!r}; choose from {', '.join(AMP)}")
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 is for CUDA devices (the CPU's LSTM kernels have no float16); use --amp bf16 or off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --amp fp16")
    return amp


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def tune_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv kernels once
        torch.set_float32_matmul_precision("high")  # TF32 where amp is off


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (picklable objects, tensors inside included)."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def setup(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local, backend), device


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


class _AllSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum reaches every input, so backward sums too."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch, summed over
    all processes: torch's SyncBatchNorm does this on GPUs only, and gloo CPU runs need
    it for a 2-process step to compute what a 1-process step on the same batch does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        all_reduce = _AllSum.apply
        c, dims = x.shape[1], (0, 2, 3)
        xf = x.float()  # sums over a whole batch lose too much in bf16/fp16
        count = all_reduce(torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device))
        mean = all_reduce(xf.sum(dims)) / count
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
            # BatchNorm registers all three as tensors when track_running_stats is set.
            assert tracked is not None and running_mean is not None and running_var is not None
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d normalises over the global batch: SyncBatchNorm on CUDA,
    AllReduceBatchNorm2d on the CPU. Parameter and buffer names do not change, so the
    checkpoint loads into the plain model."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            # The same parameter and buffer objects: an optimizer built before still updates them.
            new._parameters, new._buffers = child._parameters, child._buffers
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


def cpu_copy(obj):
    """Tensors anywhere inside dicts/lists as contiguous CPU tensors, so that a checkpoint
    written on a GPU loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().contiguous()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def default_workers(device: torch.device) -> int:
    """Decoding keeps a GPU fed only with several CPU cores; on the CPU the cores train."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // per_node - 1))
