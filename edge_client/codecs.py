"""Tensor codecs: how one weight tensor becomes bytes on the wire and back.

A codec is a plug-in looked up by name (the name travels in every frame), so
a federation can switch encodings without new message types. Codecs see one
tensor at a time and know nothing of MQTT or frames.

Every decoded tensor is float32, the dtype of all trainable weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from edge_client.errors import ProtocolError


class Codec(Protocol):
    """Encode a float32 tensor to bytes plus JSON-safe parameters, and back."""

    name: str

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]: ...

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray: ...


def _element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class _RawCodec:
    """Little-endian IEEE floats of a fixed width."""

    def __init__(self, name: str, wire_dtype: str):
        self.name = name
        self._wire = np.dtype(wire_dtype)

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        limit = np.finfo(self._wire).max
        if self._wire.itemsize < 4 and np.any(np.abs(array) > limit):
            # Casting would silently turn these into inf and the receiver would
            # reject the whole update; say so at the source instead.
            raise ProtocolError("out_of_range", f"values beyond ±{limit:g} do not fit {self.name}; use float32")
        return np.ascontiguousarray(array, dtype=self._wire).tobytes(), {}

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        expected = _element_count(shape) * self._wire.itemsize
        if len(blob) != expected:
            raise ProtocolError(
                "bad_tensor_size", f"{self.name} tensor of shape {shape} needs {expected} bytes, got {len(blob)}"
            )
        return np.frombuffer(blob, dtype=self._wire).astype(np.float32).reshape(shape)


CODECS: dict[str, Codec] = {
    "float32": _RawCodec("float32", "<f4"),
    # Half the bytes; relative error 2**-11 on values within float16 range.
    "float16": _RawCodec("float16", "<f2"),
}


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``; ProtocolError for an unknown one."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise ProtocolError("unknown_codec", f"codec {name!r} is not one of {sorted(CODECS)}") from None
