"""Protocol fakes shared by the tests: a fake board and a fake coordinator on the in-memory broker.

Both speak the wire protocol with the ``edge_client`` protocol modules only
(topics, messages, chunks, frames), so tests that use them pin the real
coordinator and the real edge client to docs/protocol.md rather than to each
other's code.
"""

from __future__ import annotations

import dataclasses
import time

from edge_client.chunks import Reassembler, split
from edge_client.frames import Frame, decode_frame, encode_frame
from edge_client.messages import UNNAMED_RUN, Ack, ModelMeta, Presence, RoundAnnouncement
from edge_client.model_file import sha256_hex
from edge_client.topics import Topics
from edge_client.transport import InMemoryBroker, InMemoryTransport, Message, Transport
from edge_client.weights import NamedArray

# -- the fake board (talks to a real coordinator) ----------------------------------------------
TOPICS = Topics("test")
SMALL_CHUNK = 2048  # forces multi-chunk transfers even for the small tabular model


class FakeClient:
    """A board speaking the protocol by hand to a coordinator: presence, then updates with chosen deltas.

    ``broker`` is the in-memory broker to attach to, or a transport not yet
    connected (e.g. an ``MqttTransport`` whose will is :meth:`will` of this
    id). Its presence reports ``num_examples``, so updates may claim that many.
    """

    def __init__(
        self,
        broker: InMemoryBroker | Transport,
        client_id: str,
        *,
        num_examples: int = 1000,
        topics: Topics = TOPICS,
    ):
        self.id, self.topics = client_id, topics
        if isinstance(broker, InMemoryBroker):
            self.transport: Transport = InMemoryTransport(broker, client_id, will=self.will(client_id, topics))
        else:
            self.transport = broker
        self.transport.connect()
        for pattern in (topics.round, topics.ack(client_id), topics.global_chunks):
            self.transport.subscribe(pattern)
        online = Presence("online", num_examples).to_bytes()
        self.transport.publish(topics.presence(client_id), online, retain=True)
        self.acks: list[Ack] = []
        self.rounds: list[RoundAnnouncement] = []
        self.globals: dict[int, Frame] = {}
        self._reassembler = Reassembler()

    @staticmethod
    def will(client_id: str, topics: Topics = TOPICS) -> Message:
        """The Last Will of ``client_id``: the spec's ``{"status": "offline"}``, retained."""
        return Message(topics.presence(client_id), b'{"status": "offline"}', retain=True)

    def pump(self, seconds: float = 0.05) -> None:
        end = time.monotonic() + seconds
        while (message := self.transport.receive(timeout=max(0.0, end - time.monotonic()))) is not None:
            if message.topic == self.topics.round:
                if message.payload:  # empty: the coordinator cleared the retained announcement
                    self.rounds.append(RoundAnnouncement.from_bytes(message.payload))
            elif message.topic == self.topics.ack(self.id):
                self.acks.append(Ack.from_bytes(message.payload))
            elif message.payload and (payload := self._reassembler.add(message.payload, "global")) is not None:
                frame = decode_frame(payload)
                self.globals[frame.round] = frame

    def wait_for(self, condition, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, f"{self.id}: condition not met within {timeout} s"
            self.pump()

    def send(self, frame: Frame | bytes) -> None:
        """Send an update; a Frame without a run gets the run of the last announcement, as a board's does."""
        if isinstance(frame, Frame) and frame.run == UNNAMED_RUN:
            frame = dataclasses.replace(frame, run=self.rounds[-1].run)
        payload = frame if isinstance(frame, bytes) else encode_frame(frame)
        for chunk in split(payload, SMALL_CHUNK):
            self.transport.publish(self.topics.update(self.id), chunk)


# -- the fake coordinator (talks to a real edge client) ------------------------------------------
CLIENT = "pi-1"
T0 = 1_700_000_000.0
MODEL_CHUNK = 4096  # several chunks even for the small tabular model
RUN = "1111111111111111"  # the fake coordinator's run


class FakeCoordinator:
    """A coordinator speaking the protocol by hand to boards: publishes what a coordinator
    publishes (model, global weights, announcements, acks) and collects what boards send."""

    def __init__(self, broker: InMemoryBroker, tabular, topics: Topics | None = None):
        self.topics = topics or Topics()
        self.model = tabular.tflite
        self.manifest = tabular.manifest
        self.sha = sha256_hex(self.model)
        self.run = RUN
        self.transport = InMemoryTransport(broker, "coordinator")
        self.transport.connect()
        self.transport.subscribe(self.topics.updates)
        self.transport.subscribe(self.topics.presences)
        self.update_messages: list[bytes] = []  # raw update chunks, in arrival order
        self.updates: list[bytes] = []  # reassembled update payloads
        self.presence: dict[str, Presence] = {}
        self._reassembler = Reassembler()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.transport.publish(topic, payload, retain=retain)

    def publish_meta(self) -> None:
        count = len(split(self.model, MODEL_CHUNK))
        meta = ModelMeta(self.sha, len(self.model), count, self.manifest.to_json())
        self.publish(self.topics.model_meta, meta.to_bytes(), retain=True)

    def publish_model_chunks(self) -> None:
        for i, chunk in enumerate(split(self.model, MODEL_CHUNK)):
            self.publish(self.topics.model_chunk(i), chunk, retain=True)

    def publish_model(self) -> None:
        self.publish_meta()
        self.publish_model_chunks()

    def publish_global(self, weights: list[NamedArray], round: int, run: str | None = None) -> bytes:
        frame = encode_frame(Frame("global", round, self.sha, weights, run=run or self.run))
        for i, chunk in enumerate(split(frame, MODEL_CHUNK)):
            self.publish(self.topics.global_chunk(i), chunk, retain=True)
        return frame

    def announce(self, round: int, selected=(CLIENT,), deadline: float = T0 + 100, **kw) -> RoundAnnouncement:
        kw.setdefault("run", self.run)
        ann = RoundAnnouncement(round, tuple(selected), deadline, kw.pop("model_sha256", self.sha), **kw)
        self.publish(self.topics.round, ann.to_bytes(), retain=True)
        return ann

    def ack(self, round: int, status: str, reason: str = "", client: str = CLIENT, run: str | None = None) -> None:
        self.publish(self.topics.ack(client), Ack(round, status, reason, run or self.run).to_bytes())

    def drain(self) -> None:
        while (message := self.transport.receive(0)) is not None:
            if self.topics.client_of(message.topic) is None:
                continue
            if message.topic.startswith(self.topics.base + "/presence/"):
                if message.payload:
                    self.presence[self.topics.client_of(message.topic)] = Presence.from_bytes(message.payload)
                continue
            self.update_messages.append(message.payload)
            payload = self._reassembler.add(message.payload, message.topic)
            if payload is not None:
                self.updates.append(payload)

    def close(self) -> None:
        self.transport.close()
