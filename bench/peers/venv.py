"""The peers' virtual environments: one per peer under .peers/<name>/ (ignored), made by the
bench on first use and reused while its requirements are unchanged.

Each holds the peer framework at the exact pin in bench/peers/requirements-<name>.txt and
the runtime packages it shares with the Triton stack (numpy, onnxruntime, openvino,
pillow and the fast decoders) at the project's own pins from requirements.txt, so a peer runs the same graphs
through the same runtime build. No peer goes into .venv: their dependency trees pin
fastapi, uvicorn, grpcio and protobuf differently from ours, and `make setup` / `make
test` must not install a distributed runtime to test a captioner.

    python -m bench.peers.venv ray litserve mlserver   # make (or check) the three venvs
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEERS = ("ray", "litserve", "mlserver")
VENV_ROOT = ROOT / ".peers"
# What a peer imports from the Triton stack's dependencies: same versions, same kernels.
SHARED = ("numpy", "onnxruntime", "openvino", "pillow", "pyspng", "deflate", "simplejpeg")
STAMP = ".bench-stamp.json"


def _check(name: str) -> None:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def requirements_file(name: str) -> Path:
    _check(name)
    return HERE / f"requirements-{name}.txt"


def _pins(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def shared_pins(project_requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """The project's exact pins of SHARED (every one must be there, as name==version)."""
    found = {}
    for pin in _pins(project_requirements):
        name = re.match(r"[A-Za-z0-9_.-]+", pin)
        if name and name.group(0).lower() in SHARED:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+==[^=<>!~,;\s]+", pin):
                raise ValueError(f"{project_requirements}: {pin!r} is not an exact pin (name==version)")
            found[name.group(0).lower()] = pin
    missing = [s for s in SHARED if s not in found]
    if missing:
        raise ValueError(f"{project_requirements} pins none of {', '.join(missing)}")
    return [found[s] for s in SHARED]


def requirements(name: str, project_requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """Every pin the peer's venv gets: the framework's file, then the shared runtime pins."""
    own = _pins(requirements_file(name))
    bad = [p for p in own if "==" not in p]
    if bad:
        raise ValueError(f"{requirements_file(name)}: not exact pins: {bad}")
    return own + shared_pins(project_requirements)


def venv_dir(name: str, root: Path = VENV_ROOT) -> Path:
    _check(name)
    return root / name


def python(name: str, root: Path = VENV_ROOT) -> Path:
    return venv_dir(name, root) / "bin" / "python"


def fingerprint(name: str, project_requirements: Path = ROOT / "requirements.txt") -> str:
    text = "\n".join([sys.version.split()[0], *requirements(name, project_requirements)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def create_commands(name: str, root: Path = VENV_ROOT, base_python: str = sys.executable) -> list[list[str]]:
    """The commands that make the venv: venv, pip upgrade, the pinned install."""
    py = str(python(name, root))
    return [
        [base_python, "-m", "venv", "--clear", str(venv_dir(name, root))],
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements(name)],
    ]


@dataclass
class Venv:
    name: str
    python: Path
    setup_s: float | None  # seconds this call spent making it; None: it was already there

    @property
    def version(self) -> str:
        return _pins(requirements_file(self.name))[0]


def ready(name: str, root: Path = VENV_ROOT) -> bool:
    """True when the venv exists and was made from the current requirements."""
    stamp = venv_dir(name, root) / STAMP
    if not (python(name, root).is_file() and stamp.is_file()):
        return False
    return json.loads(stamp.read_text()).get("fingerprint") == fingerprint(name)


def ensure(name: str, root: Path = VENV_ROOT, log: Path | None = None) -> Venv:
    """The peer's venv, made (minutes: the frameworks download their dependency trees)
    when missing or made from other requirements."""
    if ready(name, root):
        return Venv(name, python(name, root), None)
    t0 = time.monotonic()
    out = open(log, "ab") if log else None
    try:
        for cmd in create_commands(name, root):
            rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(
                    f"peer venv {name}: {' '.join(cmd[:6])} ... exited {rc}" + (f"; its log: {log}" if log else "")
                )
    finally:
        if out:
            out.close()
    setup_s = round(time.monotonic() - t0, 1)
    (venv_dir(name, root) / STAMP).write_text(
        json.dumps({"fingerprint": fingerprint(name), "setup_s": setup_s, "requirements": requirements(name)}, indent=1)
    )
    return Venv(name, python(name, root), setup_s)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PEERS)
    for n in names:
        v = ensure(n)
        made = "up to date" if v.setup_s is None else f"made in {v.setup_s:.0f} s"
        print(f"{n}: {v.python} ({made})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
