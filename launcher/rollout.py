"""`make rollout MODEL=...` and `make rollback`: switch the model a running server serves,
with no downtime, through Triton's model-repository API (the launcher runs tritonserver
with `--model-control-mode=explicit`).

    python -m launcher.rollout rollout --model runs/new --repo model_repository
    python -m launcher.rollout rollback --repo model_repository

A rollout builds the checkpoint into the repository as its next version N (builder/versions.py,
`make build-engines VERSION=next`), then:

1. load: every composing model loads N beside the serving version S (its config's
   `version_policy` lists both; Triton loads the new version and leaves S serving);
2. gate: version N's own models caption the gate scenes, called one after the other as
   the ensemble calls them, every model asked for version N; each caption must equal the
   checkpoint's in-process caption (captioner.inference, recorded by the build) and name
   N in MODEL_VERSION; this also warms N;
3. switch: the ensemble's steps are re-pinned from S to N in its config and Triton
   reloads the ensemble: it builds the re-pinned ensemble in the background and swaps it
   in when ready (the switch ends when a fresh request is answered by N), so requests
   from then on run through N. A request holds the models it
   was started with (the ensemble and every step's model, taken when it arrives) until it
   ends: every request runs through one version end to end and none fails;
4. unload: the composing models load N only. Triton releases S and destroys it when the
   last request holding it has finished: the drain is Triton's own. (The ensemble keeps its
   version number: builder/versions.py says why.)

A rollback does the same towards the version served before (still on disk), without a
build. A checkpoint that fails to build, a version that fails to load, or one whose
captions differ from its own is refused: N is unloaded and removed, S never stopped serving.

Readiness: Triton's strict server readiness (`/v2/health/ready`) is false while any model
version is loading or unloading, so it drops for the seconds a version takes to load or
unload even though every request is answered; the served model's readiness
(`/v2/models/captioner/ready`) stays true throughout (deploy/README.md: which to probe)."""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from builder import versions
from captioner.cli import env
from captioner.serving import ENSEMBLE
from captioner.serving.versions import OUTPUT as MODEL_VERSION

from .tritonserver import DEFAULT_PORTS, PROJECT_ROOT

EXIT_REFUSED, EXIT_USAGE, EXIT_FAILED = 1, 2, 3
LOCK = ".rollout.lock"


class RolloutRefused(RuntimeError):
    """The new version was not switched to; the serving version is untouched. Says why."""


class RolloutFailed(RuntimeError):
    """Something went wrong after the switch began (the server stopped answering, ...)."""


@dataclass
class Server:
    """The running tritonserver's HTTP endpoint and the header that opens its restricted APIs."""

    url: str = f"127.0.0.1:{DEFAULT_PORTS['http']}"
    headers: dict[str, str] = field(default_factory=dict)
    load_timeout_s: float = 600.0

    def client(self, timeout_s: float | None = None):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(
            self.url, connection_timeout=10.0, network_timeout=timeout_s or self.load_timeout_s
        )


@dataclass
class Outcome:
    """What a rollout or rollback did; monotonic times for the fault harness."""

    action: str
    from_version: int
    to_version: int
    label: str  # MODEL_VERSION of the version now served
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (start, end), time.monotonic()
    switch_started: float = 0.0  # time.monotonic() when the ensemble load was asked
    switched: float = 0.0  # ... when a fresh request got the new version: new requests get it from then on


def _log(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def _phase(out: Outcome, name: str, log: Callable[[str], None]) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    out.phases[name] = (t0, time.monotonic())
    out.seconds[name] = round(out.phases[name][1] - t0, 2)
    log(f"      ({name}: {out.seconds[name]:.1f} s)")


@contextmanager
def _locked(repo: Path) -> Iterator[None]:
    """One rollout or rollback at a time per repository."""
    with open(Path(repo) / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RolloutRefused(f"another rollout or rollback is running on {repo}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- asking the server ----------------------------------------------------------------------


def ready_versions(server: Server) -> dict[str, set[int]]:
    """model -> versions READY now (Triton's repository index)."""
    out: dict[str, set[int]] = {}
    for m in server.client(10.0).get_model_repository_index(headers=server.headers):
        if m.get("state") == "READY" and str(m.get("version", "")).isdigit():
            out.setdefault(m["name"], set()).add(int(m["version"]))
    return out


def served_label(server: Server, png: bytes) -> str:
    """MODEL_VERSION of one caption through the ensemble as clients ask for it (no version)."""
    return caption_through(server, png)[1]


SWITCH_CONFIRM_S = 30.0


def await_label(server: Server, label: str, timeout_s: float = SWITCH_CONFIRM_S) -> None:
    """Until a fresh request through the ensemble is answered by `label`; RolloutFailed
    after timeout_s (the server answers from some other version)."""
    from captioner.scenes import encoded_scenes

    png = encoded_scenes(1, seed=7)[0][0]
    deadline, got = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            got = served_label(server, png)
        except Exception as e:  # noqa: BLE001 - asked again until the deadline; the last answer is reported
            got = f"an error ({type(e).__name__}: {str(e)[:200]})"
        if got == label:
            return
        time.sleep(0.01)
    raise RolloutFailed(f"{ENSEMBLE} still answers as {got}, {timeout_s:g} s after it was switched to {label}")


def caption_through(server: Server, png: bytes, model: str = ENSEMBLE, version: str = "") -> tuple[str, str]:
    """(CAPTION, MODEL_VERSION) of one image through `model` (version "" = the served one)."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[png]], dtype=np.object_))
    outs = [httpclient.InferRequestedOutput(n) for n in ("CAPTION", MODEL_VERSION)]
    r = server.client(60.0).infer(model, [inp], model_version=version, outputs=outs)
    return r.as_numpy("CAPTION")[0, 0].decode(), r.as_numpy(MODEL_VERSION)[0, 0].decode()


def caption_version(server: Server, repo: Path, version: int, png: bytes) -> tuple[str, str]:
    """(CAPTION, MODEL_VERSION) of one image through version `version` of each model of the
    ensemble, called in the ensemble's step order with the ensemble's tensor wiring: the
    path a request takes once that version serves, before it does."""
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    ens = versions.read_config(repo, ENSEMBLE)
    assert ens is not None
    tensors: dict[str, np.ndarray] = {"IMAGE": np.array([[png]], dtype=np.object_)}
    client = server.client(120.0)
    for step in ens.ensemble_scheduling.step:
        inputs = []
        for inner, outer in step.input_map.items():
            arr = tensors[outer]
            inp = httpclient.InferInput(
                inner, list(arr.shape), "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype)
            )
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outs = [httpclient.InferRequestedOutput(inner) for inner in step.output_map]
        r = client.infer(step.model_name, inputs, model_version=str(version), outputs=outs)
        for inner, outer in step.output_map.items():
            tensors[outer] = r.as_numpy(inner)
    return tensors["CAPTION"][0, 0].decode(), tensors[MODEL_VERSION][0, 0].decode()


# --- the steps ------------------------------------------------------------------------------


def build_next(repo: Path, model: str, keep: int, extra: list[str], log: Callable[[str], None]) -> int:
    """`make build-engines VERSION=next` for `model`: the new version's number."""
    from builder.command import build_command

    before = versions.all_versions(repo)
    cmd = build_command(model, repo, extra=["--add-version", "--keep", str(keep), *extra])
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        log("  | " + line)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise RolloutRefused(f"the build of {model} failed (exit {proc.returncode}):\n{tail}")
    added = versions.read_manifest(repo).get("model_version")
    if not isinstance(added, int) or added in before or added not in versions.all_versions(repo):
        raise RolloutRefused(f"the build of {model} exited 0 but added no version to {repo}")
    return added


def check_serving(server: Server, repo: Path, records: dict[int, dict]) -> int:
    """The server answers from this repository's serving version; that version's number."""
    serving = versions.serving_version(repo)
    try:
        ready = ready_versions(server)
    except Exception as e:  # noqa: BLE001 - connection refused, restricted API, ...
        raise RolloutRefused(f"cannot reach the server's model-repository API at {server.url}: {e}") from None
    own = set(versions.policy_versions(versions.read_config(repo, ENSEMBLE)))
    if not own & ready.get(ENSEMBLE, set()):
        raise RolloutRefused(
            f"the server at {server.url} has no {ENSEMBLE} version {sorted(own)} ready, which {repo} "
            f"loads (READY: {sorted(ready.get(ENSEMBLE, set()))}): is it serving this repository? "
            f"(make serve REPO={repo})"
        )
    want = records.get(serving, {}).get("model_version")
    if want:
        from captioner.scenes import encoded_scenes

        got = served_label(server, encoded_scenes(1, seed=7)[0][0])
        if got != want:
            raise RolloutRefused(
                f"the server at {server.url} answers as {got}, {repo}'s serving version is {want}: another repository?"
            )
    return serving


def _gate_reference(repo: Path, record: dict, version: int) -> tuple[list[str], int, int]:
    gate = record.get("gate") or {}
    if gate.get("captions"):
        return list(gate["captions"]), int(gate["scenes"]), int(gate["seed"])
    # Recorded by a build before gates were: the source checkpoint, when it is still the same file.
    from captioner.checkpoint import file_sha256

    source = record.get("source")
    if not source or not Path(source).is_file() or file_sha256(source) != record.get("checkpoint_sha256"):
        raise RolloutRefused(
            f"version {version} has no recorded gate captions and its checkpoint {source} is gone "
            "or changed: its captions cannot be checked"
        )
    captions = versions.reference_captions(source, preprocess=versions.served_preprocess(repo, version))
    versions.save_gate(repo, version, {"scenes": versions.GATE_SCENES, "seed": versions.GATE_SEED, "captions": captions})
    return captions, versions.GATE_SCENES, versions.GATE_SEED


def gate(server: Server, repo: Path, version: int, record: dict, log: Callable[[str], None]) -> None:
    """Version `version`, loaded, captions the gate scenes exactly as its checkpoint does in process."""
    from captioner.scenes import encoded_scenes

    want, n, seed = _gate_reference(repo, record, version)
    label = record["model_version"]
    bad = []
    for i, ((png, _), expected) in enumerate(zip(encoded_scenes(n, seed), want)):
        try:
            caption, named = caption_version(server, repo, version, png)
        except Exception as e:  # noqa: BLE001 - any failure of the new version refuses it
            raise RolloutRefused(f"version {version} failed to caption gate scene {i}: {e}") from None
        if named != label:
            raise RolloutRefused(f"version {version} answers as {named}, expected {label}")
        if caption != expected:
            bad.append(f"scene {i}: served {caption!r}, in-process {expected!r}")
    if bad:
        raise RolloutRefused(
            f"version {version} ({label}) captions {len(bad)} of {n} gate scenes unlike its own "
            "checkpoint in process:\n  " + "\n  ".join(bad[:5])
        )
    log(f"      gate passed: {n} of {n} captions equal the checkpoint's in-process captions, MODEL_VERSION {label}")


def _load(server: Server, repo: Path, model_versions: dict[str, list[int]]) -> None:
    client = server.client()
    for name, wanted in model_versions.items():
        versions.set_loaded(repo, name, wanted)
    for name in model_versions:
        client.load_model(name, headers=server.headers)


def switch(
    server: Server, repo: Path, target: int, action: str, records: dict[int, dict], *, log: Callable[[str], None] = _log
) -> Outcome:
    """Load `target` beside the serving version, gate it, serve it, unload the old one."""
    serving = versions.serving_version(repo)
    if target == serving:
        raise RolloutRefused(f"version {target} is already served")
    record = records.get(target)
    if record is None:
        raise RolloutRefused(f"version {target} has no record in {repo}/{versions.MANIFEST}")
    out = Outcome(action, serving, target, record["model_version"])
    names = versions.models(repo)
    log(f"[load] {', '.join(names)} version {target} beside the serving version {serving}")
    try:
        with _phase(out, "load", log):
            _load(server, repo, {m: [serving, target] for m in names})
        log(f"[gate] version {target}'s models caption the gate scenes")
        with _phase(out, "gate", log):
            gate(server, repo, target, record, log)
    except Exception as e:
        _revert(server, repo, serving, names, log)
        if isinstance(e, RolloutRefused):
            raise
        raise RolloutRefused(f"version {target} failed to load: {e}") from None

    log(f"[switch] {ENSEMBLE}'s steps pinned to version {target}")
    with _phase(out, "switch", log):
        versions.set_serving(repo, target)
        out.switch_started = time.monotonic()
        try:
            server.client().load_model(ENSEMBLE, headers=server.headers)
        except Exception as e:
            versions.set_serving(repo, serving)
            _revert(server, repo, serving, names, log)
            raise RolloutRefused(f"{ENSEMBLE} pinned to version {target} failed to load: {e}") from None
        # A request sent just after Triton answered the load can still get the old ensemble:
        # the switch is done once a fresh request gets the new version.
        await_label(server, record["model_version"])
        out.switched = time.monotonic()
    log(f"[unload] version {serving} of {', '.join(names)} (each goes once its last request has finished)")
    with _phase(out, "unload", log):
        _load(server, repo, {m: [target] for m in names})
    return out


def _revert(server: Server, repo: Path, serving: int, names: list[str], log: Callable[[str], None]) -> None:
    """Back to loading the serving version only; what failed is unloaded."""
    log(f"      refused: back to version {serving} only")
    try:
        _load(server, repo, {m: [serving] for m in names})
    except Exception as e:  # noqa: BLE001 - the serving version never stopped; say what is left
        log(f"      (unloading the refused version failed: {e}; it stays loaded beside {serving})")


def _record_switch(repo: Path, out: Outcome) -> None:
    manifest = versions.read_manifest(repo)
    history = manifest.setdefault("serving_history", [])
    history.append({"action": out.action, "from": out.from_version, "to": out.to_version, "at": _now(), "seconds": out.seconds})
    manifest["serving"] = out.to_version
    manifest["previous"] = out.from_version
    (Path(repo) / versions.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def rollout(
    repo: str | Path,
    model: str,
    server: Server,
    *,
    keep: int = versions.DEFAULT_KEEP,
    build_args: list[str] | None = None,
    log: Callable[[str], None] = _log,
) -> Outcome:
    """Build `model` as the next version of `repo` and switch `server` to it."""
    repo = Path(repo)
    with _locked(repo):
        records = versions.version_records(repo)
        serving = check_serving(server, repo, records)
        label = records.get(serving, {}).get("model_version", "?")
        log(f"[build] {model} -> {repo} as the next version (serving: {serving}, {label})")
        t0 = time.monotonic()
        new = build_next(repo, model, keep, list(build_args or []), log)
        built = time.monotonic()
        records = versions.version_records(repo)
        try:
            out = switch(server, repo, new, "rollout", records, log=log)
        except RolloutRefused:
            _remove(repo, new, log)
            raise
        out.seconds = {"build": round(built - t0, 2), **out.seconds}
        out.phases = {"build": (t0, built), **out.phases}
        _record_switch(repo, out)
    log(
        f"rollout: {ENSEMBLE} serves version {out.to_version} ({out.label}); version {out.from_version} unloaded, "
        f"kept on disk for make rollback"
    )
    return out


def rollback(repo: str | Path, server: Server, *, to: int | None = None, log: Callable[[str], None] = _log) -> Outcome:
    """Switch `server` back to the version served before (or `to`), still on disk."""
    repo = Path(repo)
    with _locked(repo):
        records = versions.version_records(repo)
        serving = check_serving(server, repo, records)
        target = to if to is not None else _previous(repo, serving)
        if target not in versions.all_versions(repo):
            raise RolloutRefused(f"version {target} is not on disk in {repo} (versions {versions.all_versions(repo)})")
        log(f"[rollback] from version {serving} to {target} ({records.get(target, {}).get('model_version', '?')})")
        out = switch(server, repo, target, "rollback", records, log=log)
        _record_switch(repo, out)
    log(f"rollback: {ENSEMBLE} serves version {out.to_version} ({out.label}); version {out.from_version} unloaded")
    return out


def _previous(repo: Path, serving: int) -> int:
    manifest = versions.read_manifest(repo)
    on_disk = versions.all_versions(repo)
    before = manifest.get("previous")
    if isinstance(before, int) and before != serving and before in on_disk:
        return before
    older = [v for v in on_disk if v < serving]
    if not older:
        raise RolloutRefused(f"no version before {serving} on disk in {repo} (versions {on_disk})")
    return older[-1]


def _remove(repo: Path, version: int, log: Callable[[str], None]) -> None:
    """A refused version never served: off the disk and out of the manifest."""
    import shutil

    for m in versions.models(repo) + [ENSEMBLE]:
        shutil.rmtree(repo / m / str(version), ignore_errors=True)
    manifest = versions.read_manifest(repo)
    manifest.get("model_versions", {}).pop(str(version), None)
    (repo / versions.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    log(f"      version {version} removed from {repo}")


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launcher.rollout",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("rollout", "rollback"))
    p.add_argument(
        "--model", default=env("CAPTIONER_MODEL", None), help="rollout: the new checkpoint (dir or file) [$CAPTIONER_MODEL]"
    )
    p.add_argument(
        "--repo",
        default=env("CAPTIONER_REPO", "model_repository"),
        help="the repository the server serves (make serve REPO=...) [$CAPTIONER_REPO]",
    )
    p.add_argument(
        "--url",
        default=env("CAPTIONER_HTTP_URL", f"127.0.0.1:{DEFAULT_PORTS['http']}"),
        help="the server's HTTP address (model-repository API) [$CAPTIONER_HTTP_URL]",
    )
    p.add_argument(
        "--restricted-key",
        default=env("CAPTIONER_RESTRICTED_KEY", None),
        metavar="NAME=VALUE",
        help="the header that opens the server's restricted APIs (make serve --restricted-key) [$CAPTIONER_RESTRICTED_KEY]",
    )
    p.add_argument(
        "--keep",
        type=int,
        default=env("CAPTIONER_KEEP_VERSIONS", versions.DEFAULT_KEEP, int),
        help="versions kept on disk [$CAPTIONER_KEEP_VERSIONS]",
    )
    p.add_argument("--to", type=int, default=None, help="rollback: this version instead of the one served before")
    p.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to the build (python -m builder.build_engines), e.g. --build-arg=--runtime=onnxruntime",
    )
    a = p.parse_args(argv)
    if a.action == "rollout" and not a.model:
        p.error("rollout needs --model (make rollout MODEL=<checkpoint>)")
    if a.keep < 1:
        p.error("--keep must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    headers = {}
    if a.restricted_key:
        name, _, value = a.restricted_key.partition("=")
        headers[name] = value
    server = Server(a.url, headers)
    try:
        if a.action == "rollout":
            rollout(a.repo, a.model, server, keep=a.keep, build_args=a.build_arg)
        else:
            rollback(a.repo, server, to=a.to)
    except versions.VersionError as e:
        print(f"{a.action} refused: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RolloutRefused as e:
        print(f"{a.action} REFUSED, serving unchanged: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except RolloutFailed as e:
        print(f"{a.action} FAILED after the switch began (both versions stay loaded): {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
