"""Binary frames: one model's weights (an update or the global model) as bytes.

Layout (all integers little-endian)::

    magic    4 bytes  b"LFWT"
    version  1 byte   FRAME_VERSION
    header   4 bytes  length H, then H bytes of UTF-8 JSON
    payload  the tensors' encoded bytes, concatenated in header order
    crc32    4 bytes  CRC-32 of everything before it

No pickle, nothing executable: the header is plain JSON and the payload raw
numbers. The decoder trusts nothing: it checks sizes before it allocates,
types before it reads, and the checksum before it decodes a tensor.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_client.codecs import get_codec
from edge_client.errors import ProtocolError, WeightsError
from edge_client.messages import UNNAMED_RUN, check_run_id
from edge_client.reasons import (
    BAD_CHECKSUM,
    BAD_HEADER,
    BAD_MAGIC,
    BAD_TENSORS,
    BAD_VERSION,
    STALE_ROUND,
    STALE_RUN,
    TRUNCATED,
    UNKNOWN_MODEL,
    WRONG_KIND,
)
from edge_client.weights import NamedArray, TensorSpec, Weights, check_weights
from edge_client.wire_json import loads_bounded

MAGIC = b"LFWT"
# Version 2 added the run id ("run"): a v1 peer would take a frame of any run for the current one.
FRAME_VERSION = 2
LEGACY_VERSIONS = (1,)  # decodable on request only (old checkpoints), with run = UNNAMED_RUN
KINDS = ("update", "global")
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NAME_LENGTH = 256
MAX_RANK = 8
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Frame:
    """Weights plus what the receiver needs to judge them."""

    kind: str
    round: int
    model_sha256: str
    tensors: Weights
    codec: str = "float32"
    client_id: str = ""
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    run: str = UNNAMED_RUN  # the federation run the weights belong to (docs/protocol.md, "Runs")


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame``; tensors are encoded with ``frame.codec``."""
    check_run_id(frame.run, "frame to encode", BAD_HEADER)
    codec = get_codec(frame.codec)
    blobs, specs = [], []
    for name, array in frame.tensors:
        blob, params = codec.encode(np.asarray(array, np.float32))
        blobs.append(blob)
        specs.append({"name": name, "shape": list(array.shape), "nbytes": len(blob), "params": params})
    header = {
        "kind": frame.kind,
        "run": frame.run,
        "round": frame.round,
        "model_sha256": frame.model_sha256,
        "codec": frame.codec,
        "client_id": frame.client_id,
        "num_examples": frame.num_examples,
        "metrics": dict(frame.metrics),
        "tensors": specs,
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    body = _PREFIX.pack(MAGIC, FRAME_VERSION, len(header_bytes)) + header_bytes + b"".join(blobs)
    return body + _CRC.pack(zlib.crc32(body))


def decode_frame(data: bytes, *, accept_legacy: bool = False) -> Frame:
    """Parse and structurally validate a frame; raise :class:`ProtocolError`.

    Checks magic, version, lengths, checksum, header types and tensor sizes.
    Whether the tensors fit a model (names, shapes, finite values) is the
    receiver's check: see :func:`edge_client.weights.check_weights`.
    ``accept_legacy`` also decodes version-1 frames (no run id, so
    ``run = UNNAMED_RUN``): for files written before v2, never for the wire.
    """
    if len(data) < _PREFIX.size + _CRC.size:
        raise ProtocolError(TRUNCATED, f"frame of {len(data)} bytes is shorter than its fixed fields")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(BAD_MAGIC, f"frame starts with {magic!r}, expected {MAGIC!r}")
    if version != FRAME_VERSION and not (accept_legacy and version in LEGACY_VERSIONS):
        raise ProtocolError(
            BAD_VERSION,
            f"frame version {version}, this litefed speaks {FRAME_VERSION}; run one litefed version on every peer",
        )
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + _CRC.size > len(data):
        raise ProtocolError(TRUNCATED, f"header of {header_len} bytes does not fit a {len(data)}-byte frame")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: len(data) - _CRC.size]) != crc:
        raise ProtocolError(BAD_CHECKSUM, "CRC-32 mismatch: the frame was corrupted or truncated")
    header = _parse_header(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
    if version == FRAME_VERSION:
        check_run_id(header.get("run"), "frame header", BAD_HEADER)
    else:
        header["run"] = UNNAMED_RUN
    payload = memoryview(data)[_PREFIX.size + header_len : len(data) - _CRC.size]
    return _build_frame(header, payload)


def _parse_header(raw: bytes) -> dict[str, Any]:
    header = loads_bounded(raw, "header", BAD_HEADER)
    if not isinstance(header, dict):
        raise ProtocolError(BAD_HEADER, "header is not a JSON object")
    _require(header, "kind", str)
    if header["kind"] not in KINDS:
        raise ProtocolError(BAD_HEADER, f"kind {header['kind']!r} is not one of {KINDS}")
    _require(header, "round", int)
    _require(header, "model_sha256", str)
    _require(header, "codec", str)
    _require(header, "client_id", str)
    _require(header, "num_examples", int)
    _require(header, "metrics", dict)
    _require(header, "tensors", list)
    if header["round"] < 0 or header["num_examples"] < 0:
        raise ProtocolError(BAD_HEADER, "round and num_examples must not be negative")
    for key, value in header["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ProtocolError(BAD_HEADER, f"metric {key!r} is not a finite number")
    if len(header["tensors"]) > MAX_TENSORS:
        raise ProtocolError(BAD_HEADER, f"{len(header['tensors'])} tensors is more than {MAX_TENSORS}")
    return header


def _require(obj: dict, key: str, kind: type) -> None:
    value = obj.get(key)
    # bool is an int subclass; a JSON true is never a valid count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(BAD_HEADER, f"header field {key!r} must be a {kind.__name__}, got {value!r}")


def _build_frame(header: dict[str, Any], payload: memoryview) -> Frame:
    codec = get_codec(header["codec"])
    tensors, offset = [], 0
    for spec in header["tensors"]:
        name, shape, nbytes = _tensor_spec(spec)
        if offset + nbytes > len(payload):
            raise ProtocolError(TRUNCATED, f"tensor {name!r} runs past the end of the payload")
        tensors.append(NamedArray(name, codec.decode(bytes(payload[offset : offset + nbytes]), spec["params"], shape)))
        offset += nbytes
    if offset != len(payload):
        raise ProtocolError(BAD_HEADER, f"{len(payload) - offset} payload bytes are not described by the header")
    return Frame(
        kind=header["kind"],
        round=header["round"],
        model_sha256=header["model_sha256"],
        tensors=tensors,
        codec=header["codec"],
        client_id=header["client_id"],
        num_examples=header["num_examples"],
        metrics={k: float(v) for k, v in header["metrics"].items()},
        run=header["run"],
    )


def _tensor_spec(spec: Any) -> tuple[str, tuple[int, ...], int]:
    if not isinstance(spec, dict):
        raise ProtocolError(BAD_HEADER, "tensor entry is not an object")
    _require(spec, "name", str)
    _require(spec, "shape", list)
    _require(spec, "nbytes", int)
    _require(spec, "params", dict)
    name, shape = spec["name"], spec["shape"]
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ProtocolError(BAD_HEADER, f"tensor name of length {len(name)} is not allowed")
    if len(shape) > MAX_RANK or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(BAD_HEADER, f"tensor {name!r}: shape {shape} is not a list of non-negative ints")
    if spec["nbytes"] < 0:
        raise ProtocolError(BAD_HEADER, f"tensor {name!r}: negative size")
    return name, tuple(shape), spec["nbytes"]


def validate_frame(
    frame: Frame,
    specs: Sequence[TensorSpec],
    model_sha256: str,
    kind: str,
    current_round: int | None = None,
    run: str | None = None,
) -> None:
    """Check that a decoded frame fits this federation; raise :class:`ProtocolError`.

    ``specs`` are the expected tensors (the manifest's trainable weights):
    names, order, shapes, dtypes, and every value finite
    (:func:`~edge_client.weights.check_weights`). ``current_round``,
    when given, is the only round accepted (anything else is stale or early);
    ``run``, when given, the only run.

    This is the one check of an update's tensors on its way into an
    aggregation: a frame that passed it needs no other, and the coordinator
    hands its tensors on marked as validated rather than checking them again.
    """
    if frame.kind != kind:
        raise ProtocolError(WRONG_KIND, f"expected a {kind!r} frame, got {frame.kind!r}")
    if frame.model_sha256 != model_sha256:
        raise ProtocolError(UNKNOWN_MODEL, f"frame is for model {frame.model_sha256[:12]}, not {model_sha256[:12]}")
    if run is not None and frame.run != run:
        raise ProtocolError(STALE_RUN, f"frame is for run {frame.run}, the current run is {run}")
    if current_round is not None and frame.round != current_round:
        raise ProtocolError(STALE_ROUND, f"frame is for round {frame.round}, the current round is {current_round}")
    if kind == "update" and frame.num_examples < 1:
        raise ProtocolError(BAD_HEADER, "an update must report at least one training example")
    try:
        check_weights(frame.tensors, specs)
    except WeightsError as exc:
        raise ProtocolError(BAD_TENSORS, str(exc)) from None
