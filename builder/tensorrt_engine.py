"""TensorRT engine for the encoder, for TensorRT 10.x and 11.x.

An engine only runs under the TensorRT version that built it, so this must run with
the TensorRT of the Triton image that will serve it (docs/gpu.md). The two majors
differ in how reduced precision is asked for:
- 10.x still has the weak-typing builder flags: fp16 is `BuilderFlag.FP16` on the
  fp32 graph.
- 11.x removed them: networks are strongly typed, so an fp16 engine comes from an
  fp16 graph (casts at export) and int8 from Q/DQ nodes.
Which API is present is detected from the module (`BuilderFlag.FP16` exists or not),
not from the version string. fp32 and int8 build the same way on both: a strongly
typed network over the fp32 graph or over the Q/DQ graph.

`tensorrt` is imported lazily: CPU machines never need it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

NO_CUDA = "no CUDA device: TensorRT engine skipped, CPU repository built"
OPT_BATCH = 8
WORKSPACE_BYTES = 2 << 30
# Engine vs onnxruntime on the graph it was built from: max |diff| <= tolerance x
# max(1, max |reference|). TensorRT picks other kernels than onnxruntime and rounds
# differently in reduced precision, hence one figure per precision; whether reduced
# precision still captions like fp32 is the separate agreement check.
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1}
ENGINE_PRECISIONS = tuple(ENGINE_TOLERANCE)  # the ones of captioner.serving.PRECISIONS TensorRT builds


class EngineUnavailable(RuntimeError):
    """No engine can be built on this machine (reported, not a crash)."""


class NoCudaDevice(EngineUnavailable):
    pass


class TensorRTMissing(EngineUnavailable):
    pass


class EngineBuildError(RuntimeError):
    pass


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def require_cuda() -> None:
    if not cuda_available():
        raise NoCudaDevice(NO_CUDA)


def import_tensorrt(expected_version: str | None = None):
    """The tensorrt module; with `expected_version` ("10.5", "11.4.0", ...) it must match
    that prefix, because the engine will only load in a Triton with the same TensorRT."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTMissing(
            "the tensorrt Python package is not installed: install the version inside the target Triton "
            "image (docs/gpu.md), e.g. pip install 'tensorrt==10.5.*' for tritonserver 24.10"
        ) from None
    version = str(getattr(trt, "__version__", "unknown"))
    if expected_version and not _version_matches(version, expected_version):
        raise EngineUnavailable(
            f"tensorrt {version} is installed but the target Triton needs {expected_version}: an engine built "
            f"by {version} would not load there"
        )
    return trt


def _version_matches(version: str, expected: str) -> bool:
    want = expected.strip().split(".")
    return version.split(".")[: len(want)] == want


@dataclass(frozen=True)
class TrtApi:
    version: str
    major: int
    weak_typing: bool  # precision builder flags (FP16/INT8) exist: TensorRT <= 10.x

    @property
    def label(self) -> str:
        kind = "builder precision flags available" if self.weak_typing else "strongly typed only"
        return f"TensorRT {self.version} ({kind})"


def detect_api(trt) -> TrtApi:
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    return TrtApi(version, major, hasattr(trt.BuilderFlag, "FP16"))


@dataclass(frozen=True)
class BuildRecipe:
    """How one precision is realised on one API: which ONNX graph, which network mode."""

    precision: str
    onnx_kind: str  # "fp32" | "fp16" | "int8_qdq"
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()


def recipe_for(api: TrtApi, precision: str) -> BuildRecipe:
    if precision == "fp32":
        return BuildRecipe("fp32", "fp32", True)
    if precision == "fp16":
        if api.weak_typing:
            return BuildRecipe("fp16", "fp32", False, ("FP16",))
        return BuildRecipe("fp16", "fp16", True)
    if precision == "int8":
        return BuildRecipe("int8", "int8_qdq", True)
    raise ValueError(f"precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")


def _network_flags(trt, strongly_typed: bool) -> int:
    flags = 0
    # 11.x keeps STRONGLY_TYPED only for compatibility (always on); 10.x needs it.
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def _load_timing_cache(trt, config, path: Path, log: Callable[[str], None]):
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        loaded = cache is not None and config.set_timing_cache(cache, False)
    except Exception:  # a truncated or foreign file: timings are only a speed-up
        loaded = False
    if not loaded:
        log(f"timing cache {path} does not match this GPU/TensorRT: starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    elif blob:
        log(f"timing cache {path}: reused ({len(blob)} bytes)")


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(data))
    tmp.replace(path)


def build_engine(
    trt,
    onnx_path: str | Path,
    recipe: BuildRecipe,
    max_batch: int,
    timing_cache: str | Path,
    opt_batch: int = OPT_BATCH,
    workspace_bytes: int = WORKSPACE_BYTES,
    log: Callable[[str], None] = print,
) -> bytes:
    """Serialized engine for an ONNX graph whose inputs have one dynamic (batch) axis:
    one optimisation profile min 1 / opt `opt_batch` / max `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, recipe.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors or 'no parser message'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if recipe.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 would round inputs to 10 bits: not an fp32 engine
    for name in recipe.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))

    opt = min(opt_batch, max_batch)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if not dims or dims[0] != -1 or -1 in dims[1:]:
            raise EngineBuildError(f"input {tensor.name!r} has shape {dims}: expected a dynamic batch axis only")
        rest = dims[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache)
    _load_timing_cache(trt, config, cache_path, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (its log above says why)")
    _atomic_write(cache_path, config.get_timing_cache().serialize())
    return bytes(serialized)


def _torch_dtype(trt, dt):
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "INT8": torch.int8,
        "BOOL": torch.bool,
    }
    for name, torch_dt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return torch_dt
    raise EngineBuildError(f"unsupported engine I/O dtype {dt}")


class GpuEngine:
    """A deserialized engine with one execution context; torch allocates the device
    buffers (no extra CUDA binding package needed)."""

    def __init__(self, trt, engine_bytes: bytes):
        require_cuda()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineBuildError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda")
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)), device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outputs[name] = t
        stream = torch.cuda.Stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("engine execution failed")
        stream.synchronize()
        return {n: t.float().cpu().numpy() for n, t in outputs.items()}


def open_engine(trt, engine_bytes: bytes) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """feeds -> outputs on the GPU, for batches within the engine's profile."""
    return GpuEngine(trt, engine_bytes)


def in_batches(run: Callable[[dict], dict], feeds: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
    """Run `feeds` through `run` in slices of at most `max_batch` rows (the profile's
    max) and concatenate the outputs."""
    n = len(next(iter(feeds.values())))
    parts = [run({k: v[i : i + max_batch] for k, v in feeds.items()}) for i in range(0, n, max_batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass
class EngineResult:
    plan_path: Path
    api: TrtApi
    recipe: BuildRecipe
    onnx_path: Path
    diffs: list  # parity.Diff, engine vs onnxruntime
    tolerance: float
    encode: Callable | None = field(default=None, repr=False)  # the engine as an encoder, for agreement checks

    @property
    def passed(self) -> bool:
        return all(d.worst <= self.tolerance * max(1.0, d.ref_max) for d in self.diffs)

    def to_dict(self) -> dict:
        return {
            "tensorrt_version": self.api.version,
            "api": "weak typing flags" if self.api.weak_typing else "strongly typed only",
            "precision": self.recipe.precision,
            "onnx": self.onnx_path.name,
            "strongly_typed": self.recipe.strongly_typed,
            "builder_flags": list(self.recipe.builder_flags),
            "tolerance": self.tolerance,
            "passed": self.passed,
            "diffs": [asdict(d) for d in self.diffs],
        }


def build_encoder_plan(
    ck,
    onnx_for: Callable[[str], Path],
    out_dir: str | Path,
    max_batch: int,
    precision: str,
    timing_cache: str | Path | None = None,
    expected_version: str | None = None,
    log: Callable[[str], None] = print,
) -> EngineResult:
    """Encoder engine for `precision`, checked against onnxruntime on the same graph.

    `onnx_for(kind)` returns the ONNX file of a kind ("fp32", "fp16", "int8_qdq"),
    producing it on demand: which one is needed depends on the TensorRT API found."""
    from . import parity

    require_cuda()
    trt = import_tensorrt(expected_version)
    api = detect_api(trt)
    recipe = recipe_for(api, precision)
    log(
        f"{api.label}: {precision} from the {recipe.onnx_kind} graph, "
        f"{'strongly typed' if recipe.strongly_typed else 'weakly typed'}"
        f"{', flags ' + '+'.join(recipe.builder_flags) if recipe.builder_flags else ''}; "
        f"profile batch 1/{min(OPT_BATCH, max_batch)}/{max_batch}"
    )
    onnx_path = Path(onnx_for(recipe.onnx_kind))
    out_dir = Path(out_dir)
    cache = Path(timing_cache) if timing_cache else out_dir / "tensorrt_timing.cache"
    engine = build_engine(trt, onnx_path, recipe, max_batch, cache, log=log)
    plan_path = out_dir / f"encoder.{precision}.plan"
    _atomic_write(plan_path, engine)

    reference = parity.onnx_encode(parity.session(onnx_path))
    run = open_engine(trt, engine)

    def on_engine(x: np.ndarray):
        out = in_batches(run, {"image": x}, max_batch)
        return out["h0"], out["c0"]

    diffs = parity.encoder_diffs(ck, on_engine, graph="engine", batch_sizes=sorted({1, 7, max_batch}), reference=reference)
    return EngineResult(plan_path, api, recipe, onnx_path, diffs, ENGINE_TOLERANCE[precision], on_engine)
