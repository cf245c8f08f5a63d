"""The serving images ship captioner/, client/ and launcher/, not builder/: what
`python -m launcher --no-build` runs (the images' and pods' command) must not import
builder. Run here with builder made unimportable, against a stand-in tritonserver."""

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from test_server_launcher import HEALTHY, _fake_triton

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "launcher" / "cli.py"
# The launcher functions only a build runs (main calls them unless --no-build).
BUILD_PATH = {"stale_reason", "build", "resolve_checkpoint"}


def _builder_imports_outside_the_build_path() -> list[str]:
    tree = ast.parse(CLI.read_text())
    found = []
    for top in tree.body:
        name = getattr(top, "name", None)
        for node in ast.walk(top):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            if any(m == "builder" or m.startswith("builder.") for m in modules) and name not in BUILD_PATH:
                found.append(f"{name or 'module level'}: line {node.lineno}")
    return found


def test_only_the_build_path_of_the_launcher_imports_builder():
    assert _builder_imports_outside_the_build_path() == []


# Imports every module launcher.cli imports, at the top or inside a function the serving
# path calls, then serves with --no-build until the parent's SIGTERM.
SERVE_WITHOUT_BUILDER = textwrap.dedent("""
    import ast, importlib, sys
    sys.modules["builder"] = None  # `import builder...` now raises ImportError
    import launcher.cli as cli
    for top in ast.parse(open(cli.__file__).read()).body:
        if getattr(top, "name", None) in {build_path!r}:
            continue
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom):
                importlib.import_module(("." * node.level) + (node.module or ""), "launcher")
    print("serving-path imports ok", flush=True)
    raise SystemExit(cli.main(sys.argv[1:]))
""")


def test_no_build_serves_and_stops_without_the_builder_package(tmp_path):
    repo = tmp_path / "repo"
    (repo / "captioner").mkdir(parents=True)
    (repo / "captioner" / "config.pbtxt").write_text('name: "captioner"')
    exe = _fake_triton(tmp_path / "bin", HEALTHY)
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"}
    code = SERVE_WITHOUT_BUILDER.format(build_path=BUILD_PATH)
    args = [
        "--no-build",
        "--model",
        str(tmp_path / "no-checkpoint-here"),
        "--repo",
        str(repo),
        "--samples",
        "0",
        "--no-supervise",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--log-file",
        str(tmp_path / "triton.log"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Serving;"):
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(lines) + proc.stdout.read()
        assert proc.wait(timeout=60) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "serving-path imports ok" in out and "Ready." in out and "Stopped." in out
    assert "Building" not in out  # --no-build: no checkpoint looked for, nothing built
    assert "got SIGTERM" in (tmp_path / "triton.log").read_text()  # drained and stopped in order
