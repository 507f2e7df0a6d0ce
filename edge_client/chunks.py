"""Splitting large payloads into MQTT-sized chunks and putting them back together.

Managed brokers cap a message's size (AWS IoT Core: 128 KB), so every
payload travels as chunks of at most ``max_chunk`` bytes. Chunk layout
(integers little-endian)::

    magic     4 bytes   b"LFCK"
    version   1 byte
    transfer  16 bytes  id of the payload: its SHA-256 prefix by default
    index     4 bytes   0 .. count-1
    count     4 bytes
    total     8 bytes   size of the whole payload
    crc32     4 bytes   CRC-32 of the chunk's data
    data      the payload's bytes [index * step, ...)

QoS 1 may deliver a chunk twice and chunks may arrive in any order; the
:class:`Reassembler` accepts both. Because the transfer id is derived from
the content, resending the same payload merges with what already arrived.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_client.errors import ProtocolError
from edge_client.reasons import BAD_CHECKSUM, BAD_CHUNK, BAD_MAGIC, BAD_VERSION, TOO_BUSY, TOO_LARGE, TRUNCATED

log = logging.getLogger(__name__)

MAGIC = b"LFCK"
CHUNK_VERSION = 1
_HEADER = struct.Struct("<4sB16sIIQI")
HEADER_SIZE = _HEADER.size
# Well below AWS IoT Core's 128 KB message limit, with room for topic and MQTT headers.
DEFAULT_MAX_CHUNK = 96 * 1024


def transfer_id_for(payload: bytes) -> bytes:
    """The default 16-byte transfer id: a prefix of the payload's SHA-256."""
    return hashlib.sha256(payload).digest()[:16]


def split(payload: bytes, max_chunk: int = DEFAULT_MAX_CHUNK, transfer_id: bytes | None = None) -> list[bytes]:
    """Cut ``payload`` into chunks whose full size (header included) is at most ``max_chunk``."""
    step = max_chunk - HEADER_SIZE
    if step < 1:
        raise ValueError(f"max_chunk must exceed the {HEADER_SIZE}-byte chunk header, got {max_chunk}")
    transfer_id = transfer_id_for(payload) if transfer_id is None else transfer_id
    if len(transfer_id) != 16:
        raise ValueError("transfer_id must be 16 bytes")
    count = max(1, -(-len(payload) // step))
    chunks = []
    for index in range(count):
        data = payload[index * step : (index + 1) * step]
        header = _HEADER.pack(MAGIC, CHUNK_VERSION, transfer_id, index, count, len(payload), zlib.crc32(data))
        chunks.append(header + data)
    return chunks


@dataclass(frozen=True)
class Chunk:
    transfer_id: bytes
    index: int
    count: int
    total: int
    data: bytes


def parse_chunk(message: bytes) -> Chunk:
    """Check one chunk's header and checksum; raise :class:`ProtocolError`."""
    if len(message) < HEADER_SIZE:
        raise ProtocolError(TRUNCATED, f"chunk of {len(message)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, transfer_id, index, count, total, crc = _HEADER.unpack_from(message)
    if magic != MAGIC:
        raise ProtocolError(BAD_MAGIC, f"chunk starts with {magic!r}, expected {MAGIC!r}")
    if version != CHUNK_VERSION:
        raise ProtocolError(BAD_VERSION, f"chunk version {version}, this litefed speaks {CHUNK_VERSION}")
    if count < 1 or index >= count:
        raise ProtocolError(BAD_CHUNK, f"chunk index {index} of {count}")
    data = bytes(message[HEADER_SIZE:])
    if zlib.crc32(data) != crc:
        raise ProtocolError(BAD_CHECKSUM, f"chunk {index}/{count}: CRC-32 mismatch")
    if len(data) > total:
        raise ProtocolError(BAD_CHUNK, f"chunk {index}/{count} holds more than the {total}-byte payload")
    return Chunk(transfer_id, index, count, total, data)


@dataclass
class _Transfer:
    count: int
    total: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Collects chunks per ``(source, transfer)`` and returns each completed payload.

    Memory is bounded: one payload may not exceed ``max_payload`` bytes, all
    incomplete transfers together not ``max_pending`` bytes, and an incomplete
    transfer is forgotten ``ttl`` seconds after its first chunk.
    """

    def __init__(
        self,
        max_payload: int = 64 << 20,
        max_pending: int = 1 << 30,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_payload, self.max_pending, self.ttl = max_payload, max_pending, ttl
        self._clock = clock
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}
        self._pending = 0
        self.expired = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def add(self, message: bytes, source: str = "") -> bytes | None:
        """Add one chunk from ``source`` (e.g. the topic); the payload once complete, else None."""
        chunk = parse_chunk(message)
        if chunk.total > self.max_payload:
            raise ProtocolError(TOO_LARGE, f"payload of {chunk.total} bytes exceeds the limit of {self.max_payload}")
        self._expire()
        key = (source, chunk.transfer_id)
        transfer = self._transfers.get(key) or _Transfer(chunk.count, chunk.total, self._clock())
        if (transfer.count, transfer.total) != (chunk.count, chunk.total):
            raise ProtocolError(BAD_CHUNK, "chunk disagrees with earlier chunks of its transfer on count or size")
        previous = transfer.parts.get(chunk.index)
        if previous is not None:
            if previous != chunk.data:
                raise ProtocolError(BAD_CHUNK, f"chunk {chunk.index} arrived twice with different data")
            return None  # a QoS 1 duplicate
        if self._pending + len(chunk.data) > self.max_pending:
            raise ProtocolError(TOO_BUSY, f"more than {self.max_pending} bytes of incomplete transfers are pending")
        self._transfers[key] = transfer
        transfer.parts[chunk.index] = chunk.data
        transfer.received += len(chunk.data)
        self._pending += len(chunk.data)
        if len(transfer.parts) < transfer.count:
            return None
        del self._transfers[key]
        self._pending -= transfer.received
        payload = b"".join(transfer.parts[i] for i in range(transfer.count))
        if len(payload) != transfer.total:
            raise ProtocolError(BAD_CHUNK, f"reassembled {len(payload)} bytes, header promised {transfer.total}")
        return payload

    def _expire(self) -> None:
        now = self._clock()
        stale = [key for key, t in self._transfers.items() if now - t.started > self.ttl]
        for key in stale:
            transfer = self._transfers.pop(key)
            self._pending -= transfer.received
            self.expired += 1
            log.warning(
                "dropped incomplete transfer from %r: %d of %d chunks after %.0f s",
                key[0],
                len(transfer.parts),
                transfer.count,
                self.ttl,
            )
