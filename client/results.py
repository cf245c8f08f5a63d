"""What captioning an image comes to: a Caption, or a CaptionError that says why in words."""

from __future__ import annotations

from dataclasses import dataclass, field

from client.endpoints import status_text
from client.retry import DEADLINE_EXCEEDED, AttemptFailed, Outcome

_UNAVAILABLE = "StatusCode.UNAVAILABLE"


class CaptionError(Exception):
    """One image could not be captioned. `str()` starts with the image's name."""

    def __init__(self, image: str, message: str, status: str | None = None, *, attempts: int = 0, endpoint: str | None = None):
        super().__init__(f"{image}: {message}")
        self.image = image
        self.reason = message
        self.status = status  # gRPC status such as "StatusCode.INVALID_ARGUMENT", None for local errors
        self.attempts = attempts  # requests sent for this image; 0 for local errors (unreadable file, ...)
        self.endpoint = endpoint  # where the last attempt went, None when nothing was sent


@dataclass(frozen=True)
class Caption:
    """The outcome for one input image: a caption and its score, or the error."""

    image: str
    caption: str | None = None
    score: float | None = None  # total log-probability of the caption
    error: CaptionError | None = None
    # The model that answered: "<repository version>:<checkpoint sha256[:8]>" (None from a
    # server whose repository predates the MODEL_VERSION output).
    model_version: str | None = None
    # How it went; not part of the outcome, so not compared.
    attempts: int = field(default=1, compare=False)
    endpoint: str | None = field(default=None, compare=False)  # the one that answered (or failed last)

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_result(result, name: str, attempts: int = 1, endpoint: str | None = None) -> Caption:
    """The Caption in a tritonclient InferResult; CaptionError when it lacks one."""
    caps, scores = result.as_numpy("CAPTION"), result.as_numpy("SCORE")
    if caps is None or scores is None or caps.size != 1 or scores.size != 1:
        raise CaptionError(name, "server response lacks a single CAPTION and SCORE", attempts=attempts, endpoint=endpoint)
    return Caption(
        image=name,
        caption=_text(caps),
        score=float(scores.reshape(-1)[0]),
        model_version=_model_version(result),
        attempts=attempts,
        endpoint=endpoint,
    )


def _text(array) -> str:
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _model_version(result) -> str | None:
    versions = result.as_numpy("MODEL_VERSION")
    return None if versions is None or versions.size == 0 else _text(versions)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def failure_error(name: str, outcome: Outcome, budget: float | None) -> CaptionError:
    """The CaptionError for a request the retry driver gave up on (`budget`: the image's
    deadline in seconds)."""
    endpoint = outcome.endpoint.url if outcome.endpoint else None
    last, failure = outcome.last, outcome.failure
    if outcome.out_of_time or last is None or failure is None:
        return _deadline_error(name, budget, outcome.attempts, failure, endpoint)
    return _error_from(failure, name, outcome.attempts, last.wait_s if last.capped else budget, endpoint)


def _error_from(f: AttemptFailed, name: str, attempts: int, budget: float | None, endpoint: str | None) -> CaptionError:
    detail = f.message or "no details"
    if f.status == DEADLINE_EXCEEDED and budget is None:  # not our deadline: gRPC's or the server's
        msg = f"timed out ({_plural(attempts, 'attempt')}): {detail}"
    elif f.status == DEADLINE_EXCEEDED and attempts > 1:
        msg = f"timed out ({_plural(attempts, 'attempt')}, the last given {budget:g} s)"
    elif f.status == DEADLINE_EXCEEDED:
        msg = f"timed out after {budget:g} s (no answer within the deadline)"
    elif f.status == _UNAVAILABLE:
        msg = f"server unavailable after {_plural(attempts, 'attempt')}: {detail}"
    elif f.status == "StatusCode.INVALID_ARGUMENT":
        msg = f"rejected by the server: {detail}"
    elif attempts > 1:
        msg = f"{status_text(f.status)} after {_plural(attempts, 'attempt')}: {detail}"
    else:
        msg = f"{status_text(f.status)}: {detail}"
    return CaptionError(name, msg, f.status, attempts=attempts, endpoint=endpoint)


def _deadline_error(
    name: str, budget: float | None, attempts: int, last: AttemptFailed | None, endpoint: str | None
) -> CaptionError:
    """The image's deadline ran out between attempts (while backing off from failures)."""
    msg = f"timed out{'' if budget is None else f' after {budget:g} s'} ({_plural(attempts, 'attempt')}"
    if last is not None:
        msg += f", last: {status_text(last.status)}: {last.message or 'no details'}"
    return CaptionError(name, msg + ")", DEADLINE_EXCEEDED, attempts=attempts, endpoint=endpoint)
