"""onnxruntime sessions for the Python-backend models, tuned from the model config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OrtSettings:
    """Thread settings; they come from config.pbtxt parameters so the bench can tune them."""

    intra_op_threads: int = 1
    spinning: bool = False

    @classmethod
    def from_config(cls, params: Mapping[str, str]) -> OrtSettings:
        return cls(
            intra_op_threads=int(params.get("intra_op_threads", cls.intra_op_threads)),
            spinning=str(params.get("allow_spinning", "0")).lower() in ("1", "true", "yes"),
        )


def session(path: str | Path, settings: OrtSettings = OrtSettings()):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Busy-waiting worker threads would steal the few cores that the other model
    # instances (separate processes) need; they must sleep when idle.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
