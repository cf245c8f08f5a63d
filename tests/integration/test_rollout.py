"""`make rollout` / `make rollback` against a real tritonserver under load: a checkpoint with
other layer sizes rolled out and rolled back while 8 plain clients (no retries) caption,
and a broken checkpoint refused. Every answer must come from exactly one version: no
failed request, each caption the in-process caption of the version its MODEL_VERSION names."""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_checkpoint

from builder import build_engines as be
from builder import versions
from captioner import checkpoint as ckpt_mod
from captioner.checkpoint import Checkpoint
from captioner.inference import Captioner
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.scenes import all_captions, encoded_scenes, random_scene
from captioner.vocab import Vocabulary
from launcher import rollout as ro
from launcher.tritonserver import TritonServer

pytestmark = pytest.mark.integration
CLIENTS = 8
# Quick builds: few parity scenes, onnxruntime without timing both runtimes, no fast-decode gate.
BUILD_ARGS = ["--parity-scenes", "10", "--runtime", "onnxruntime", "--target", "cpu", "--decode", "exact"]


def smaller_checkpoint(directory: Path) -> Path:
    """Layer sizes unlike the default model's (LSTM 96, 48 px, another CNN), random weights."""
    rng = random.Random(11)
    vocab = Vocabulary.build([c for _ in range(300) for c in all_captions(random_scene(rng))], min_count=1)
    args = ModelArgs(
        vocab_size=len(vocab),
        cnn_channels=(8, 16),
        cnn_grid=2,
        image_bottleneck=24,
        lstm_units=96,
        embedding_dim=16,
        logit_bottleneck=24,
        max_length=12,
    )
    torch.manual_seed(11)
    return Checkpoint(args, PreprocessConfig(48), vocab, CaptionModel(args).eval(), meta={"note": "random weights (tests)"}).save(
        directory
    )


@dataclass
class Load:
    """CLIENTS threads of plain tritonclient.grpc, no retries, captioning scenes in a loop."""

    url: str
    pool: list[bytes]
    answers: list = field(default_factory=list)  # (start, end, scene index, caption, model version)
    failures: list = field(default_factory=list)  # (start, error)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seed: int) -> None:
        import tritonclient.grpc as grpcclient

        client, rng = grpcclient.InferenceServerClient(self.url), random.Random(seed)
        while not self.stop.is_set():
            i = rng.randrange(len(self.pool))
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[self.pool[i]]], dtype=np.object_))
            t0 = time.monotonic()
            try:
                r = client.infer("captioner", [inp], client_timeout=60)
                self.answers.append(
                    (t0, time.monotonic(), i, r.as_numpy("CAPTION")[0, 0].decode(), r.as_numpy("MODEL_VERSION")[0, 0].decode())
                )
            except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append((t0, str(e)[:300]))
        client.close()


@dataclass
class Readiness:
    """Both readiness endpoints, polled every 50 ms."""

    http_url: str
    seen: dict = field(default_factory=lambda: {"/v2/health/ready": [], "/v2/models/captioner/ready": []})
    stop: threading.Event = field(default_factory=threading.Event)
    why: list = field(default_factory=list)  # (time, path, error) of each poll answered "not ready"
    unanswered: list = field(default_factory=list)  # (time, path) of each poll with no answer in time

    def run(self) -> None:
        while not self.stop.is_set():
            for path, log in self.seen.items():
                try:
                    with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                        ok = r.status == 200
                except OSError as e:
                    if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                        # Slow, not an answer: on a loaded 2-core machine a poll can wait out
                        # its timeout while the rollout builds. Counted apart, bounded below.
                        self.unanswered.append((time.monotonic(), path))
                        continue
                    ok = False
                    self.why.append((time.monotonic(), path, repr(e)[:200]))
                log.append((time.monotonic(), ok))
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("rollout")
    first, _ = default_checkpoint(work / "v1")
    second = ckpt_mod.load(smaller_checkpoint(work / "v2"))
    assert (first.args.lstm_units, first.preprocess.image_size) != (second.args.lstm_units, second.preprocess.image_size)
    repo = work / "repository"
    assert be.main(["--model", str(first.path), "--repo", str(repo), "--out", str(work / "out1"), *BUILD_ARGS]) == 0
    server = TritonServer(repo, control_mode="explicit", log_file=work / "tritonserver.log")
    server.start()
    try:
        yield work, repo, server, first, second
    finally:
        server.close()


def test_rollout_and_rollback_under_load_answer_every_request_from_one_version(served):
    work, repo, server, first, second = served
    pool = [png for png, _ in encoded_scenes(24, seed=4242)]
    # What each version must answer, per scene: its own checkpoint, in process.
    expected = {
        f"1:{first.sha256[:8]}": [c.text for c in Captioner(first.path).caption_images(pool)],
        f"2:{second.sha256[:8]}": [c.text for c in Captioner(second.path).caption_images(pool)],
    }
    v1, v2 = expected
    assert expected[v1] != expected[v2], "the versions must answer differently for a mix-up to show"
    control = ro.Server(server.http_url)

    load, ready = Load(server.grpc_url, pool), Readiness(server.http_url)
    threads = [threading.Thread(target=load.run, args=(k,)) for k in range(CLIENTS)]
    threads.append(threading.Thread(target=ready.run))
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        out = ro.rollout(repo, str(second.path), control, build_args=["--out", str(work / "out2"), *BUILD_ARGS])
        time.sleep(1.0)
        after_rollout = time.monotonic()
        back = ro.rollback(repo, control)
        time.sleep(1.0)
        # A broken checkpoint: refused, nothing else changes.
        broken = work / "broken" / "model.pt"
        broken.parent.mkdir()
        data = Path(second.path).read_bytes()
        broken.write_bytes(data[: len(data) // 2])
        with pytest.raises(ro.RolloutRefused, match="the build of .* failed"):
            ro.rollout(repo, str(broken.parent), control, build_args=["--out", str(work / "out3"), *BUILD_ARGS])
        time.sleep(1.0)
    finally:
        load.stop.set()
        ready.stop.set()
        for t in threads:
            t.join()

    assert load.failures == []
    assert len(load.answers) > 50
    mixed = [(i, cap, ver) for _, _, i, cap, ver in load.answers if expected.get(ver, [None] * len(pool))[i] != cap]
    assert mixed == []  # every caption is its version's own: no mixed or mislabelled answer
    # v2 served from the switch until the rollback's switch; v1 before and after
    assert (out.from_version, out.to_version, back.to_version) == (1, 2, 1)
    late = [(round(t0 - out.switched, 3), ver) for t0, _, _, _, ver in load.answers if out.switched < t0 < back.switch_started]
    assert {ver for _, ver in late} == {v2}, [x for x in late if x[1] != v2][:5]
    assert {ver for t0, _, _, _, ver in load.answers if t0 > back.switched} == {v1}
    assert {ver for t0, _, _, _, ver in load.answers if t0 < out.switch_started} == {v1}
    assert after_rollout < back.switch_started
    # The served model stayed ready throughout (the server-wide strict readiness dips while
    # a version loads or unloads: see launcher/rollout.py).
    phases = {
        f"{o.action} {k}": (round(t0 - out.phases["build"][0], 2), round(t1 - out.phases["build"][0], 2))
        for o in (out, back)
        for k, (t0, t1) in o.phases.items()
    }
    model_not_ready = [(round(t - out.phases["build"][0], 2), e) for t, p, e in ready.why if p.startswith("/v2/models")]
    assert model_not_ready == [], phases
    polls = sum(len(v) for v in ready.seen.values()) + len(ready.unanswered)
    assert len(ready.unanswered) <= max(2, polls // 20), (ready.unanswered, phases)  # answered, nearly always
    # Serving is back where it began; the broken build added nothing.
    assert versions.serving_version(repo) == 1 and versions.all_versions(repo) == [1, 2]
    assert versions.loaded_versions(repo) == {m: [1] for m in versions.models(repo)}
    assert ro.served_label(control, pool[0]) == v1
