"""Is /dev/shm big enough for the repository? The build sizes it (builder/shm.py, the
"shm" entry of build_manifest.json): a full batch of the largest images in each instance
of the front model. With less, Triton's Python backend refuses each batch that does not
fit ("Failed to increase the shared memory pool size ... use '--shm-size'") and serves the
rest; the launcher says so at start, so that an undersized container is seen before the
first large batch is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MANIFEST = "build_manifest.json"
SHM_DIR = Path("/dev/shm")


def needed_bytes(repo: Path) -> int | None:
    """The build's figure, or None for a repository built before it was recorded."""
    try:
        shm = json.loads((Path(repo) / MANIFEST).read_text()).get("shm") or {}
    except (OSError, ValueError):
        return None
    return int(shm["bytes"]) if "bytes" in shm else None


def shortfall(repo: Path, servers: int = 1, shm_dir: Path = SHM_DIR) -> str | None:
    """A warning when shm_dir is smaller than `servers` servers of this repository need."""
    need = needed_bytes(repo)
    if need is None:
        return None
    need *= servers
    try:
        have = shutil.disk_usage(shm_dir).total
    except OSError:
        return f"{shm_dir} is missing: the Python backend cannot start its models"
    if have >= need:
        return None
    mib = 2**20
    return (
        f"{shm_dir} holds {have / mib:.0f} MiB but {servers} server(s) of {repo} need {need / mib:.0f} MiB "
        f"({MANIFEST} 'shm': full batches of the largest images): batches that do not fit are refused "
        f"('Failed to increase the shared memory pool size'); give the container --shm-size={need} "
        f"(Kubernetes: a memory emptyDir of that size at /dev/shm)"
    )
