"""The peer: the per-request caption server people write first. FastAPI + uvicorn, one
worker, eager torch through `captioner.inference.Captioner` (so the same model, the
same preprocessing and the same decoding), one image per forward pass, no batching
across requests. The endpoint is a plain `def`, so FastAPI runs it in its thread pool.

    python -m bench.naive_server --model models/default --port 8000
    curl --data-binary @scene.png -H 'Content-Type: image/png' localhost:8000/caption
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from captioner.inference import Captioner
from captioner.preprocess import ImageError


def create_app(model: str | Path | None = None, threads: int | None = None, max_length: int | None = None) -> FastAPI:
    cap = Captioner(model, threads=threads)
    params = cap.params(max_length=max_length)
    app = FastAPI(title="naive captioner")

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/caption")
    def caption(image: bytes = Body(..., media_type="application/octet-stream")):
        try:
            c = cap.caption_images([image], **params.__dict__)[0]
        except ImageError as e:
            return JSONResponse({"error": e.reason, "detail": str(e)}, status_code=400)
        return {"caption": c.text, "score": c.score}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NaiveServer:
    """Run the naive server in a subprocess on a free port; a context manager."""

    def __init__(
        self,
        model: str | Path | None = None,
        threads: int | None = None,
        max_length: int | None = None,
        port: int | None = None,
        startup_timeout: float = 120.0,
        log_path: str | Path | None = None,
    ):
        self.model, self.threads, self.max_length = model, threads, max_length
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | int | None = None  # the log file, subprocess.DEVNULL or None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NaiveServer:
        cmd = [sys.executable, "-m", "bench.naive_server", "--port", str(self.port)]
        if self.model:
            cmd += ["--model", str(self.model)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.max_length:
            cmd += ["--max-length", str(self.max_length)]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import urllib.request

        proc = self.proc
        assert proc is not None  # start() launched it before waiting
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"naive server exited with {proc.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"naive server not ready after {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and not isinstance(self._log, int):  # an int is DEVNULL
            self._log.close()
        self._log = None

    def __enter__(self) -> NaiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("CAPTIONER_MODEL"), help="checkpoint dir (default: the shipped model)")
    p.add_argument("--host", default=os.environ.get("NAIVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("NAIVE_PORT", "8000")))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--max-length", type=int, default=None, help="decode steps (default: the checkpoint's)")
    a = p.parse_args(argv)
    import uvicorn

    app = create_app(a.model, threads=a.threads, max_length=a.max_length)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
