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


def layout_of(weights: Sequence[NamedArray], *, floating: bool = False) -> tuple[TensorSpec, ...]:
    """Names, shapes and dtypes of ``weights``, as :class:`TensorSpec` s; raise :class:`WeightsError`.

    Every tensor must be a NumPy array and names must be unique.
    ``floating`` also requires floating-point dtypes, as averaging does.
    Looks at no values: O(number of tensors).
    """
    layout = []
    for name, array in weights:
        if not isinstance(array, np.ndarray):
            kind = "floating-point NumPy arrays can be averaged" if floating else "NumPy arrays hold weights"
            raise WeightsError(f"tensor {name!r} is {type(array).__name__}; only {kind}")
        if floating and array.dtype.kind != "f":
            raise WeightsError(f"tensor {name!r} is {array.dtype}; only floating-point NumPy arrays can be averaged")
        layout.append(TensorSpec(name, tuple(array.shape), array.dtype.name))
    names = [spec.name for spec in layout]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise WeightsError(f"tensor names must be unique within a weight list, repeated: {duplicates}")
    return tuple(layout)


def check_layout(
    got: Sequence[TensorSpec],
    expected: Sequence[TensorSpec],
    *,
    dtypes: bool = True,
    subject: str = "the weight list",
    hint: str = "",
) -> None:
    """Raise :class:`WeightsError` unless ``got`` has ``expected``'s order, names, shapes (and ``dtypes``).

    ``subject`` names what ``got`` describes in the count message;
    ``hint``, when given, is appended to every message (what to do about it).
    """
    suffix = f"; {hint}" if hint else ""
    if len(got) != len(expected):
        raise WeightsError(f"{subject} has {len(got)} tensors, expected {len(expected)}{suffix}")
    for g, e in zip(got, expected, strict=True):
        if g.name != e.name:
            raise WeightsError(f"expected tensor {e.name!r} at this position, got {g.name!r}{suffix}")
        if tuple(g.shape) != tuple(e.shape):
            raise WeightsError(f"tensor {g.name!r}: shape {tuple(g.shape)} != expected {tuple(e.shape)}{suffix}")
        # Strings first (the common case), then as dtypes: "float32" and "<f4" are the same dtype.
        if dtypes and g.dtype != e.dtype and np.dtype(g.dtype) != np.dtype(e.dtype):
            raise WeightsError(f"tensor {g.name!r}: dtype {g.dtype} != expected {e.dtype}{suffix}")


def check_finite(weights: Sequence[NamedArray], *, hint: str = "") -> None:
    """Raise :class:`WeightsError` if a floating-point tensor holds NaN or Inf (one pass over the values)."""
    for name, array in weights:
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise WeightsError(f"tensor {name!r} contains NaN or Inf" + (f"; {hint}" if hint else ""))


def check_weights(weights: Sequence[NamedArray], specs: Sequence[TensorSpec]) -> None:
    """Raise :class:`WeightsError` unless ``weights`` match ``specs`` exactly.

    Checks order, names, shapes, dtypes and that every value is finite, so
    that a bad update can never reach a model. This is :func:`layout_of`,
    :func:`check_layout` and :func:`check_finite`, the one implementation of
    these checks the coordinator's aggregation uses too.
    """
    check_layout(layout_of(weights), specs)
    check_finite(weights)
