"""A versioned model repository: a new checkpoint becomes the next version of every model.

`make build-engines VERSION=next` (`--add-version`) assembles the new model on its own (a
one-version repository, as any build) and moves it into the existing repository as
version N = highest + 1 of every composing model, keeping the last K versions on disk.
What Triton loads stays what it was: each composing model's `version_policy { specific }`
lists the versions loaded now, and the ensemble, one loaded version of its own, has every
step pinned to the same version of every composing model: the serving version. A request
never mixes two versions. launcher/rollout.py then loads N beside the serving version,
checks it, and re-pins the ensemble's steps to N; the functions below are the repository
edits that rollout makes (`set_loaded`, `set_serving`).

The ensemble keeps its version number across switches (Triton reloads a loaded version in
the background and swaps it in when ready, so `/v2/models/captioner/ready` never wavers);
a new ensemble version per switch would make Triton release the old one, and its
readiness check (find the latest ready version, then ask its state) can fall between the
two and answer not ready.

Per version, on disk:
  <model>/<N>/...                 that version's graphs, vocabulary, preprocessing, model.py
  <model>/<N>/parameters.json     that version's config parameters (a config.pbtxt is shared
                                  by all versions of a model; captioner.serving.versions
                                  reads this file over it)
  captioner/<N>/parameters.json   the ensemble's parameters while it serves N (checkpoint,
                                  target, ...); the ensemble's loaded version directory stays
  build_manifest.json "versions"  per version: checkpoint sha256, source path, build time,
                                  MODEL_VERSION label, and the in-process captions of the
                                  gate scenes (captioner.inference), which a rollout compares
                                  the served version's captions with

Versions may differ in layer sizes: a tensor dimension that differs between kept versions
is written as -1 (any) in the shared config, and warmup requests whose shape would fit only
one version are dropped (the rollout warms a version through its own requests instead).
They may not differ in what the ensemble wires (layout, encoder input type, target)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from captioner.serving import DECODER_STEP, ENCODER, ENSEMBLE, GENERATOR, PREPROCESS
from captioner.serving.versions import PARAMETERS_FILE, label

MANIFEST = "build_manifest.json"
COMPOSING = (PREPROCESS, ENCODER, DECODER_STEP, GENERATOR)
DEFAULT_KEEP = 3
# The scenes a rollout's gate captions (captioner.scenes.encoded_scenes(GATE_SCENES, GATE_SEED)).
GATE_SCENES, GATE_SEED = 16, 19019


class VersionError(ValueError):
    """The repository cannot take (or switch to) this version; the message says why."""


# --- reading ------------------------------------------------------------------------------


def read_config(repo: Path, name: str) -> mc.ModelConfig | None:
    path = Path(repo) / name / "config.pbtxt"
    return text_format.Parse(path.read_text(), mc.ModelConfig()) if path.is_file() else None


def write_config(repo: Path, cfg: mc.ModelConfig) -> None:
    """Replace a model's config.pbtxt in one rename (a load never reads half a file)."""
    path = Path(repo) / cfg.name / "config.pbtxt"
    tmp = path.with_name(".config.pbtxt.tmp")
    tmp.write_text(text_format.MessageToString(cfg))
    tmp.replace(path)


def policy_versions(cfg: mc.ModelConfig) -> list[int]:
    """The versions Triton loads for this config (a config without a specific policy: [1])."""
    return sorted(cfg.version_policy.specific.versions) if cfg.version_policy.HasField("specific") else [1]


def on_disk(repo: Path, name: str) -> list[int]:
    d = Path(repo) / name
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def models(repo: Path) -> list[str]:
    """The composing models this repository has (the fused layout has no encoder)."""
    return [m for m in COMPOSING if (Path(repo) / m / "config.pbtxt").is_file()]


def serving_version(repo: Path) -> int:
    """The version served: the one every step of the ensemble (one loaded version) is pinned to."""
    cfg = read_config(repo, ENSEMBLE)
    if cfg is None:
        raise VersionError(f"{repo} holds no {ENSEMBLE} model (make build-engines)")
    loaded = policy_versions(cfg)
    pins = {s.model_version for s in cfg.ensemble_scheduling.step}
    if len(loaded) != 1 or len(pins) != 1 or min(pins) < 1:
        raise VersionError(
            f"{repo}/{ENSEMBLE}: loads versions {loaded} with steps pinned to {sorted(pins)}; "
            "a versioned repository loads one ensemble version, all steps pinned to one version"
        )
    return pins.pop()


def loaded_versions(repo: Path) -> dict[str, list[int]]:
    """Per composing model, the versions its config tells Triton to load."""
    return {m: policy_versions(read_config(repo, m)) for m in models(repo)}


def all_versions(repo: Path) -> list[int]:
    """Versions present for the ensemble and every composing model (complete versions only)."""
    names = models(repo) + [ENSEMBLE]
    sets = [set(on_disk(repo, m)) for m in names]
    return sorted(set.intersection(*sets)) if sets else []


# --- the manifest ---------------------------------------------------------------------------


def read_manifest(repo: Path) -> dict:
    path = Path(repo) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def version_records(repo: Path) -> dict[int, dict]:
    """Per version on disk, what it was built from. A repository built before versions were
    recorded has one: version 1, described by its manifest's checkpoint."""
    manifest = read_manifest(repo)
    records = {int(k): v for k, v in manifest.get("model_versions", {}).items()}
    if not records and manifest.get("checkpoint"):
        ck = manifest["checkpoint"]
        records[1] = {
            "checkpoint_sha256": ck["sha256"],
            "source": ck.get("path"),
            "built": manifest.get("created"),
            "model_version": label(1, ck["sha256"]),
            "target": manifest.get("target"),
            "precision": manifest.get("precision"),
            "layout": manifest.get("layout"),
        }
    return records


def record_build(
    repo: Path, manifest: Mapping[str, Any], version: int, gate: Mapping[str, Any] | None, previous: Mapping[int, dict]
) -> dict:
    """Write the repository's manifest: this build's (as every build writes it) plus
    `model_versions`, one record per version still on disk (`previous`: version_records read
    before this build's manifest replaced the repository's). Returns the new record."""
    repo = Path(repo)
    records = dict(previous)
    ck = manifest["checkpoint"]
    records[version] = {
        "checkpoint_sha256": ck["sha256"],
        "source": str(ck["path"]),
        "built": manifest["created"],
        "model_version": label(version, ck["sha256"]),
        "target": manifest["target"],
        "precision": manifest["precision"],
        "layout": manifest["layout"],
        "gate": dict(gate or {}),
    }
    kept = set(all_versions(repo))
    out = {**manifest, "model_version": version, "model_versions": {str(v): r for v, r in sorted(records.items()) if v in kept}}
    (repo / MANIFEST).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return records[version]


def in_process(checkpoint: str | Path, preprocess: Mapping[str, Any] | None = None):
    """captioner.inference.Captioner for the checkpoint, decoding images as the version's
    preprocess.json says (the build may have chosen the fast decode path for it)."""
    from captioner.inference import Captioner
    from captioner.preprocess import PreprocessConfig

    captioner = Captioner(checkpoint, threads=2)
    if preprocess is not None:
        captioner.cfg = PreprocessConfig.from_dict(dict(preprocess))
    return captioner


def served_preprocess(repo: Path, version: int) -> dict | None:
    """The preprocess.json a version's preprocess model decodes with."""
    path = Path(repo) / PREPROCESS / str(version) / "preprocess.json"
    return json.loads(path.read_text()) if path.is_file() else None


def reference_captions(
    checkpoint: str | Path, scenes: int = GATE_SCENES, seed: int = GATE_SEED, preprocess: Mapping[str, Any] | None = None
) -> list[str]:
    """The checkpoint's own in-process captions (captioner.inference) of the gate scenes:
    what the served version must answer, caption for caption."""
    from captioner.scenes import encoded_scenes

    images = [png for png, _ in encoded_scenes(scenes, seed)]
    return [c.text for c in in_process(checkpoint, preprocess).caption_images(images)]


def gate_record(checkpoint: str | Path, staged: Path, scenes: int = GATE_SCENES, seed: int = GATE_SEED) -> dict:
    """The gate of a version assembled in `staged` (as version 1) from `checkpoint`."""
    captions = reference_captions(checkpoint, scenes, seed, served_preprocess(staged, 1))
    return {"scenes": scenes, "seed": seed, "captions": captions}


def save_gate(repo: Path, version: int, gate: Mapping[str, Any]) -> None:
    """Keep gate captions computed for a version whose build did not record them."""
    manifest = read_manifest(repo)
    records = manifest.setdefault("model_versions", {str(v): r for v, r in version_records(repo).items()})
    if str(version) in records:
        records[str(version)]["gate"] = dict(gate)
        (Path(repo) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


# --- adding a version -------------------------------------------------------------------------


def staging_dir(repo: Path) -> Path:
    """Where a build assembles the version it will add (beside the repository)."""
    repo = Path(repo)
    repo.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{repo.name}-next-", dir=repo.parent))


def check_addable(repo: Path, layout: str | None = None) -> str:
    """Refuse early (before a long build) what add_version would refuse: no repository, or
    one that is not versionable. Returns the repository's layout, which LAYOUT=auto takes."""
    repo = Path(repo)
    ens = read_config(repo, ENSEMBLE)
    if ens is None:
        raise VersionError(f"VERSION=next adds to an existing repository; {repo} has none (make build-engines first)")
    serving_version(repo)
    have = ens.parameters["layout"].string_value if "layout" in ens.parameters else "split"
    if layout not in (None, "auto", have):
        raise VersionError(f"{repo} has the {have} layout; a new version must have it too (LAYOUT={have} or auto)")
    return have


def add_version(staged: Path, repo: Path, keep: int = DEFAULT_KEEP) -> int:
    """Move the one-version repository `staged` (as builder.repository.assemble writes it)
    into `repo` as its next version N, and keep the newest `keep` versions on disk besides
    every version a config still loads. What Triton loads is not changed. Returns N."""
    staged, repo = Path(staged), Path(repo)
    if keep < 1:
        raise VersionError(f"--keep must be >= 1, got {keep}")
    try:
        _check_compatible(staged, repo)
        new = max([0] + [v for m in models(repo) + [ENSEMBLE] for v in on_disk(repo, m)]) + 1
        for name in models(repo):
            _add_model_version(staged, repo, name, new)
        _add_ensemble_version(staged, repo, new)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    prune(repo, keep)
    return new


def _check_compatible(staged: Path, repo: Path) -> None:
    serving_version(repo)
    have, want = models(repo), models(staged)
    if have != want:
        raise VersionError(
            f"the new build has models {want}, the repository {have}: layouts differ "
            f"(build the new version with the repository's LAYOUT)"
        )
    for name in have + [ENSEMBLE]:
        old, new = read_config(repo, name), read_config(staged, name)
        assert old is not None and new is not None
        if (old.backend, old.platform) != (new.backend, new.platform):
            raise VersionError(
                f"{name}: the repository runs {old.platform or old.backend}, the new build "
                f"{new.platform or new.backend} (a version cannot change its target)"
            )
        for kind in ("input", "output"):
            a = [(t.name, t.data_type, len(t.dims)) for t in getattr(old, kind)]
            b = [(t.name, t.data_type, len(t.dims)) for t in getattr(new, kind)]
            if a != b:
                raise VersionError(
                    f"{name}: {kind}s {b} of the new build differ from the repository's {a} "
                    f"(tensor names, types and ranks must match; only sizes may change)"
                )
    old_steps = [s.model_name for s in read_config(repo, ENSEMBLE).ensemble_scheduling.step]  # type: ignore[union-attr]
    new_steps = [s.model_name for s in read_config(staged, ENSEMBLE).ensemble_scheduling.step]  # type: ignore[union-attr]
    if old_steps != new_steps:
        raise VersionError(f"the ensemble's steps differ: {old_steps} in the repository, {new_steps} in the new build")


def _params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def _write_params(version_dir: Path, params: Mapping[str, str]) -> None:
    (version_dir / PARAMETERS_FILE).write_text(json.dumps(dict(params), indent=1, sort_keys=True) + "\n")


def _merge_dims(old: Iterable[int], new: Iterable[int]) -> list[int]:
    return [a if a == b else -1 for a, b in zip(old, new)]


def _add_model_version(staged: Path, repo: Path, name: str, version: int) -> None:
    old, new = read_config(repo, name), read_config(staged, name)
    assert old is not None and new is not None
    # Versions assembled before they were versioned read their parameters from the config,
    # which is about to change: give each its own copy first.
    for v in on_disk(repo, name):
        if not (repo / name / str(v) / PARAMETERS_FILE).is_file():
            _write_params(repo / name / str(v), _params(old))
    (staged / name / "1").rename(repo / name / str(version))
    _write_params(repo / name / str(version), _params(new))
    merged = mc.ModelConfig()
    merged.CopyFrom(new)
    merged.version_policy.CopyFrom(old.version_policy)
    if not merged.version_policy.HasField("specific"):
        merged.version_policy.specific.versions.append(1)
    for kind in ("input", "output"):
        for t_old, t_new in zip(getattr(old, kind), getattr(merged, kind)):
            dims = _merge_dims(t_old.dims, t_new.dims)
            del t_new.dims[:]
            t_new.dims.extend(dims)
    # A warmup request has one shape; where the versions' shapes differ it fits only one.
    variable = {t.name for t in merged.input if -1 in t.dims}
    keep = [w for w in merged.model_warmup if not variable & set(w.inputs)]
    del merged.model_warmup[:]
    merged.model_warmup.extend(keep)
    if (staged / name / "warmup").is_dir():
        shutil.rmtree(repo / name / "warmup", ignore_errors=True)
        (staged / name / "warmup").rename(repo / name / "warmup")
    write_config(repo, merged)


def _add_ensemble_version(staged: Path, repo: Path, version: int) -> None:
    """captioner/<N>/ with N's parameters; the config itself keeps serving what it serves."""
    old, new = read_config(repo, ENSEMBLE), read_config(staged, ENSEMBLE)
    assert old is not None and new is not None
    for v in on_disk(repo, ENSEMBLE):
        if not (repo / ENSEMBLE / str(v) / PARAMETERS_FILE).is_file():
            _write_params(repo / ENSEMBLE / str(v), _params(old))
    (staged / ENSEMBLE / "1").rename(repo / ENSEMBLE / str(version))
    _write_params(repo / ENSEMBLE / str(version), _params(new))


def prune(repo: Path, keep: int) -> list[int]:
    """Remove versions beyond the newest `keep`, never one a config loads or serves.
    Returns the versions removed."""
    repo = Path(repo)
    protected = {serving_version(repo)} | {v for vs in loaded_versions(repo).values() for v in vs}
    present = sorted({v for m in models(repo) + [ENSEMBLE] for v in on_disk(repo, m)})
    newest = set(present[-keep:])
    removed = [v for v in present if v not in newest and v not in protected]
    ensemble = set(policy_versions(read_config(repo, ENSEMBLE)))
    for v in removed:
        for m in models(repo) + ([ENSEMBLE] if v not in ensemble else []):  # the ensemble's own version stays
            shutil.rmtree(repo / m / str(v), ignore_errors=True)
    manifest = read_manifest(repo)
    if removed and "model_versions" in manifest:
        manifest["model_versions"] = {k: r for k, r in manifest["model_versions"].items() if int(k) not in removed}
        (repo / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return removed


# --- what a rollout changes -----------------------------------------------------------------


def set_loaded(repo: Path, name: str, versions: Iterable[int]) -> None:
    """Tell Triton (at the model's next load) to load exactly `versions` of composing model `name`."""
    repo = Path(repo)
    wanted = sorted(set(versions))
    missing = [v for v in wanted if not (repo / name / str(v)).is_dir()]
    if not wanted or missing:
        raise VersionError(f"{name}: cannot load versions {wanted}; missing on disk: {missing}")
    cfg = read_config(repo, name)
    assert cfg is not None
    del cfg.version_policy.specific.versions[:]
    cfg.version_policy.specific.versions.extend(wanted)
    write_config(repo, cfg)


def set_serving(repo: Path, version: int) -> None:
    """The ensemble's config for serving `version`: every step pinned to it, and its
    parameters (checkpoint, target, ...) as the config's; the ensemble's own loaded version
    stays (a reload of it is swapped in by Triton with no gap)."""
    repo = Path(repo)
    if not (repo / ENSEMBLE / str(version)).is_dir():
        raise VersionError(f"{ENSEMBLE}: no version {version} on disk (versions: {on_disk(repo, ENSEMBLE)})")
    for name in models(repo):
        if version not in policy_versions(read_config(repo, name)):
            raise VersionError(f"{name} does not load version {version}: load it before serving it")
    cfg = read_config(repo, ENSEMBLE)
    assert cfg is not None
    for step in cfg.ensemble_scheduling.step:
        step.model_version = version
    own = repo / ENSEMBLE / str(version) / PARAMETERS_FILE
    if own.is_file():
        cfg.ClearField("parameters")
        for k, v in json.loads(own.read_text()).items():
            cfg.parameters[k].string_value = str(v)
    write_config(repo, cfg)
