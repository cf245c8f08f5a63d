"""/dev/shm a repository needs: Triton's Python backend hands every tensor to and from its
stubs through one shared-memory region per model instance, in /dev/shm, which grows
when a batch does not fit and never shrinks. The largest batch is the front model's
(`preprocess`): max_batch_size encoded images of up to max_image_bytes each, one such
batch in each of its instances at once. The other Python models move small tensors
(64-pixel images, LSTM states, captions) and keep their initial region.

The size is written to build_manifest.json ("shm") and must match what the pod mounts at
/dev/shm (deploy/k8s, the KServe runtime, `podman run --shm-size`; tests/unit/
test_k8s_manifests.py checks they agree). `python -m bench.shm` measures the regions of
a real server under those batches against it. A container with less /dev/shm refuses a
batch that does not fit with an error naming --shm-size (the Python backend's), for
that batch alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.preprocess import DEFAULT_MAX_BYTES
from captioner.serving import PREPROCESS

from .repository_check import front_layout

MIB = 2**20
# The Python backend's defaults (shm-default-byte-size, shm-growth-byte-size): every
# instance's region starts at 1 MiB and grows in 1 MiB steps.
REGION_START_BYTES = 1 * MIB
# Per image of a BYTES tensor: its 4-byte length prefix; per batch, the tensors' and the
# request's bookkeeping, rounded up to the 1 MiB growth step with room to spare.
BYTES_PREFIX = 4
BATCH_OVERHEAD_BYTES = 4 * MIB
# What the figure is rounded up to, so that manifests carry a plain Kubernetes quantity.
ROUND_TO = 128 * MIB


@dataclass(frozen=True)
class ShmLimits:
    """What sizes /dev/shm: the front model's batch and image limits and instance counts."""

    max_batch_size: int
    max_image_bytes: int
    front_instances: int
    python_instances: int  # every Python-backend instance, the front model's included
    layout: str = "split"


def required_bytes(limits: ShmLimits) -> int:
    """Bytes of /dev/shm for every front instance holding a full batch of the largest
    images at once, plus every other Python instance's initial region; rounded up."""
    batch = limits.max_batch_size * (limits.max_image_bytes + BYTES_PREFIX) + BATCH_OVERHEAD_BYTES
    need = limits.front_instances * (REGION_START_BYTES + batch)
    need += (limits.python_instances - limits.front_instances) * REGION_START_BYTES
    return -(-need // ROUND_TO) * ROUND_TO


def quantity(n: int) -> str:
    """Bytes as the Kubernetes quantity a manifest writes (Mi or Gi)."""
    return f"{n // 1024**3}Gi" if n % 1024**3 == 0 else f"{-(-n // MIB)}Mi"


def _configs(repo: Path) -> dict[str, mc.ModelConfig]:
    out = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
        out[cfg.name] = cfg
    if PREPROCESS not in out:
        raise FileNotFoundError(f"{repo} has no {PREPROCESS}/config.pbtxt")
    return out


def _instances(cfg: mc.ModelConfig) -> int:
    return sum(g.count or 1 for g in cfg.instance_group) or 1


def front_instances(repo: Path) -> int:
    return _instances(_configs(repo)[PREPROCESS])


def repository_limits(repo: Path) -> ShmLimits:
    """The limits as the repository's configs set them."""
    configs = _configs(repo)
    front = configs[PREPROCESS]
    param = front.parameters.get("max_image_bytes")
    return ShmLimits(
        max_batch_size=front.max_batch_size,
        max_image_bytes=int(param.string_value) if param is not None else DEFAULT_MAX_BYTES,
        front_instances=_instances(front),
        python_instances=sum(_instances(c) for c in configs.values() if c.backend == "python"),
        layout=front_layout(front),
    )


def manifest_entry(repo: Path) -> dict:
    """build_manifest.json's "shm": the size and what it was sized from."""
    limits = repository_limits(repo)
    n = required_bytes(limits)
    return {
        "bytes": n,
        "quantity": quantity(n),
        "max_batch_size": limits.max_batch_size,
        "max_image_bytes": limits.max_image_bytes,
        "front_instances": limits.front_instances,
        "python_instances": limits.python_instances,
        "layout": limits.layout,
    }
