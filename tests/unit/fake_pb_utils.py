"""A stand-in for `triton_python_backend_utils`, the module the Python-backend stub
provides to model.py files, so the Triton models run in unit tests without a server.

The classes mirror the stub's API (Tensor, InferenceRequest, InferenceResponse,
TritonError, MetricFamily/Metric, Logger, PreferredMemory) with the same constructor
signatures, and `make_module` exposes exactly those names plus the pure-Python helpers
of the real file in the nvidia-pytriton wheel (get_input_tensor_by_name, ...), loaded
from it. Using anything the fake does not mirror fails with AttributeError.

Metrics are `unittest.mock.create_autospec` objects over the mirror class: a call the
real API would refuse fails, and tests can read both values and calls.
"""

from __future__ import annotations

import importlib.util
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np


def _real_utils_path() -> Path:
    spec = importlib.util.find_spec("pytriton")
    root = Path(list(spec.submodule_search_locations)[0])
    return root / "tritonserver" / "backends" / "python" / "triton_python_backend_utils.py"


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        if not isinstance(array, np.ndarray):
            raise TypeError("pb_utils.Tensor takes a numpy array")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:
        return True


class InferenceResponse:
    def __init__(self, output_tensors: list | None = None, error: TritonError | None = None, parameters: Any = None):
        self._outputs, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class PreferredMemory:
    def __init__(self, preferred_memory_type: int, preferred_device_id: int = 0):
        self.preferred_memory_type, self.preferred_device_id = preferred_memory_type, preferred_device_id


class InferenceRequest:
    """Both kinds: the requests Triton hands to execute(), and BLS requests a model builds.
    A BLS request's exec() goes to the module's `bls_handler(request) -> InferenceResponse`."""

    handler: Callable[[InferenceRequest], InferenceResponse] | None = None

    def __init__(
        self,
        model_name: str = "",
        inputs: list | None = None,
        requested_output_names: list | None = None,
        model_version: int = -1,
        flags: int = 0,
        correlation_id: Any = 0,
        request_id: str = "",
        parameters: Any = None,
        timeout: int = 0,
        preferred_memory: PreferredMemory | None = None,
        trace: Any = None,
    ):
        self._model_name = model_name
        self._inputs = list(inputs or [])
        self._requested = list(requested_output_names or [])
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters or {})
        self.preferred_memory = preferred_memory
        self.cancelled = False  # tests set it: the client gave up before execute()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def inputs(self) -> list:
        return self._inputs

    def parameters(self) -> str:
        return self._parameters

    def model_name(self) -> str:
        return self._model_name

    def requested_output_names(self) -> list:
        return self._requested

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        if type(self).handler is None:
            raise RuntimeError("no BLS handler installed")
        return type(self).handler(self)


class Metric:
    def __init__(self, labels: dict | None = None):
        self._value = 0.0

    def increment(self, value: float) -> None:
        if value < 0:
            raise ValueError("a counter cannot decrease")
        self._value += value

    def set(self, value: float) -> None:
        self._value = value

    def value(self) -> float:
        return self._value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = range(3)
    registry: dict[str, MetricFamily] = {}

    def __init__(self, name: str, description: str, kind: int):
        self.name, self.description, self.kind = name, description, kind
        self.series: list[tuple[dict, Any]] = []  # (labels, metric)
        MetricFamily.registry[name] = self

    def Metric(self, labels: dict | None = None, buckets: list | None = None):  # noqa: N802 (the API's name)
        m = mock.create_autospec(Metric, instance=True, spec_set=True)
        real = Metric(labels)
        m.increment.side_effect = real.increment
        m.set.side_effect = real.set
        m.value.side_effect = real.value
        self.series.append((dict(labels or {}), m))
        return m

    def value(self, **labels) -> float:
        """Test helper: the value of the series with these labels (0 when absent)."""
        return sum(m.value() for lab, m in self.series if lab == labels)


class Logger:
    lines: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.lines.append(("error", message))

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls.lines.append(("verbose", message))


def make_module() -> types.ModuleType:
    """A fresh `triton_python_backend_utils` (registries emptied)."""
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", _real_utils_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the real pure-Python helpers and constants
    MetricFamily.registry = {}
    Logger.lines = []
    InferenceRequest.handler = None
    for cls in (TritonError, Tensor, InferenceResponse, PreferredMemory, InferenceRequest, MetricFamily, Logger):
        setattr(module, cls.__name__, cls)
    module.TRITONSERVER_MEMORY_CPU, module.TRITONSERVER_MEMORY_GPU = 0, 2
    return module


def request(inputs: dict[str, np.ndarray], parameters: dict | None = None) -> InferenceRequest:
    """A request as Triton would hand it to execute()."""
    return InferenceRequest(inputs=[Tensor(k, v) for k, v in inputs.items()], parameters=parameters or {})


def outputs(response: InferenceResponse) -> dict[str, np.ndarray]:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}
