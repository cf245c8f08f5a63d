"""Request parameters of the `captioner` ensemble: parsing and validation.

Clients set them per request (tritonclient: `infer(..., parameters={"beam_size": 3})`);
Triton hands every composing Python model the same JSON map. `preprocess` rejects a
bad one before any work is done and `caption_generator` parses the same map again
with the same function, so both always agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..decoding import DecodeParams

ACCEPTED = ("beam_size", "max_length", "temperature")


class ParamError(ValueError):
    """A request parameter is missing its type, range or name; the message says which."""


@dataclass(frozen=True)
class DecodeDefaults:
    """What a request gets when it sets nothing: the checkpoint's decoding settings."""

    max_length: int
    length_penalty: float = 0.7

    @classmethod
    def from_config(cls, params: Mapping[str, str]) -> DecodeDefaults:
        return cls(int(params["max_length"]), float(params["length_penalty"]))


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ParamError(f"{name} must be an integer, got a boolean ({v})")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ParamError(f"{name} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ParamError(f"{name} must be a number, got a boolean ({v})")
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            raise ParamError(f"{name} must be a number, got {v!r}") from None
    else:
        raise ParamError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(x):
        raise ParamError(f"{name} must be a finite number, got {v!r}")
    return x


def request_parameters(raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`request.parameters()` of the Python backend is a JSON object in a string."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ParamError(f"request parameters are not a JSON object: {e}") from None
    if not isinstance(parsed, dict):
        raise ParamError(f"request parameters must be a map, got {type(parsed).__name__}")
    return parsed


def decode_params(raw: str | Mapping[str, Any] | None, defaults: DecodeDefaults) -> DecodeParams:
    """Request parameters -> validated DecodeParams, or ParamError naming the problem.

    Unknown names are refused rather than ignored: a typo such as `beam=3` would
    otherwise silently decode greedily."""
    given = request_parameters(raw)
    unknown = sorted(k for k in given if k not in ACCEPTED)
    if unknown:
        raise ParamError(f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(ACCEPTED)}")
    beam = _as_int("beam_size", given["beam_size"]) if "beam_size" in given else 1
    length = _as_int("max_length", given["max_length"]) if "max_length" in given else defaults.max_length
    temperature = _as_float("temperature", given["temperature"]) if "temperature" in given else None
    params = DecodeParams(beam_size=beam, max_length=length, temperature=temperature, length_penalty=defaults.length_penalty)
    try:
        return params.validate()
    except ValueError as e:
        raise ParamError(str(e)) from None
