"""LAYOUT=whole served by the real tritonserver: the default model built by
`builder.build_engines --layout whole` (one Python model runs decode, the encoder and the
caption loop) captions exactly what the in-process reference captions, through the
unchanged `captioner` ensemble, and a corrupt image in a concurrent batch is refused
alone while its batch mates are captioned."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import default_checkpoint
from triton_requests import ask_all

from builder.repository import check_repository
from captioner.inference import Captioner
from captioner.scenes import encoded_scenes
from launcher.tritonserver import TritonServer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
N_SCENES = 48
INVALID = "StatusCode.INVALID_ARGUMENT"


def _stats(client, model: str) -> tuple[int, int]:
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def test_whole_layout_captions_equal_the_reference_and_refuses_a_corrupt_image_alone(tmp_path):
    import tritonclient.grpc as grpcclient

    ck_dir = tmp_path / "checkpoint"
    default_checkpoint(ck_dir)
    repo = tmp_path / "repo"
    # The build as `make build-engines LAYOUT=whole` runs it, its slow optional checks cut
    # short (the fast-decode gate, the full parity set, the runtime race): other tests cover them.
    cmd = [sys.executable, "-m", "builder.build_engines", "--model", str(ck_dir), "--layout", "whole", "--decode", "exact"]
    cmd += ["--parity-scenes", "8", "--runtime", "onnxruntime", "--out", str(tmp_path / "out"), "--repo", str(repo)]
    build = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "layout whole" in build.stdout
    assert "load shedding: preprocess (runs the encoder and the caption loop)" in build.stdout
    assert set(check_repository(repo)) == {"preprocess", "captioner"}
    manifest = json.loads((repo / "build_manifest.json").read_text())
    assert manifest["layout"] == "whole" and manifest["shm"]["layout"] == "whole"

    drawn = encoded_scenes(N_SCENES, 777)
    images = [d for d, _ in drawn]
    reference = Captioner(ck_dir)
    greedy = reference.caption_images(images)
    beam = reference.caption_images(images[:8], beam_size=3)
    corrupt = images[5][: len(images[5]) // 2]  # a PNG cut in half: decodable header, broken data
    log = tmp_path / "tritonserver.log"
    with TritonServer(repo, log_file=log) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        before = _stats(client, "preprocess")
        jobs = [(d, None) for d in images] + [(d, {"beam_size": 3}) for d in images[:8]]
        jobs.insert(N_SCENES // 2, (corrupt, None))
        answers = ask_all(server.grpc_url, jobs, concurrency=len(jobs))
        # The backend reports an execution's statistics after sending its responses: read
        # until they include every request (or the deadline, and the assert below says so).
        deadline = time.monotonic() + 15
        while True:
            inferences, executions = (a - b for a, b in zip(_stats(client, "preprocess"), before))
            if inferences >= len(jobs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ready = client.is_model_ready("captioner")
        client.close()
    bad = answers.pop(N_SCENES // 2)
    assert bad.status == INVALID and "IMAGE:" in bad.message, bad
    refused = [a for a in answers if a.caption is None]
    assert not refused, refused[:3]
    want = greedy + beam
    mismatches = [(i, a.caption, r.text) for i, (a, r) in enumerate(zip(answers, want)) if a.caption != r.text]
    assert not mismatches, f"{len(mismatches)} of {len(want)} captions differ, e.g. {mismatches[:3]}"
    np.testing.assert_allclose([a.score for a in answers], [r.score for r in want], atol=1e-3, rtol=1e-4)
    # one model took every request: the batcher put several (the corrupt one among them) in an execution
    assert inferences == len(jobs) and executions < inferences
    assert ready and "Traceback" not in log.read_text()
