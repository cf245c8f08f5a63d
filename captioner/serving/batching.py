"""Stack the rows of many requests into one batch and split results back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def concat(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Arrays with a leading batch axis -> one array and each part's row count."""
    if not parts:
        raise ValueError("nothing to concatenate")
    sizes = [int(p.shape[0]) for p in parts]
    return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)), sizes


def split(batch: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Inverse of `concat`: consecutive row blocks of the given sizes."""
    if sum(sizes) != batch.shape[0]:
        raise ValueError(f"batch has {batch.shape[0]} rows, sizes add up to {sum(sizes)}")
    return np.split(batch, np.cumsum(sizes)[:-1], axis=0) if len(sizes) > 1 else [batch]


def run_batched(fn, inputs: Sequence[Sequence[np.ndarray]]) -> list[tuple[np.ndarray, ...]]:
    """Per request a tuple of input arrays -> per request a tuple of output arrays,
    with `fn(*stacked_inputs) -> tuple of stacked outputs` called exactly once."""
    if not inputs:
        return []
    stacked: list[np.ndarray] = []
    sizes: list[int] | None = None
    for k in range(len(inputs[0])):
        arr, s = concat([req[k] for req in inputs])
        if sizes is not None and s != sizes:
            raise ValueError("inputs of one request disagree on the batch size")
        stacked.append(arr)
        sizes = s
    if sizes is None:
        raise ValueError("the requests carry no inputs")
    outputs = [split(np.asarray(o), sizes) for o in fn(*stacked)]
    return [tuple(o[i] for o in outputs) for i in range(len(inputs))]
