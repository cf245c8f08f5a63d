"""Read-only inspection of a Triton model repository: is it complete and consistent, and
which checkpoint was it assembled from. The launcher asks this before serving a repository
(builder/repository.py writes one and runs the same check on it)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.serving import DECODER_STEP, ENCODER, ENSEMBLE, GENERATOR, PREPROCESS

MODELS = (PREPROCESS, ENCODER, DECODER_STEP, GENERATOR, ENSEMBLE)


class RepositoryError(ValueError):
    """The repository (or what it was built from) is incomplete or inconsistent."""


def _required_files(cfg: mc.ModelConfig) -> list[str]:
    main = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}.get(cfg.platform, "model.py")
    extra = {
        PREPROCESS: ["preprocess.json"]
        + (["model.onnx"] if is_fused(cfg) else [])
        + (["vocab.json", "decoder_step.onnx"] if is_whole(cfg) else []),
        GENERATOR: ["vocab.json"],
        ENCODER: ["model.onnx"] if cfg.backend == "python" else [],
        DECODER_STEP: ["model.onnx"],
    }[cfg.name]
    if cfg.name == GENERATOR and cfg.parameters["step_mode"].string_value == "inprocess":
        extra.append("decoder_step.onnx")
    return [main] + extra


def is_fused(cfg: mc.ModelConfig) -> bool:
    """The front model runs the encoder (the fused and the whole layouts)."""
    return cfg.name == PREPROCESS and "fused_encoder" in cfg.parameters


def is_whole(cfg: mc.ModelConfig) -> bool:
    """The front model runs everything: decode, encoder and the decode loop (the whole layout)."""
    return is_fused(cfg) and "fused_generator" in cfg.parameters


def front_layout(cfg: mc.ModelConfig) -> str:
    """The CPU layout a front (`preprocess`) config belongs to: split, fused or whole."""
    return "whole" if is_whole(cfg) else "fused" if is_fused(cfg) else "split"


# The models each layout leaves out: fused has no encoder model (preprocess runs it), whole
# has only preprocess (it runs the encoder and the decode loop, the step in its process).
ABSENT = {"split": (), "fused": (ENCODER,), "whole": (ENCODER, DECODER_STEP, GENERATOR)}


def check_repository(repo_dir: str | Path) -> dict[str, mc.ModelConfig]:
    """Parse every config back and assert the repository is complete and consistent."""
    repo_dir = Path(repo_dir)
    configs: dict[str, mc.ModelConfig] = {}
    for name in MODELS:
        path = repo_dir / name / "config.pbtxt"
        layout = front_layout(configs[PREPROCESS]) if PREPROCESS in configs else "split"
        if name in ABSENT[layout]:
            if path.exists():
                raise RepositoryError(f"{path}: the {layout} layout's preprocess runs {name}'s work; no {name} model")
            continue
        if not path.is_file():
            raise RepositoryError(f"missing {path}")
        text = path.read_text()
        cfg = text_format.Parse(text, mc.ModelConfig())
        if cfg.name != name:
            raise RepositoryError(f"{path}: name is {cfg.name!r}")
        if cfg.max_batch_size < 16:
            raise RepositoryError(f"{path}: max_batch_size {cfg.max_batch_size} < 16")
        for t in list(cfg.input) + list(cfg.output):
            # -1: a size that differs between the versions of a versioned repository (builder/versions.py)
            if not t.dims or any(d <= 0 and d != -1 for d in t.dims):
                raise RepositoryError(f"{path}: tensor {t.name} has dims {list(t.dims)}")
            if t.data_type == mc.TYPE_INVALID:
                raise RepositoryError(f"{path}: tensor {t.name} has no data type")
        for k, p in cfg.parameters.items():
            if not p.string_value or "{" in p.string_value:
                raise RepositoryError(f"{path}: parameter {k} is {p.string_value!r}")
        if name != ENSEMBLE:
            if not cfg.HasField("dynamic_batching"):
                raise RepositoryError(f"{path}: no dynamic batching")
            for w in cfg.model_warmup:
                for i in w.inputs.values():
                    if i.input_data_file and not (repo_dir / name / "warmup" / i.input_data_file).is_file():
                        raise RepositoryError(f"{name}: warmup {w.name} needs warmup/{i.input_data_file}")
            for v in _loaded_versions(cfg):
                version = repo_dir / name / str(v)
                for needed in _required_files(cfg):
                    if not (version / needed).is_file():
                        raise RepositoryError(f"{name}: missing {version / needed}")
        configs[name] = cfg

    # Follow the ensemble's tensors: every step input is produced before it is used, with
    # the data type and dims the consuming model declares.
    ens = configs[ENSEMBLE]
    for v in _loaded_versions(ens):
        if not (repo_dir / ENSEMBLE / str(v)).is_dir():
            raise RepositoryError(f"{ENSEMBLE}: missing version directory {v}")
    known = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            raise RepositoryError(f"ensemble step uses unknown model {step.model_name}")
        if step.model_version != -1 and step.model_version not in _loaded_versions(model):
            raise RepositoryError(
                f"ensemble step pinned to {model.name} version {step.model_version}, which "
                f"is not loaded (versions {_loaded_versions(model)})"
            )
        ins = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        if set(step.input_map) != set(ins):
            raise RepositoryError(f"ensemble feeds {sorted(step.input_map)} to {model.name}, which takes {sorted(ins)}")
        for inner, outer in step.input_map.items():
            if outer not in known:
                raise RepositoryError(f"ensemble tensor {outer} is used by {model.name} before it is produced")
            if known[outer] != ins[inner]:
                raise RepositoryError(f"ensemble tensor {outer} is {known[outer]}, {model.name}.{inner} wants {ins[inner]}")
        for inner, outer in step.output_map.items():
            if inner not in outs:
                raise RepositoryError(f"{model.name} has no output {inner}")
            known[outer] = outs[inner]
    for t in ens.output:
        if known.get(t.name) != (t.data_type, list(t.dims)):
            raise RepositoryError(f"ensemble output {t.name} is not produced as declared")
    return configs


def _loaded_versions(cfg: mc.ModelConfig) -> list[int]:
    """The versions Triton loads: the specific policy's, else (latest, the default) version 1."""
    return sorted(cfg.version_policy.specific.versions) if cfg.version_policy.HasField("specific") else [1]


def recorded_checkpoint(repo_dir: str | Path) -> str | None:
    """The sha256 of the checkpoint a repository was assembled from (None: no repository)."""
    path = Path(repo_dir) / ENSEMBLE / "config.pbtxt"
    if not path.is_file():
        return None
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    return cfg.parameters["checkpoint_sha256"].string_value if "checkpoint_sha256" in cfg.parameters else None
