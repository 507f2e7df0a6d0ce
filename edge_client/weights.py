"""Weights as one ordered list of named arrays.

This is the single representation of model weights in litefed: the runtime
returns it, codecs serialise it and aggregation consumes it. Order is the
manifest's order, so two lists for the same model can be zipped directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from edge_client.errors import WeightsError


class NamedArray(NamedTuple):
    """One tensor of a model: its stable name and its value."""

    name: str
    array: np.ndarray


Weights = list[NamedArray]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, as recorded in the manifest."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: dict) -> TensorSpec:
        try:
            name, shape, dtype = obj["name"], obj["shape"], obj["dtype"]
        except (KeyError, TypeError) as exc:
            raise WeightsError(f"tensor spec {obj!r} needs name, shape and dtype") from exc
        if not isinstance(name, str) or not isinstance(shape, list):
            raise WeightsError(f"tensor spec {obj!r}: name must be a string, shape a list")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WeightsError(f"tensor spec {name!r}: shape {shape} must be non-negative ints")
        np.dtype(dtype)  # raises TypeError for an unknown dtype string
        return cls(name, tuple(shape), str(dtype))


def as_weights(pairs: Iterable[tuple[str, np.ndarray]]) -> Weights:
    """Build a :data:`Weights` list from ``(name, array)`` pairs."""
    return [NamedArray(name, np.asarray(array)) for name, array in pairs]


def check_weights(weights: Sequence[NamedArray], specs: Sequence[TensorSpec]) -> None:
    """Raise :class:`WeightsError` unless ``weights`` match ``specs`` exactly.

    Checks order, names, shapes, dtypes and that every value is finite, so
    that a bad update can never reach a model.
    """
    if len(weights) != len(specs):
        raise WeightsError(f"expected {len(specs)} tensors, got {len(weights)}")
    for got, spec in zip(weights, specs, strict=True):
        name, array = got
        if name != spec.name:
            raise WeightsError(f"expected tensor {spec.name!r} at this position, got {name!r}")
        if tuple(array.shape) != spec.shape:
            raise WeightsError(f"tensor {name!r}: shape {array.shape} != expected {spec.shape}")
        if array.dtype != np.dtype(spec.dtype):
            raise WeightsError(f"tensor {name!r}: dtype {array.dtype} != expected {spec.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise WeightsError(f"tensor {name!r} contains NaN or Inf")
