"""Tensor codecs: how one weight tensor becomes bytes on the wire and back.

A codec is a plug-in looked up by name (the name travels in every frame), so
a federation can switch encodings without new message types. Codecs see one
tensor at a time and know nothing of MQTT or frames.

Every decoded tensor is float32, the dtype of all trainable weights.

Decoders treat ``blob`` and ``params`` as untrusted wire data: they check
parameter types and ranges and the blob size before allocating anything, and
raise only :class:`ProtocolError` (``bad_tensor_size``, ``bad_codec_params``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from edge_client.errors import ProtocolError
from edge_client.reasons import BAD_CODEC_PARAMS, BAD_TENSOR_SIZE, OUT_OF_RANGE, UNKNOWN_CODEC
from edge_client.wire_json import finite_float


class Codec(Protocol):
    """Encode a float32 tensor to bytes plus JSON-safe parameters, and back."""

    name: str

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]: ...

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray: ...


# numpy refuses shapes whose extent overflows, even with a zero dimension.
_MAX_EXTENT = 1 << 56


def _element_count(shape: tuple[int, ...]) -> int:
    """Values in ``shape``; ProtocolError("bad_tensor_size") for a shape numpy could not build."""
    count, extent = 1, 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ProtocolError(BAD_TENSOR_SIZE, f"shape {shape} is not a list of non-negative ints")
        count *= dim
        extent *= max(dim, 1)
        if extent > _MAX_EXTENT:
            raise ProtocolError(BAD_TENSOR_SIZE, f"shape {shape} is too large")
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
            raise ProtocolError(OUT_OF_RANGE, f"values beyond ±{limit:g} do not fit {self.name}; use float32")
        return np.ascontiguousarray(array, dtype=self._wire).tobytes(), {}

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        expected = _element_count(shape) * self._wire.itemsize
        if len(blob) != expected:
            raise ProtocolError(
                BAD_TENSOR_SIZE, f"{self.name} tensor of shape {shape} needs {expected} bytes, got {len(blob)}"
            )
        return np.frombuffer(blob, dtype=self._wire).astype(np.float32).reshape(shape)


# Largest tensor a sparse codec may expand to (256 MiB of float32). Dense
# codecs are bounded by their blob size; a sparse blob is not, so this cap
# keeps a tiny forged message from asking for a huge allocation.
MAX_DECODED_ELEMENTS = 1 << 26
_F32_LIMIT = float(np.finfo(np.float32).max) * (1 + 2**-30)
_LEVELS = 255  # uint8 codes 0..255


def _bad_params(codec: str, message: str) -> ProtocolError:
    return ProtocolError(BAD_CODEC_PARAMS, f"{codec}: {message}")


def _check_blob(codec: str, blob: bytes, expected: int, shape: tuple[int, ...]) -> None:
    if len(blob) != expected:
        message = f"{codec} tensor of shape {shape} needs {expected} bytes, got {len(blob)}"
        raise ProtocolError(BAD_TENSOR_SIZE, message)


def _param(codec: str, params: Mapping[str, Any], key: str) -> Any:
    if not isinstance(params, Mapping) or key not in params:
        raise _bad_params(codec, f"params must be an object with {key!r}")
    return params[key]


def _finite(codec: str, value: Any, what: str) -> float:
    """A JSON number that is finite as a float, else ``bad_codec_params`` naming the codec."""
    return finite_float(value, f"{codec}: {what}", BAD_CODEC_PARAMS)


def _check_affine(codec: str, scale: Any, offset: Any, what: str) -> tuple[float, float]:
    """Validate one (scale, offset) pair: decoded values must stay finite float32."""
    scale = _finite(codec, scale, f"{what} scale")
    offset = _finite(codec, offset, f"{what} offset")
    if scale < 0:
        raise _bad_params(codec, f"{what} scale must be >= 0, got {scale}")
    # The tolerance admits float64 rounding of the encoder's own max; it still rounds to a finite float32.
    if abs(offset) > _F32_LIMIT or abs(offset + _LEVELS * scale) > _F32_LIMIT:
        raise _bad_params(codec, f"{what} scale/offset decode beyond the float32 range")
    return scale, offset


def _refuse_non_finite(codec: str, array: np.ndarray) -> None:
    if array.size and not np.isfinite(array).all():
        raise ProtocolError(OUT_OF_RANGE, f"{codec} cannot encode NaN or Inf")


def _affine_params(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """float64 (scale, offset) with offset = min and scale = (max - min) / 255."""
    lo = values.min(axis=axis).astype(np.float64)
    hi = values.max(axis=axis).astype(np.float64)
    return (hi - lo) / _LEVELS, lo


def _quantize(values: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    safe = np.where(scale > 0, scale, 1.0)  # constant tensor/channel: every code is 0
    codes = np.rint((values.astype(np.float64) - offset) / safe)
    return np.clip(codes, 0, _LEVELS).astype(np.uint8)


class _Int8Codec:
    """Affine 8-bit quantization with one (scale, offset) per tensor.

    Wire: one uint8 code per value, row-major. ``params = {"scale": s, "offset": o}``;
    a code ``q`` decodes to ``o + q * s``. ``o`` is the tensor's minimum and
    ``s = (max - min) / 255``, so every value is off by at most ``s / 2``
    (plus float32 rounding of the result). A constant tensor has ``s = 0`` and
    decodes exactly; an empty tensor has an empty blob.
    """

    name = "int8"

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        values = np.asarray(array, np.float32)
        _refuse_non_finite(self.name, values)
        if values.size == 0:
            return b"", {"scale": 0.0, "offset": 0.0}
        scale, offset = _affine_params(values, None)
        codes = _quantize(values, scale, offset)
        return codes.tobytes(), {"scale": float(scale), "offset": float(offset)}

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        _check_blob(self.name, blob, _element_count(shape), shape)
        scale = _param(self.name, params, "scale")
        scale, offset = _check_affine(self.name, scale, _param(self.name, params, "offset"), "tensor")
        codes = np.frombuffer(blob, dtype=np.uint8).astype(np.float64)
        return (offset + codes * scale).astype(np.float32).reshape(shape)


def _channel_count(shape: tuple[int, ...]) -> int:
    """Output channels: the last axis of a kernel (Dense [in, out], Conv [kh, kw, cin, cout]); 1 below rank 2."""
    return shape[-1] if len(shape) >= 2 else 1


class _Int8ChannelCodec:
    """Affine 8-bit quantization with one (scale, offset) per output channel.

    The channel is the last axis for tensors of rank >= 2; 0-d and 1-d tensors
    (biases, scalars) are one channel. Wire: one uint8 code per value,
    row-major (so channel ``c`` holds every ``C``-th code starting at ``c``).
    ``params = {"scale": [s_0, ...], "offset": [o_0, ...]}`` with exactly ``C``
    entries each. Channel ``c`` is off by at most ``s_c / 2``.
    """

    name = "int8-channel"

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        values = np.asarray(array, np.float32)
        _refuse_non_finite(self.name, values)
        channels = _channel_count(values.shape)
        if values.size == 0:
            return b"", {"scale": [0.0] * channels, "offset": [0.0] * channels}
        rows = values.reshape(-1, channels)
        scale, offset = _affine_params(rows, 0)
        codes = _quantize(rows, scale, offset)
        return codes.tobytes(), {"scale": [float(v) for v in scale], "offset": [float(v) for v in offset]}

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        _check_blob(self.name, blob, _element_count(shape), shape)
        channels = _channel_count(shape)
        scales, offsets = _param(self.name, params, "scale"), _param(self.name, params, "offset")
        if not isinstance(scales, list) or not isinstance(offsets, list):
            raise _bad_params(self.name, "scale and offset must be lists")
        if len(scales) != channels or len(offsets) != channels:
            raise _bad_params(
                self.name, f"shape {shape} has {channels} channels, got {len(scales)} scales, {len(offsets)} offsets"
            )
        pairs = [
            _check_affine(self.name, s, o, f"channel {c}") for c, (s, o) in enumerate(zip(scales, offsets, strict=True))
        ]
        scale = np.array([p[0] for p in pairs], np.float64)
        offset = np.array([p[1] for p in pairs], np.float64)
        if channels == 0:
            return np.zeros(shape, np.float32)
        codes = np.frombuffer(blob, dtype=np.uint8).astype(np.float64).reshape(-1, channels)
        return (offset + codes * scale).astype(np.float32).reshape(shape)


_INDEX = np.dtype("<u4")


class _TopKCodec:
    """Top-k sparsification: only the ``k`` largest-magnitude values travel.

    ``k = ceil(fraction * size)``, at least 1 for a non-empty tensor (0 for an
    empty one). Wire: ``k`` little-endian uint32 flat (row-major) indices,
    strictly increasing, then ``k`` values (float32 for ``topk:<f>``, float16
    for ``topk16:<f>``). ``params = {"k": k}``. Decoding gives a dense float32
    tensor with zeros elsewhere; the kept values are exact (float32) or within
    float16 rounding. The decoder requires exactly the encoder's ``k``.
    """

    def __init__(self, name: str, fraction: Fraction, value_dtype: str):
        self.name = name
        self.fraction = fraction
        self._values = np.dtype(value_dtype)

    def k_for(self, size: int) -> int:
        if size == 0:
            return 0
        return min(size, max(1, math.ceil(self.fraction * size)))

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, Any]]:
        flat = np.asarray(array, np.float32).reshape(-1)
        _refuse_non_finite(self.name, flat)
        if flat.size > np.iinfo(np.uint32).max:
            raise ProtocolError(OUT_OF_RANGE, f"{self.name} indexes at most 2**32 - 1 values")
        k = self.k_for(flat.size)
        if k == flat.size:
            indices = np.arange(k)
        else:
            indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        kept = flat[indices]
        limit = float(np.finfo(self._values).max)
        if self._values.itemsize < 4 and kept.size and np.abs(kept).max() > limit:
            raise ProtocolError(OUT_OF_RANGE, f"values beyond ±{limit:g} do not fit {self.name}")
        blob = indices.astype(_INDEX).tobytes() + kept.astype(self._values.newbyteorder("<")).tobytes()
        return blob, {"k": int(k)}

    def decode(self, blob: bytes, params: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        size = _element_count(shape)
        if size > MAX_DECODED_ELEMENTS:
            raise ProtocolError(BAD_TENSOR_SIZE, f"{self.name}: {size} values exceed {MAX_DECODED_ELEMENTS}")
        k = _param(self.name, params, "k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise _bad_params(self.name, f"k must be a non-negative integer, got {k!r}")
        if k > size:
            raise _bad_params(self.name, f"k = {k} exceeds the tensor's {size} values")
        if k != self.k_for(size):
            raise _bad_params(self.name, f"k = {k}, but {self.name} keeps {self.k_for(size)} of {size} values")
        _check_blob(self.name, blob, k * (_INDEX.itemsize + self._values.itemsize), shape)
        indices = np.frombuffer(blob, dtype=_INDEX, count=k)
        if k and (indices[-1] >= size or np.any(indices[1:] <= indices[:-1])):
            raise _bad_params(self.name, "indices must be strictly increasing and below the tensor size")
        values = np.frombuffer(blob, dtype=self._values.newbyteorder("<"), offset=k * _INDEX.itemsize)
        dense = np.zeros(size, np.float32)
        dense[indices] = values
        return dense.reshape(shape)


CODECS: dict[str, Codec] = {
    "float32": _RawCodec("float32", "<f4"),
    # Half the bytes; relative error 2**-11 on values within float16 range.
    "float16": _RawCodec("float16", "<f2"),
    # A quarter of the bytes; error at most scale / 2 per value.
    "int8": _Int8Codec(),
    "int8-channel": _Int8ChannelCodec(),
}

# Parameterised codecs, "<family>:<fraction>" with 0 < fraction <= 1 as a plain decimal.
_SPARSE_FAMILIES = {"topk": "<f4", "topk16": "<f2"}
_FRACTION = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
_MAX_FRACTION_CHARS = 20


def _parametrised(name: str) -> Codec | None:
    family, sep, text = name.partition(":")
    if not sep or family not in _SPARSE_FAMILIES:
        return None
    if len(text) > _MAX_FRACTION_CHARS or not _FRACTION.fullmatch(text):
        raise ProtocolError(UNKNOWN_CODEC, f"codec {name!r}: fraction must be a decimal number in (0, 1]")
    fraction = Fraction(text)
    if not 0 < fraction <= 1:
        raise ProtocolError(UNKNOWN_CODEC, f"codec {name!r}: fraction must be in (0, 1]")
    return _TopKCodec(name, fraction, _SPARSE_FAMILIES[family])


def get_codec(name: str) -> Codec:
    """The codec called ``name``; ProtocolError("unknown_codec") for an unknown one.

    Besides the names in :data:`CODECS`, ``topk:<fraction>`` and
    ``topk16:<fraction>`` work for any decimal fraction in (0, 1], e.g. ``topk:0.01``.
    """
    if isinstance(name, str):
        codec = CODECS.get(name) or _parametrised(name)
        if codec is not None:
            return codec
    known = [*sorted(CODECS), "topk:<fraction>", "topk16:<fraction>"]
    raise ProtocolError(UNKNOWN_CODEC, f"codec {name!r} is not one of {known}")
