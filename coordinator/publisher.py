"""What the coordinator writes on the broker: retained state it can write again, sealed when it signs.

A :class:`Publisher` owns the coordinator's side of the retained topics
(``model/meta`` and the model chunks, the global frame's chunks, ``round``)
and its acks. Every publish rides out a broker outage (:class:`BrokerOutage`);
after a reconnection :meth:`Publisher.republish` writes the retained state
again, since a broker restarted without persistence has lost it.

With a :class:`~edge_client.signing.SigningKey` the model meta (whose SHA-256
covers the model's chunks), each global frame and each announcement go out in
signed envelopes (docs/protocol.md, "Signatures"). Each is sealed once and
republished as the same bytes, so the chunks' transfer ids do not change and
boards that hold them recognise the copies. The empty retained ``round`` that
clears an old announcement stays unsigned: it asks for nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator.outage import BrokerOutage
from edge_client.chunks import split
from edge_client.manifest import Manifest
from edge_client.messages import Ack, ModelMeta
from edge_client.signing import HEADER_SIZE as ENVELOPE_HEADER_SIZE
from edge_client.signing import SigningKey
from edge_client.topics import Topics
from edge_client.transport import Message, Transport

log = logging.getLogger(__name__)


class Publisher:
    """Publishes for one coordinator on ``transport``; counts what it sent in :attr:`bytes_out`."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        outage: BrokerOutage,
        max_chunk: int,
        signer: SigningKey | None = None,
    ):
        self.transport, self.topics, self.outage = transport, topics, outage
        self.max_chunk, self.signer = max_chunk, signer
        self.bytes_out = 0
        self._chunks: dict[str, int] = {}  # retained chunk topics written per family
        self._announcement = b""  # the retained round, as published
        self._model: tuple[bytes, bytes] | None = None  # the model and its sealed meta, once published
        self._global: tuple[bytes, bytes] | None = None  # (frame, what is published for it)

    @property
    def announcement_limit(self) -> int:
        """The largest announcement body that still fits one message once sealed."""
        limit = min(self.transport.max_payload, self.max_chunk)
        return limit - ENVELOPE_HEADER_SIZE if self.signer is not None else limit

    def describe_signing(self) -> None:
        if self.signer is None:
            log.warning(
                "publishing unsigned: any connection that can write these topics can steer the boards; "
                "give --signing-key (litefed-provision writes one) and the boards its public key"
            )
        else:
            log.info("signing the model, global weights and rounds with key %s", self.signer.trust_key.key_id)

    # -- what there is to publish ---------------------------------------------------
    def clear_round(self) -> None:
        """Empty the retained ``round``: no board may find an announcement of another run (or a closed one) there."""
        self._publish(self.topics.round, b"", retain=True)

    def announce(self, announcement: bytes) -> None:
        self._publish(self.topics.round, self._seal("round", announcement), retain=True)

    def ack(self, client: str, ack: Ack) -> None:
        self._publish(self.topics.ack(client), ack.to_bytes())

    def model(self, model: bytes, sha256: str, manifest: Manifest) -> int:
        """Publish the model's chunks, then its meta (retained); the number of chunks."""
        count = self._publish_chunked("model", self.topics.model_chunk, model)
        meta = ModelMeta(sha256, len(model), count, manifest.to_json())
        self._model = (model, self._seal("model_meta", meta.to_bytes()))
        self._publish(self.topics.model_meta, self._model[1], retain=True)
        return count

    def global_frame(self, frame: bytes) -> None:
        """Publish the global weights that start the next round (retained: late boards find them)."""
        if self._global is None or self._global[0] is not frame:
            self._global = (frame, self._seal("global", frame))
        self._publish_chunked("global", self.topics.global_chunk, self._global[1])

    def republish(self) -> bool:
        """After a reconnection write every retained topic again: a broker restarted without persistence lost them.

        True if there was a reconnection since the last call.
        """
        reconnected = False
        while self.outage.reconnected():
            reconnected = True
            log.warning("reconnected to the broker: publishing the model, the global weights and the round again")
            if self._model is not None:
                self._publish_chunked("model", self.topics.model_chunk, self._model[0])
                self._publish(self.topics.model_meta, self._model[1], retain=True)
            if self._global is not None:
                self._publish_chunked("global", self.topics.global_chunk, self._global[1])
            self._publish(self.topics.round, self._announcement, retain=True)
        return reconnected

    # -- the wire ---------------------------------------------------------------------
    def _seal(self, kind: str, body: bytes) -> bytes:
        return body if self.signer is None else self.signer.seal(kind, body)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not self.outage.send(
            f"publishing on {topic}", lambda: self.transport.publish(topic, payload, retain=retain)
        ):
            return
        self.bytes_out += len(payload)
        if topic == self.topics.round:
            self._announcement = payload

    def _publish_chunked(self, family: str, topic_for: Callable[[int], str], payload: bytes) -> int:
        """Publish ``payload`` as retained chunks; clear retained chunks left from a longer payload."""
        chunks = split(payload, self.max_chunk)
        stale = range(len(chunks), self._chunks.get(family, 0))
        messages = [Message(topic_for(i), chunk, retain=True) for i, chunk in enumerate(chunks)]
        messages += [Message(topic_for(i), b"", retain=True) for i in stale]
        if not self.outage.send(f"publishing the {family}", lambda: self.transport.publish_many(messages)):
            return len(chunks)
        self.bytes_out += sum(len(m.payload) for m in messages)
        self._chunks[family] = len(chunks)
        return len(chunks)
