"""The `rollout` fault scenario: plain tritonclient callers (no retries) caption while the
supervised server rolls out a checkpoint with other layer sizes (launcher/rollout.py, the
code behind `make rollout`) and then rolls back (`make rollback`).

Measured: requests sent and failed (goal 0); answers whose caption is not the in-process
caption of the version their MODEL_VERSION names, and answers matching neither version's
(goal 0); p99 latency in steady state, while the new version is built on the same
machine, and while it is loaded, gated, switched to and the old one unloaded; the time
from the command to the first caption of the new version; both readiness endpoints
throughout. Then, with no load, one stub of the version served after the rollback is
killed: the supervisor must repair it on that version."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil

from builder import versions
from launcher import rollout as ro
from launcher.supervisor import stubs_of

from .harness import Launcher
from .scenarios import scenario

if TYPE_CHECKING:
    from .runner import FaultRun

READY_PATHS = ("/v2/health/ready", "/v2/models/captioner/ready")


def other_checkpoint(directory: Path, like) -> Path:
    """A checkpoint whose layer sizes differ from `like`'s (another LSTM width, input side
    and CNN), random weights: what matters here is that its graphs cannot be mixed with the
    serving version's and that its captions differ from them."""
    import torch

    from captioner.checkpoint import Checkpoint
    from captioner.model import CaptionModel, ModelArgs
    from captioner.preprocess import PreprocessConfig
    from captioner.scenes import all_captions, random_scene
    from captioner.vocab import Vocabulary

    rng = random.Random(23)
    vocab = Vocabulary.build([c for _ in range(300) for c in all_captions(random_scene(rng))], min_count=1)
    units = 128 if like.args.lstm_units != 128 else 96
    side = 48 if like.preprocess.image_size != 48 else 40
    args = ModelArgs(
        vocab_size=len(vocab),
        cnn_channels=(8, 16),
        cnn_grid=2,
        image_bottleneck=24,
        lstm_units=units,
        embedding_dim=16,
        logit_bottleneck=24,
        max_length=12,
    )
    torch.manual_seed(23)
    return Checkpoint(
        args, PreprocessConfig(side), vocab, CaptionModel(args).eval(), meta={"note": "random weights (bench/faults rollout)"}
    ).save(directory)


def p99_ms(latencies: list[float]) -> float | None:
    return round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies else None


class Readiness(threading.Thread):
    """Both readiness endpoints every 50 ms: [(time, path, ready, detail)]; ready is None
    for a poll with no answer within 2 s (the 2 cores busy building), which is not a NOT
    ready answer (tests/integration/test_rollout.py counts them apart the same way);
    detail says what a NOT ready answer was (status and body, or the connection error)."""

    def __init__(self, http_url: str):
        super().__init__(daemon=True)
        self.url, self.stop = http_url, threading.Event()
        self.seen: list[tuple[float, str, bool | None, str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path in READY_PATHS:
                ok: bool | None
                detail = ""
                try:
                    with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                        ok = r.status == 200
                        detail = "" if ok else f"HTTP {r.status}"
                except TimeoutError:
                    ok = None
                except urllib.error.HTTPError as e:
                    ok, detail = False, f"HTTP {e.code} {e.read()[:200].decode(errors='replace')}"
                except urllib.error.URLError as e:
                    ok = None if isinstance(e.reason, TimeoutError) else False
                    detail = repr(e.reason)[:200]
                except OSError as e:
                    ok, detail = False, repr(e)[:200]
                self.seen.append((time.monotonic(), path, ok, detail))
            time.sleep(0.05)

    def summary(self, path: str, t0: float | None = None) -> dict:
        """Counts for one endpoint; `not_ready_samples`: the first NOT ready answers,
        (seconds after t0, detail)."""
        polls = [(t, ok, d) for t, p, ok, d in self.seen if p == path]
        answered = [(t, ok, d) for t, ok, d in polls if ok is not None]
        down, since = 0.0, None
        for t, ok, _ in answered:
            if not ok and since is None:
                since = t
            elif ok and since is not None:
                down, since = down + t - since, None
        return {
            "polls": len(polls),
            "not_ready": sum(not ok for _, ok, _ in answered),
            "unanswered": len(polls) - len(answered),
            "not_ready_s": round(down, 2),
            "not_ready_samples": [(round(t - (t0 or 0.0), 2), d) for t, ok, d in answered if not ok][:3],
        }


async def plain_clients(url: str, images: list[bytes], clients: int, stop: asyncio.Event, log: list) -> None:
    """`clients` plain tritonclient callers (no retries): (t_sent, t_done, image, caption,
    MODEL_VERSION, error) per request."""
    import tritonclient.grpc.aio as grpcclient

    from client.wire import image_input, requested_outputs

    c = grpcclient.InferenceServerClient(url)
    inputs = [image_input(png, grpcclient) for png in images]

    async def worker(k: int) -> None:
        rng = random.Random(k)
        while not stop.is_set():
            i = rng.randrange(len(images))
            t0 = time.monotonic()
            try:
                r = await c.infer("captioner", [inputs[i]], outputs=requested_outputs(grpcclient), client_timeout=60)
                log.append(
                    (
                        t0,
                        time.monotonic(),
                        i,
                        r.as_numpy("CAPTION")[0, 0].decode(),
                        r.as_numpy("MODEL_VERSION")[0, 0].decode(),
                        None,
                    )
                )
            except Exception as e:  # noqa: BLE001 - a failed request is what is counted
                log.append((t0, time.monotonic(), i, None, None, str(e)[:200]))
                await asyncio.sleep(0.05)

    try:
        await asyncio.gather(*(worker(k) for k in range(clients)))
    finally:
        await c.close()


@scenario("rollout", launched=False)
def rollout(run: FaultRun, model: str) -> None:
    """Roll out a checkpoint with other layer sizes, then roll back, under plain clients."""
    from builder.build_engines import resolve_model

    from .runner import BUILD_MODEL

    work = Path(run.a.work) / model
    repo = work / "repo-rollout"  # a copy: the rollout adds versions to it
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(run.repo(model), repo)
    # OpenVINO's compiled-model cache is keyed by the graph's path: fill it at the copy's, as the build
    # does (two instances compiling into an empty cache at once can fail to write it).
    from builder.runtime_choice import warm_cache

    warm_cache(repo)
    first = versions.version_records(repo)[1]
    from captioner import checkpoint as ckpt_mod

    first_path, _ = resolve_model(BUILD_MODEL[model])
    shutil.rmtree(work / "rollout-checkpoint", ignore_errors=True)
    second_path = other_checkpoint(work / "rollout-checkpoint", ckpt_mod.load(first_path))
    build_args = ["--out", str(work / "out-rollout"), "--parity-scenes", "20", *run.a.build_args.split()]
    if run.a.quick:
        build_args += ["--runtime", "onnxruntime", "--decode", "exact"]
    clients = 2 * run.plan.fault_clients
    steady_s, settle_s = (4.0, 2.0) if run.a.quick else (15.0, 5.0)
    images = run.images
    # What each checkpoint answers in process, images decoded as its served version does.
    first_expected = [c.text for c in versions.in_process(first_path, versions.served_preprocess(repo, 1)).caption_images(images)]
    logfile = open(run.out / f"faults-{model}-rollout.log", "w")

    def say(msg: str) -> None:
        logfile.write(msg + "\n")
        logfile.flush()

    log: list = []
    with Launcher(repo, run.out, f"{model}-rollout") as launcher:
        server = ro.Server(launcher.http_url)
        ready = Readiness(launcher.http_url)
        ready.start()

        async def go():
            stop = asyncio.Event()
            task = asyncio.create_task(plain_clients(launcher.grpc_url, images, clients, stop, log))
            await asyncio.sleep(steady_s)
            t_cmd = time.monotonic()
            out = await asyncio.to_thread(ro.rollout, repo, str(second_path), server, build_args=build_args, log=say)
            await asyncio.sleep(settle_s)
            t_back = time.monotonic()
            back = await asyncio.to_thread(ro.rollback, repo, server, log=say)
            await asyncio.sleep(settle_s)
            stop.set()
            await task
            return t_cmd, out, t_back, back

        try:
            t_cmd, out, t_back, back = asyncio.run(go())
        finally:
            ready.stop.set()
            ready.join()
            logfile.close()
        repair = repair_on_serving_version(launcher, server, images[0], first_expected[0], first["model_version"])

    records = versions.version_records(repo)
    second = records[out.to_version]
    second_expected = [
        c.text for c in versions.in_process(second_path, versions.served_preprocess(repo, out.to_version)).caption_images(images)
    ]
    expected = {first["model_version"]: first_expected, second["model_version"]: second_expected}
    run.record(
        scenario="rollout",
        model=model,
        clients=clients,
        **measure(log, expected, t_cmd, out, t_back, back, steady_s),
        readiness={p: ready.summary(p, t_cmd) for p in READY_PATHS},
        versions={
            "from": out.from_version,
            "to": out.to_version,
            "labels": list(expected),
            "sizes": describe_sizes(first_path, second_path),
        },
        repair_after=repair,
        supervisor=launcher.supervisor_events()[-4:],
    )


def describe_sizes(first: Path, second: Path) -> str:
    from captioner import checkpoint as ckpt_mod

    a, b = ckpt_mod.load(first), ckpt_mod.load(second)
    return (
        f"LSTM {a.args.lstm_units} -> {b.args.lstm_units}, input {a.preprocess.image_size} -> "
        f"{b.preprocess.image_size} px, {a.args.backbone} -> {b.args.backbone}"
    )


def measure(
    log: list, expected: dict[str, list[str]], t_cmd: float, out: ro.Outcome, t_back: float, back: ro.Outcome, steady_s: float
) -> dict:
    ok = [r for r in log if r[5] is None]
    failed = [r for r in log if r[5] is not None]
    wrong = [r for r in ok if expected.get(r[4], [None] * (r[2] + 1))[r[2]] != r[3]]
    neither = [r for r in ok if all(caps[r[2]] != r[3] for caps in expected.values())]

    def window(t0: float, t1: float) -> list[float]:
        return [done - sent for sent, done, *_ in ok if t0 <= sent <= t1]

    def switch_window(o: ro.Outcome) -> tuple[float, float]:
        return o.phases["load"][0], o.phases["unload"][1]

    first_new = [done for sent, done, _, _, label, _ in ok if label == out.label and done >= t_cmd]
    first_old = [done for sent, done, _, _, label, _ in ok if label == back.label and done >= back.switch_started]
    return {
        "requests": len(log),
        "failed": len(failed),
        "failed_samples": [r[5] for r in failed[:3]],
        "wrong_version_caption": len(wrong),
        "matching_neither": len(neither),
        "wrong_samples": [r[2:5] for r in wrong[:3]],
        "by_version": {label: sum(r[4] == label for r in ok) for label in expected},
        "p99_ms": {
            "steady": p99_ms(window(t_cmd - steady_s + 1.0, t_cmd)),
            "rollout_build": p99_ms(window(*out.phases["build"])),
            "rollout_switch": p99_ms(window(*switch_window(out))),
            "rollback_switch": p99_ms(window(*switch_window(back))),
        },
        "first_new_caption_after_command_s": round(min(first_new) - t_cmd, 2) if first_new else None,
        "first_new_caption_after_switch_s": round(min(first_new) - out.switch_started, 2) if first_new else None,
        "first_old_caption_after_rollback_command_s": round(min(first_old) - t_back, 2) if first_old else None,
        "rollout_phases_s": out.seconds,
        "rollback_phases_s": back.seconds,
        # each phase's (start, end), seconds after the rollout command: places readiness samples
        "phase_windows_s": {
            f"{o.action} {name}": (round(a - t_cmd, 2), round(b - t_cmd, 2))
            for o in (out, back)
            for name, (a, b) in o.phases.items()
        },
    }


def repair_on_serving_version(
    launcher: Launcher, server: ro.Server, png: bytes, want: str, label: str, limit_s: float = 60.0
) -> dict:
    """SIGKILL the stub of the serving version's last model on a caption's path
    (caption_generator; preprocess in the whole layout), no load: seconds until the
    supervisor has it back on that version and a caption is the version's own again. A
    kill that makes tritonserver abort is repaired by a restart (a new tritonserver, which
    loads the versions the configs pin)."""
    version = int(label.split(":")[0])
    model = launcher.stub_models()[-1]
    victim = next(s for s in stubs_of(launcher.tritonserver().pid) if s.model == model and s.version == version)
    t0 = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    while time.monotonic() - t0 < limit_s:
        try:
            stubs = stubs_of(launcher.tritonserver().pid)
        except (RuntimeError, psutil.Error):  # between a restart's kill and its start
            time.sleep(0.2)
            continue
        back = [s for s in stubs if s.model == model and s.version == version and s.pid != victim.pid]
        if back and launcher.ready():
            try:
                caption, named = ro.caption_through(server, png)
            except Exception:  # noqa: BLE001 - not repaired yet
                time.sleep(0.2)
                continue
            return {
                "model": model,
                "repaired_s": round(time.monotonic() - t0, 2),
                "version": named,
                "caption_ok": caption == want,
                "label_ok": named == label,
            }
        time.sleep(0.2)
    return {"model": model, "repaired_s": None, "version": None, "caption_ok": False, "label_ok": False}
