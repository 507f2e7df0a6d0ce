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
# What holding one chunk costs besides its data (a bytes object, a dict slot): the least a chunk counts for.
_MIN_CHUNK_COST = 128


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
    received: int = 0  # payload bytes held
    held: int = 0  # what the bounds count: each chunk's data, at least _MIN_CHUNK_COST


@dataclass
class _Source:
    """What one source (a client's topic) holds: the share of the bounds it uses."""

    held: int = 0
    transfers: int = 0


class Reassembler:
    """Collects chunks per ``(source, transfer)`` and returns each completed payload.

    Memory is bounded, counting each held chunk as its data but at least 128
    bytes (what holding one costs), so a flood of tiny chunks is bounded too:
    one payload may not exceed ``max_payload`` bytes, all incomplete transfers
    together not ``max_pending`` bytes nor ``max_transfers`` transfers, and
    those of one source (a client's topic) not ``max_pending_per_source``
    bytes (default: two payloads, an old incomplete transfer and a new one)
    nor ``max_transfers_per_source`` transfers. A source over its share is
    refused (``too_busy``) while the others keep theirs: one flooding client
    cannot make another's update ``too_busy``, and nothing is ever evicted to
    make room. An incomplete transfer is forgotten ``ttl`` seconds after its
    first chunk.
    """

    def __init__(
        self,
        max_payload: int = 64 << 20,
        max_pending: int = 1 << 30,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_pending_per_source: int | None = None,
        max_transfers: int = 65_536,
        max_transfers_per_source: int = 64,
    ):
        self.max_payload, self.max_pending, self.ttl = max_payload, max_pending, ttl
        self.max_pending_per_source = (
            2 * max(max_payload, _MIN_CHUNK_COST) if max_pending_per_source is None else max_pending_per_source
        )
        self.max_transfers, self.max_transfers_per_source = max_transfers, max_transfers_per_source
        self._clock = clock
        # Insertion order is start order (a key is never re-inserted while held), so expiry pops from the front.
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}
        self._sources: dict[str, _Source] = {}
        self._pending = 0
        self._held = 0
        self.expired = 0

    @property
    def pending_bytes(self) -> int:
        """Payload bytes of the incomplete transfers."""
        return self._pending

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def pending_of(self, source: str) -> int:
        """Bytes ``source`` holds against the bounds."""
        use = self._sources.get(source)
        return 0 if use is None else use.held

    def add(self, message: bytes, source: str = "") -> bytes | None:
        """Add one chunk from ``source`` (e.g. the topic); the payload once complete, else None."""
        chunk = parse_chunk(message)
        if chunk.total > self.max_payload:
            raise ProtocolError(TOO_LARGE, f"payload of {chunk.total} bytes exceeds the limit of {self.max_payload}")
        self._expire()
        key = (source, chunk.transfer_id)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = _Transfer(chunk.count, chunk.total, self._clock())
        if (transfer.count, transfer.total) != (chunk.count, chunk.total):
            raise ProtocolError(BAD_CHUNK, "chunk disagrees with earlier chunks of its transfer on count or size")
        previous = transfer.parts.get(chunk.index)
        if previous is not None:
            if previous != chunk.data:
                raise ProtocolError(BAD_CHUNK, f"chunk {chunk.index} arrived twice with different data")
            return None  # a QoS 1 duplicate
        if transfer.received + len(chunk.data) > transfer.total or (not chunk.data and chunk.index < chunk.count - 1):
            raise ProtocolError(
                BAD_CHUNK, f"chunk {chunk.index}/{chunk.count} does not fit its {chunk.total}-byte payload"
            )
        cost = max(len(chunk.data), _MIN_CHUNK_COST)
        self._reserve(source, key not in self._transfers, cost)
        self._transfers[key] = transfer
        transfer.parts[chunk.index] = chunk.data
        transfer.received += len(chunk.data)
        transfer.held += cost
        self._pending += len(chunk.data)
        if len(transfer.parts) < transfer.count:
            return None
        self._forget(key)
        payload = b"".join(transfer.parts[i] for i in range(transfer.count))
        if len(payload) != transfer.total:
            raise ProtocolError(BAD_CHUNK, f"reassembled {len(payload)} bytes, header promised {transfer.total}")
        return payload

    def _reserve(self, source: str, new_transfer: bool, size: int) -> None:
        """Count ``size`` more bytes (and a new transfer) for ``source``, or ``too_busy`` if a bound would break."""
        use = self._sources.get(source) or _Source()
        if use.held + size > self.max_pending_per_source or (
            new_transfer and use.transfers >= self.max_transfers_per_source
        ):
            raise ProtocolError(
                TOO_BUSY,
                f"{source or 'this source'} already has {use.held} bytes in {use.transfers} incomplete transfers "
                f"(at most {self.max_pending_per_source} bytes, {self.max_transfers_per_source} transfers per source)",
            )
        if self._held + size > self.max_pending or (new_transfer and len(self._transfers) >= self.max_transfers):
            raise ProtocolError(TOO_BUSY, f"more than {self.max_pending} bytes of incomplete transfers are pending")
        use.held += size
        use.transfers += new_transfer
        self._held += size
        self._sources[source] = use

    def _forget(self, key: tuple[str, bytes]) -> _Transfer:
        transfer = self._transfers.pop(key)
        self._pending -= transfer.received
        self._held -= transfer.held
        use = self._sources[key[0]]
        use.held -= transfer.held
        use.transfers -= 1
        if not use.transfers:
            del self._sources[key[0]]
        return transfer

    def _expire(self) -> None:
        now = self._clock()
        while self._transfers:
            key, oldest = next(iter(self._transfers.items()))
            if now - oldest.started <= self.ttl:
                return
            transfer = self._forget(key)
            self.expired += 1
            log.warning(
                "dropped incomplete transfer from %r: %d of %d chunks after %.0f s",
                key[0],
                len(transfer.parts),
                transfer.count,
                self.ttl,
            )
