"""A fake `tensorrt` module with only the API surface builder/tensorrt_engine.py calls
(Builder, network, OnnxParser, builder config, optimisation profile, timing cache),
recording what it was asked. Any other attribute is missing, as it would be on a
TensorRT that lacks it: `weak_typing=False` removes the precision flags as 11.x did."""

from __future__ import annotations

import types

import onnx


def fake_tensorrt(version: str, weak_typing: bool, build_fails: bool = False, parse_error: str | None = None):
    """A module object with the tensorrt names the builder uses, recording the calls."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    flags = {"TF32": 6}
    if weak_typing:
        flags.update(FP16=0, INT8=1)
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse_from_file(self, path):
            if parse_error:
                self.errors.append(parse_error)
                return False
            graph = onnx.load(path).graph
            for t in graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(t.name, dims))
            trt.calls.append(("parse", path))
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return memoryview(self.blob + b"|timings")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.profiles, self.cache, self.pool = set(), set(), [], None, {}

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.cleared.add(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            trt.calls.append(("create_timing_cache", bytes(blob)))
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            trt.network = Network(flags)
            return trt.network

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build", network.flags))
            return None if build_fails else memoryview(b"ENGINE-" + version.encode())

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt
