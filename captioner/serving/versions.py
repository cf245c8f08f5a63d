"""Which model answered: the repository version and the checkpoint behind it.

A Triton model's config.pbtxt (and so its `parameters`) is shared by all its versions;
what differs per version (the checkpoint's identity, decoding defaults, the runtime the
build chose) is written by the builder into the version directory as `parameters.json`
and read here over the config's. Every caption the `captioner` ensemble returns carries
`MODEL_VERSION` = "<repository version>:<first 8 hex of the checkpoint's sha256>", made by
`label` in caption_generator."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OUTPUT = "MODEL_VERSION"
PARAMETERS_FILE = "parameters.json"  # in a model's version directory: that version's parameters
SHORT_SHA = 8
_LABEL = re.compile(rf"^(\d+):([0-9a-f]{{{SHORT_SHA}}})$")


def label(version: int | str, checkpoint_sha256: str) -> str:
    """ "2:3f9c1a0b" for version 2 of a repository built from a checkpoint whose sha256
    starts with 3f9c1a0b."""
    sha = checkpoint_sha256.strip().lower()
    if not re.fullmatch(rf"[0-9a-f]{{{SHORT_SHA},64}}", sha):
        raise ValueError(f"checkpoint_sha256 must be hex (at least {SHORT_SHA} digits), got {checkpoint_sha256!r}")
    if not str(version).isdigit() or int(version) < 1:
        raise ValueError(f"a model version is a positive integer, got {version!r}")
    return f"{int(version)}:{sha[:SHORT_SHA]}"


def parse_label(text: str) -> tuple[int, str]:
    """(version, short sha) of a MODEL_VERSION value; ValueError for anything else."""
    m = _LABEL.match(text)
    if m is None:
        raise ValueError(f"not a MODEL_VERSION label (<version>:<{SHORT_SHA} hex>): {text!r}")
    return int(m.group(1)), m.group(2)


def parameters(config: Mapping[str, Any], version_dir: str | Path) -> dict[str, str]:
    """config.pbtxt `parameters` ({key: string_value}) overlaid with the version's own
    parameters.json when the builder wrote one."""
    out = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    path = Path(version_dir) / PARAMETERS_FILE
    if path.is_file():
        own = json.loads(path.read_text())
        if not isinstance(own, dict):
            raise ValueError(f"{path}: expected a JSON object of parameters")
        out.update({str(k): str(v) for k, v in own.items()})
    return out
