"""Glue shared by the Python-backend models. The Triton module
`triton_python_backend_utils` is passed in (it exists only inside the stub), which
keeps this file importable and testable anywhere."""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import Rejected
from .batching import run_batched

CAPTIONS = ("captioner_captions_total", "Captions returned by caption_generator")
TOKENS = ("captioner_tokens_total", "Caption tokens generated (END excluded)")
REJECTED = ("captioner_rejected_total", "Requests refused as invalid, by reason")


# Set by the launcher (launcher.tritonserver): the folder where each model instance says since
# when it has been inside `execute`, for the supervisor's hang check.
EXECUTING_DIR_ENV = "CAPTIONER_EXECUTING_DIR"
ALIVE_DIR = "alive"  # under it, each instance's heartbeat
HEARTBEAT_S = 1.0
_IDLE = b"idle".ljust(40)


class ExecuteClock:
    """`with clock:` around a model instance's execute. Writes "<pid> <monotonic start>"
    to `$CAPTIONER_EXECUTING_DIR/<instance name>` on entry and "idle" on exit, so the
    launcher's supervisor sees one instance stuck in an execute while the model's other
    instances keep the model's execution count moving (the metrics alone miss that).

    A daemon thread also writes "<pid> <monotonic now>" to `.../alive/<instance name>`
    every `heartbeat_s`: a stub frozen *between* executes (seen with SIGSTOP; a deadlock
    that holds the GIL would silence it too) says nothing in the execute file, and with a healthy sibling instance Triton's
    answers ("Stub process ... is not healthy") reach only the requests routed to it.
    A no-op when the variable is unset (no supervisor)."""

    def __init__(self, instance: str, folder: str | os.PathLike[str] | None = None, heartbeat_s: float = HEARTBEAT_S):
        folder = folder if folder is not None else os.environ.get(EXECUTING_DIR_ENV)
        self._fd = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        if folder:
            # Opened once: each execute costs one pwrite (~µs) on entry and one on exit.
            self._fd = os.open(Path(folder) / instance, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, _IDLE, 0)
            (Path(folder) / ALIVE_DIR).mkdir(exist_ok=True)
            beat_fd = os.open(Path(folder) / ALIVE_DIR / instance, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(beat_fd, _stamp(os.getpid()), 0)  # never an empty file, even before the thread runs
            self._beating = threading.Thread(
                target=self._beat, args=(beat_fd, heartbeat_s), name=f"heartbeat-{instance}", daemon=True
            )
            self._beating.start()

    def _beat(self, fd: int, every_s: float) -> None:
        pid = os.getpid()
        try:
            while not self._stop.wait(every_s):
                os.pwrite(fd, _stamp(pid), 0)
        finally:
            os.close(fd)

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> ExecuteClock:
        return cls(args["model_instance_name"])

    def __enter__(self) -> ExecuteClock:
        if self._fd is not None:
            os.pwrite(self._fd, _stamp(os.getpid()), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, _IDLE, 0)

    def close(self) -> None:
        """Stop the heartbeat (tests; in a stub the daemon thread ends with the process)."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join()


def _stamp(pid: int) -> bytes:
    return f"{pid} {time.monotonic():.3f}".encode().ljust(40)


def _read_stamps(folder: str | os.PathLike[str]) -> dict[str, tuple[int, float]]:
    out: dict[str, tuple[int, float]] = {}
    try:
        entries = [e for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return out
    for e in entries:
        try:
            with open(e.path, "rb") as f:
                parts = f.read(64).split()
            if len(parts) == 2:
                out[e.name] = (int(parts[0]), float(parts[1]))
        except (OSError, ValueError):
            continue
    return out


def executing_since(folder: str | os.PathLike[str]) -> dict[str, tuple[int, float]]:
    """instance name -> (stub pid, monotonic time its current execute began), for the
    instances inside an execute now (ExecuteClock's files)."""
    return _read_stamps(folder)


def heartbeats(folder: str | os.PathLike[str]) -> dict[str, tuple[int, float]]:
    """instance name -> (stub pid, monotonic time of its last heartbeat) (ExecuteClock's)."""
    return _read_stamps(Path(folder) / ALIVE_DIR)


def model_config(args: Mapping[str, str]) -> dict:
    return json.loads(args["model_config"])


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """config.pbtxt `parameters` -> {key: string_value}."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def version_dir(args: Mapping[str, str]) -> Path:
    """Where the model's own files (model.py, ONNX, vocab) lie."""
    return Path(args["model_repository"]) / str(args["model_version"])


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def error_response(pb_utils, message: str, code: str = "INVALID_ARG"):
    error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def rejected_response(pb_utils, rejected: Rejected):
    return error_response(pb_utils, rejected.message, "INVALID_ARG")


def internal_error_responses(pb_utils, n: int, model: str, exc: BaseException) -> list:
    """A failure that is not the client's fault: traceback to the server log, a short
    INTERNAL error to each request of the batch."""
    pb_utils.Logger.log_error(f"{model}: {''.join(traceback.format_exception(exc))}")
    message = f"{model}: internal error ({type(exc).__name__}); see the server log"
    return [error_response(pb_utils, message, "INTERNAL") for _ in range(n)]


def skip_cancelled(pb_utils, requests, handle) -> list:
    """`handle(live_requests)` -> their responses; requests whose caller already gave up
    (gRPC deadline or cancel) get CANCELLED instead and cost no compute. Asking is a
    round trip to the parent process: once per request per execute, never per token."""
    live = [not r.is_cancelled() for r in requests]
    if all(live):
        return handle(requests)
    answered = iter(handle([r for r, ok in zip(requests, live) if ok]) if any(live) else [])
    message = "the request was cancelled (client deadline or cancel) before it ran"
    return [next(answered) if ok else error_response(pb_utils, message, "CANCELLED") for ok in live]


def batched_responses(pb_utils, requests, run, inputs: list[str], outputs: list[str], model: str) -> list:
    """Every request's inputs stacked, `run(*stacked)` called once, outputs split back into
    one response per request. A failure here is not the client's: logged, INTERNAL to each."""
    return skip_cancelled(pb_utils, requests, lambda live: _batched(pb_utils, live, run, inputs, outputs, model))


def _batched(pb_utils, requests, run, inputs: list[str], outputs: list[str], model: str) -> list:
    try:
        per_request = run_batched(run, [[input_array(pb_utils, r, n) for n in inputs] for r in requests])
    except Exception as e:
        return internal_error_responses(pb_utils, len(requests), model, e)
    return [
        pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in zip(outputs, arrays)])
        for arrays in per_request
    ]


def image_responses(pb_utils, requests, run, outputs: tuple[str, ...], metrics: RejectMetrics, model: str) -> list:
    """The front model's execute (split or fused layout): every request's IMAGE through
    `run(images, parameters)`, which gives per request its output arrays (one array or a
    tuple, in `outputs` order) or a Rejected; rejections are counted and answered
    INVALID_ARG for that request alone, a failure of `run` itself is INTERNAL for all."""
    try:
        images = [input_array(pb_utils, r, "IMAGE") for r in requests]
        results = run(images, [r.parameters() for r in requests])
    except Exception as e:  # a bug, not a bad input: log it, fail this batch only
        return internal_error_responses(pb_utils, len(requests), model, e)
    responses = []
    for result in results:
        if isinstance(result, Rejected):
            metrics.rejected(result.reason)
            responses.append(rejected_response(pb_utils, result))
        else:
            arrays = result if isinstance(result, tuple) else (result,)
            tensors = [pb_utils.Tensor(n, a) for n, a in zip(outputs, arrays)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
    return responses


def input_array(pb_utils, request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise KeyError(f"request lacks input {name}")
    return tensor.as_numpy()


def _counter(pb_utils, spec: tuple[str, str]):
    return pb_utils.MetricFamily(name=spec[0], description=spec[1], kind=pb_utils.MetricFamily.COUNTER)


class OutputMetrics:
    """captioner_captions_total and captioner_tokens_total (caption_generator). Captions
    carry a `version` label, the model version that made them (MODEL_VERSION: one series
    per loaded version, so the label stays bounded)."""

    def __init__(self, pb_utils, version: str | None = None):
        # The families must outlive their metrics, so both are kept.
        self._families = (_counter(pb_utils, CAPTIONS), _counter(pb_utils, TOKENS))
        self._captions = self._families[0].Metric(labels={"version": version} if version else {})
        self._tokens = self._families[1].Metric(labels={})

    def produced(self, captions: int, tokens: int) -> None:
        if captions:
            self._captions.increment(captions)
        if tokens:
            self._tokens.increment(tokens)


class RejectMetrics:
    """captioner_rejected_total{reason=...} (preprocess, where every input is checked)."""

    def __init__(self, pb_utils, reasons: Iterable[str]):
        self._family = _counter(pb_utils, REJECTED)
        # A series for every known reason exists from the start: dashboards see 0, not "no data".
        self._series = {r: self._family.Metric(labels={"reason": r}) for r in reasons}

    def rejected(self, reason: str) -> None:
        if reason not in self._series:
            self._series[reason] = self._family.Metric(labels={"reason": reason})
        self._series[reason].increment(1)
