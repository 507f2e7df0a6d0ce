"""The small JSON control messages of the protocol.

Each class parses untrusted JSON with :meth:`from_bytes`, raising
:class:`ProtocolError` for anything malformed, and serializes with
:meth:`to_bytes`. A decoded message is valid by construction: field types,
ranges, SHA-256 digests (``bad_sha256``) and a model meta's manifest
(``bad_json``, ``manifest_mismatch``) are checked here, so receivers only
decide whether the message fits their state. Weights never travel here: see
:mod:`edge_client.frames`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

from edge_client.errors import ManifestError, ProtocolError
from edge_client.manifest import Manifest
from edge_client.reasons import BAD_JSON, BAD_SHA256, DUPLICATE, MANIFEST_MISMATCH, SIZE_MISMATCH, TOO_LARGE
from edge_client.topics import check_name
from edge_client.wire_json import finite_float, loads_bounded

MAX_JSON_BYTES = 1 << 20
# A run id: 16 lowercase hex digits (64 random bits), fixed length so frame sizes do not depend on it.
# Matched with fullmatch: "$" would also accept a trailing newline.
_RUN_ID = re.compile(r"[0-9a-f]{16}")
# The run of frames made outside any federation run (tests, benchmarks); no coordinator draws it.
UNNAMED_RUN = "0" * 16
_SHA256 = re.compile(r"[0-9a-f]{64}")


def new_run_id() -> str:
    """A fresh random run id (never :data:`UNNAMED_RUN`)."""
    for _ in range(8):  # a zero draw has probability 2**-64; bounded all the same
        run = secrets.token_hex(8)
        if run != UNNAMED_RUN:
            return run
    raise RuntimeError("the system random generator returned zeros eight times")


def is_run_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


def check_run_id(value: object, what: str, reason: str = BAD_JSON) -> str:
    """``value`` if it is a run id, else :class:`ProtocolError` (``reason``) naming ``what``."""
    if value is None:
        raise ProtocolError(
            reason, f"{what} has no run id: the peer speaks litefed protocol v1; upgrade it to protocol v2"
        )
    if not is_run_id(value):
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise ProtocolError(reason, f"{what}: run id {shown!r} is not 16 lowercase hex digits")
    return value


def check_sha256(value: str, what: str) -> str:
    """``value`` if it is a SHA-256 hex digest (64 lowercase hex digits), else ``ProtocolError("bad_sha256")``."""
    if not _SHA256.fullmatch(value):
        raise ProtocolError(BAD_SHA256, f"{what}: model_sha256 {value[:80]!r} is not 64 lowercase hex digits")
    return value


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(TOO_LARGE, f"{what} of {len(data)} bytes exceeds {MAX_JSON_BYTES}")
    obj = loads_bounded(data, what, BAD_JSON)
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, f"{what} is not a JSON object")
    return obj


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _get(obj: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ProtocolError(BAD_JSON, f"{what}: field {key!r} must be {'/'.join(k.__name__ for k in kinds)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(BAD_JSON, f"{what}: field {key!r} must be finite")
    return value


def _number(obj: dict, key: str, what: str) -> float:
    """A finite float field; an int too large for a float is a ``bad_json``, never an ``OverflowError``."""
    return finite_float(_get(obj, key, (int, float), what), f"{what}: field {key!r}", BAD_JSON)


@dataclass(frozen=True)
class RoundAnnouncement:
    """What the coordinator asks of the selected clients for one round."""

    round: int
    selected: tuple[str, ...]
    deadline: float  # Unix time (seconds) by which updates must have arrived
    model_sha256: str
    epochs: int = 1
    lr: float = 0.01
    mu: float = 0.0
    codec: str = "float32"
    run: str = UNNAMED_RUN  # the coordinator's run id (docs/protocol.md, "Runs")

    def to_bytes(self) -> bytes:
        return _dump({**asdict(self), "selected": list(self.selected)})

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundAnnouncement:
        obj, what = _load(data, "round announcement"), "round announcement"
        selected = _get(obj, "selected", list, what)
        try:
            selected = tuple(check_name("client id", c) for c in selected)
        except ValueError as exc:
            raise ProtocolError(BAD_JSON, f"{what}: {exc}") from None
        msg = cls(
            round=_get(obj, "round", int, what),
            selected=selected,
            deadline=_number(obj, "deadline", what),
            model_sha256=check_sha256(_get(obj, "model_sha256", str, what), what),
            epochs=_get(obj, "epochs", int, what),
            lr=_number(obj, "lr", what),
            mu=_number(obj, "mu", what),
            codec=_get(obj, "codec", str, what),
            run=check_run_id(obj.get("run"), what),
        )
        if msg.round < 0 or msg.epochs < 1 or msg.lr <= 0 or msg.mu < 0:
            raise ProtocolError(BAD_JSON, f"{what}: round >= 0, epochs >= 1, lr > 0 and mu >= 0 are required")
        return msg


ACK_STATUSES = ("accepted", DUPLICATE, "rejected")


@dataclass(frozen=True)
class Ack:
    """The coordinator's answer to one update."""

    round: int
    status: str
    reason: str = ""
    run: str = UNNAMED_RUN  # the run of the update it answers (the coordinator's when undecodable)

    def to_bytes(self) -> bytes:
        return _dump(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Ack:
        obj, what = _load(data, "ack"), "ack"
        msg = cls(
            _get(obj, "round", int, what),
            _get(obj, "status", str, what),
            _get(obj, "reason", str, what),
            check_run_id(obj.get("run"), what),
        )
        if msg.status not in ACK_STATUSES:
            raise ProtocolError(BAD_JSON, f"ack status {msg.status!r} is not one of {ACK_STATUSES}")
        return msg


@dataclass(frozen=True)
class Presence:
    """A client's retained online/offline state (offline is also its Last Will).

    Only ``status`` is required, as docs/protocol.md shows: ``num_examples``
    defaults to 0 (a client without data, never selected) and ``version`` to
    ``""``, so the spec's ``{"status": "offline"}`` Last Will and an online
    presence without a version decode. A field that is present must be valid.
    """

    status: str
    num_examples: int = 0
    version: str = ""

    def to_bytes(self) -> bytes:
        return _dump(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Presence:
        obj, what = _load(data, "presence"), "presence"
        msg = cls(
            _get(obj, "status", str, what),
            _get(obj, "num_examples", int, what) if "num_examples" in obj else 0,
            _get(obj, "version", str, what) if "version" in obj else "",
        )
        if msg.status not in ("online", "offline") or msg.num_examples < 0:
            raise ProtocolError(BAD_JSON, f"presence status {msg.status!r} / num_examples {msg.num_examples}")
        return msg


@dataclass(frozen=True)
class ModelMeta:
    """Retained description of the model graph published in chunks.

    ``manifest`` is the JSON of the model's :class:`Manifest`;
    :meth:`parse_manifest` parses it and checks that it belongs to
    ``model_sha256`` (as :meth:`from_bytes` does).
    """

    model_sha256: str
    size: int
    chunks: int
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return _dump(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelMeta:
        obj, what = _load(data, "model meta"), "model meta"
        msg = cls(
            check_sha256(_get(obj, "model_sha256", str, what), what),
            _get(obj, "size", int, what),
            _get(obj, "chunks", int, what),
            _get(obj, "manifest", dict, what),
        )
        if msg.size < 1 or msg.chunks < 1:
            raise ProtocolError(BAD_JSON, f"{what}: size and chunks must be positive")
        msg.parse_manifest()  # now, so that a decoded meta is valid
        return msg

    def parse_manifest(self) -> Manifest:
        """The manifest, parsed: ``bad_json`` if malformed, ``manifest_mismatch`` if it is another model's."""
        try:
            manifest = Manifest.from_json(self.manifest)
        except ManifestError as exc:
            raise ProtocolError(BAD_JSON, f"model meta: {exc}") from None
        if manifest.model_sha256 != self.model_sha256:
            raise ProtocolError(
                MANIFEST_MISMATCH,
                f"model meta: the manifest belongs to model {manifest.model_sha256[:12]}, not {self.model_sha256[:12]}",
            )
        return manifest

    def check_model(self, model: bytes) -> None:
        """Raise ``ProtocolError("size_mismatch")`` unless ``model`` has the announced size."""
        if len(model) != self.size:
            raise ProtocolError(SIZE_MISMATCH, f"model meta says {self.size} bytes, the model has {len(model)}")
