"""CPU inference runtimes for the Python-backend models: onnxruntime or OpenVINO, one
interface (`engine.run(output_names, feed) -> list of arrays`, the onnxruntime session's),
chosen at build time and named in config.pbtxt parameters.

- onnxruntime: CPUExecutionProvider, sleeping worker threads (captioner.serving.ort).
- OpenVINO: the same ONNX file compiled for the CPU plugin. Precision "bf16" is OpenVINO's
  inference-precision hint on the fp32 graph (only where the CPU has bf16 instructions);
  int8 is the QDQ graph the build already makes, which OpenVINO runs with its int8
  kernels. Compiled models are cached on disk (CACHE_DIR), so a server start that finds
  the cache the build filled does not compile again; a read-only repository's cache is
  copied to a writable folder first (writable_cache_dir).

`choose` picks the faster runtime from timings taken on the build machine; nothing here
imports Triton, so all of it is unit-tested without a server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)
# Inference precisions a runtime applies to an fp32 graph. int8 is not one: it is a
# different graph (QDQ), served at "fp32" inference precision by either runtime.
INFERENCE_PRECISIONS = ("fp32", "bf16")
CACHE_DIRNAME = "openvino_cache"
# The compiled-model cache's folder when the repository's cannot be written (read-only mount).
CACHE_ENV = "CAPTIONER_OPENVINO_CACHE"


class RuntimeUnavailable(RuntimeError):
    """The runtime or precision cannot run on this machine (missing package, no bf16)."""


@dataclass(frozen=True)
class EngineSettings:
    runtime: str = ONNXRUNTIME
    threads: int = 1
    inference_precision: str = "fp32"
    cache_dir: str | None = None  # OpenVINO compiled-model cache; None: no cache
    spinning: bool = False  # onnxruntime only

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision must be one of {INFERENCE_PRECISIONS}, got {self.inference_precision!r}")
        if self.inference_precision == "bf16" and self.runtime != OPENVINO:
            raise ValueError("inference_precision bf16 is an OpenVINO hint; onnxruntime runs bf16 only as a bf16 graph")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @classmethod
    def from_config(cls, params: Mapping[str, str], version_dir: str | Path | None = None, prefix: str = "") -> EngineSettings:
        """From config.pbtxt parameters: `runtime`, `intra_op_threads`, `inference_precision`,
        `allow_spinning`; the OpenVINO cache lives in the model's version directory unless
        `cache_dir` names another (an absolute path, e.g. when the repository is read-only).
        `prefix`: a second graph's settings in the same model (the whole layout's decoder
        step: `step_runtime`, `step_intra_op_threads`, ...)."""
        cache = params.get("cache_dir") or (str(Path(version_dir) / CACHE_DIRNAME) if version_dir else None)
        return cls(
            runtime=params.get(f"{prefix}runtime", ONNXRUNTIME),
            threads=int(params.get(f"{prefix}intra_op_threads", 1)),
            inference_precision=params.get(f"{prefix}inference_precision", "fp32"),
            cache_dir=cache,
            spinning=str(params.get(f"{prefix}allow_spinning", "0")).lower() in ("1", "true", "yes"),
        )

    def config_parameters(self) -> dict[str, str]:
        """The inverse of from_config (cache_dir excluded: it follows the repository)."""
        return {"runtime": self.runtime, "intra_op_threads": str(self.threads), "inference_precision": self.inference_precision}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16 or AMX): without it OpenVINO's bf16 hint
    would be emulated or ignored, never faster."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def writable_cache_dir(wanted: str | Path) -> str | None:
    """Where the compiled-model cache for `wanted` (the model's folder in the repository)
    goes: `wanted` itself when it can be written; else a folder under $CAPTIONER_OPENVINO_CACHE
    (default: the temp dir's captioner-openvino-cache), seeded with the blobs the build left
    in `wanted`, so that a repository mounted read-only (pods, images) still loads the
    build's blobs and a cache miss (another CPU) is stored, not compiled at every start.
    Blob names are content hashes, so models share the folder. None: nowhere writable."""
    wanted = Path(wanted)
    try:
        wanted.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if wanted.is_dir() and os.access(wanted, os.W_OK):
        return str(wanted)
    base = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "captioner-openvino-cache")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    for blob in wanted.iterdir() if wanted.is_dir() else ():
        target = base / blob.name
        if blob.is_file() and not target.exists():
            partial = base / f".{blob.name}.{os.getpid()}"
            try:
                shutil.copyfile(blob, partial)
                os.replace(partial, target)  # two instances seeding at once each land a whole file
            except OSError:  # unreadable or no room: that blob is compiled again
                partial.unlink(missing_ok=True)
    return str(base) if os.access(base, os.W_OK) else None


def readable_by_all(cache_dir: str | Path) -> None:
    """OpenVINO writes its blobs readable by their owner only; a repository whose cache
    the build filled is copied into an image and read by another user (the image's uid
    1000, the pod's init container), so every blob is made world-readable."""
    for blob in Path(cache_dir).iterdir():
        try:
            if blob.is_file():
                blob.chmod(blob.stat().st_mode | 0o444)
        except OSError:
            pass  # not ours (a shared cache folder): its owner's mode stays


class OpenVinoEngine:
    """An ONNX file compiled by OpenVINO for the CPU, with onnxruntime's `run` signature."""

    def __init__(self, path: str | Path, settings: EngineSettings):
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeUnavailable(f"openvino is not installed ({e}); pip install -r requirements.txt") from None
        if settings.inference_precision == "bf16" and not cpu_has_bf16():
            raise RuntimeUnavailable("this CPU has no bf16 instructions (avx512_bf16 / amx_bf16)")
        core = ov.Core()
        cache = writable_cache_dir(settings.cache_dir) if settings.cache_dir else None
        if cache:
            core.set_property({"CACHE_DIR": cache})
        self.cache_dir = cache
        config = {
            "INFERENCE_NUM_THREADS": settings.threads,
            # One stream: a Triton instance runs one batch at a time; parallelism comes
            # from the threads within it and from the other models' processes.
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # Pinned threads would fight the other model processes for the same cores.
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "bf16" if settings.inference_precision == "bf16" else "f32",
        }
        # A model object, not its path: OpenVINO then keys the cache by the graph's content,
        # so blobs the build compiled are found wherever the repository is mounted.
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        if cache:
            readable_by_all(cache)
        self.loaded_from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE"))
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self._outputs = {n: self.compiled.output(n) for n in self.output_names}

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()}, share_inputs=True)
        # share_outputs is off (the default): each array is a copy the next call cannot overwrite.
        return [result[self._outputs[n]] for n in (output_names or self.output_names)]


def load(path: str | Path, settings: EngineSettings = EngineSettings()):
    """An engine for the ONNX graph at `path` with `settings.runtime`."""
    if settings.runtime == OPENVINO:
        return OpenVinoEngine(path, settings)
    from .ort import OrtSettings, session

    return session(path, OrtSettings(intra_op_threads=settings.threads, spinning=settings.spinning))


def input_dtype(engine, name: str) -> np.dtype:
    """The element type an engine's input takes (float32 or uint8 images)."""
    if isinstance(engine, OpenVinoEngine):
        return np.dtype(engine.compiled.input(name).get_element_type().to_dtype())
    onnx_type = {i.name: i.type for i in engine.get_inputs()}[name]
    return np.dtype({"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}[onnx_type])


# --- choosing at build time ---------------------------------------------------------------


def throughput(
    engine,
    feed: Mapping[str, np.ndarray],
    rows: int,
    min_seconds: float = 0.5,
    min_runs: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Rows per second of `engine.run(None, feed)` after one warm-up run."""
    engine.run(None, feed)
    runs, t0 = 0, clock()
    while runs < min_runs or clock() - t0 < min_seconds:
        engine.run(None, feed)
        runs += 1
    return runs * rows / (clock() - t0)


@dataclass(frozen=True)
class Choice:
    runtime: str
    reason: str
    rows_per_s: dict[str, float]  # runtime -> measured rows/s (empty when not measured)

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "reason": self.reason, "rows_per_s": self.rows_per_s}


def choose(requested: str, measured: Mapping[str, float | None], margin: float = 1.0) -> Choice:
    """The runtime to serve: `requested` unless it is "auto", in which case the faster of
    the measured ones (None: could not run here). Ties, within `margin`, keep onnxruntime,
    the default with fewer moving parts."""
    rates = {k: v for k, v in measured.items() if v is not None}
    if requested != "auto":
        if requested not in RUNTIMES:
            raise ValueError(f"runtime must be auto or one of {RUNTIMES}, got {requested!r}")
        if requested in measured and measured[requested] is None:
            raise RuntimeUnavailable(f"RUNTIME={requested} was asked for but does not run here")
        return Choice(requested, "requested", rates)
    if not rates:
        raise RuntimeUnavailable("no runtime runs here")
    ort_rate = rates.get(ONNXRUNTIME)
    ov_rate = rates.get(OPENVINO)
    if ov_rate is not None and (ort_rate is None or ov_rate > ort_rate * margin):
        why = "onnxruntime unavailable" if ort_rate is None else f"{ov_rate / ort_rate:.2f}x onnxruntime"
        return Choice(OPENVINO, f"auto: openvino faster ({why})", rates)
    # ov_rate set here means ort_rate is too: openvino would have been chosen above.
    why = "openvino unavailable" if ov_rate is None or ort_rate is None else f"{ort_rate / ov_rate:.2f}x openvino"
    return Choice(ONNXRUNTIME, f"auto: onnxruntime faster or tied ({why})", rates)
