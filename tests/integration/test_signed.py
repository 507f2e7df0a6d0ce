"""A signed federation on a real Mosquitto: boards act only on what their coordinator signed (issue 11).

A coordinator with a signing key runs two rounds with two real edge clients
that trust its public key. Then an attacker connection with full rights on
the broker writes what once steered or bricked every board: an unsigned
announcement asking for a round with ``lr`` 2.0 (the boards hold that round's
global weights, so they would train at once), the real announcement with its
``lr`` changed, one signed by another key, the first round's signed
announcement and global frame replayed, an unsigned model meta and model, and
an unsigned global frame of round 10**6. Each is refused with its reason,
nothing is trained or sent, and the model and global weights stay the
coordinator's; the forgeries, retained, still get nowhere after a board
restarts from its state directory.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import CoordinatorError
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.strategies import FedAvg, RoundConfig
from edge_client.chunks import parse_chunk, split
from edge_client.client import EdgeClient, last_will
from edge_client.config import ClientConfig
from edge_client.frames import Frame, encode_frame
from edge_client.messages import ModelMeta, RoundAnnouncement
from edge_client.mqtt import MqttTransport
from edge_client.reasons import BAD_SIGNATURE, REPLAYED, UNKNOWN_KEY, UNSIGNED
from edge_client.signing import HEADER_SIZE, SigningKey
from edge_client.topics import Topics
from edge_client.transport import Message
from tests.helpers import separable_binary_data

pytestmark = pytest.mark.integration

ROUNDS = 2
BOARDS = ("pi-0", "pi-1")
WAIT = 30.0  # bound of every wait; each is over in well under a second to a few seconds


def _wait(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Board:
    """A real edge client in a thread, on its own MQTT connection and state directory."""

    def __init__(self, url: str, topics: Topics, directory: Path, client_id: str, data, trust_key: Path):
        self.config = ClientConfig(
            client_id=client_id,
            state_dir=directory / client_id,
            broker_url=url,
            federation=topics.federation,
            topic_prefix=topics.prefix,
            ack_timeout=2.0,
            seed=0,
            trust_key=trust_key,
        )
        transport = MqttTransport(url, f"{client_id}-{uuid.uuid4().hex[:8]}", will=last_will(self.config))
        self.client = EdgeClient(self.config, transport, dataset=data)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.client.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        self.client.close()


class Capture:
    """The attacker's view: every retained message the coordinator wrote, as received."""

    def __init__(self, transport: MqttTransport, topics: Topics):
        self.transport, self.topics = transport, topics
        self.rounds: list[bytes] = []
        self.globals: dict[bytes, list[bytes]] = {}  # transfer id -> chunks, in order of arrival
        for pattern in (topics.round, topics.global_chunks):
            transport.subscribe(pattern)

    def pump(self) -> None:
        while (message := self.transport.receive(0.05)) is not None:
            if not message.payload:
                continue
            if message.topic == self.topics.round and message.payload not in self.rounds:
                self.rounds.append(bytes(message.payload))
            elif message.topic.startswith(self.topics.base + "/global/chunk/"):
                chunks = self.globals.setdefault(parse_chunk(message.payload).transfer_id, [])
                if message.payload not in chunks:
                    chunks.append(bytes(message.payload))


def _coordinator(url: str, topics: Topics, tabular, tmp_path: Path, key: SigningKey, make) -> Coordinator:
    config = CoordinatorConfig(
        model_path=tabular.model_path,
        rounds=ROUNDS,
        round_timeout=60.0,
        federation=topics.federation,
        topic_prefix=topics.prefix,
        checkpoint_dir=tmp_path / "ckpt",
        seed=1,
        max_attempts=1,
        poll_interval=0.05,
    )
    strategy = FedAvg(fraction_fit=1.0, min_fit=2, min_available=2, round_config=RoundConfig(lr=0.05))
    return Coordinator(config, make(url, "coordinator", connect=False), strategy, signer=key)


def _publish(attacker: MqttTransport, topic: str, payload: bytes, retain: bool = True) -> None:
    attacker.publish(topic, payload, retain=retain)


def _chunked(attacker: MqttTransport, topic_for: Callable[[int], str], chunks: list[bytes]) -> None:
    attacker.publish_many([Message(topic_for(i), c, retain=True) for i, c in enumerate(chunks)])


def test_boards_act_only_on_what_their_coordinator_signed(mosquitto_broker, mqtt_client, tabular, tmp_path):
    url = mosquitto_broker.url
    topics = Topics("signed", f"test/{uuid.uuid4().hex[:12]}")
    key, mallory_key = SigningKey.generate(), SigningKey.generate()
    key.trust_key.save(tmp_path / "coordinator.pub")
    attacker = mqtt_client(url, "attacker")
    capture = Capture(attacker, topics)
    x, y = separable_binary_data(120, seed=5)
    trust = tmp_path / "coordinator.pub"
    halves = [(x[i * 60 : (i + 1) * 60], y[i * 60 : (i + 1) * 60]) for i in range(len(BOARDS))]
    boards = [Board(url, topics, tmp_path, c, halves[i], trust) for i, c in enumerate(BOARDS)]
    coordinator = _coordinator(url, topics, tabular, tmp_path, key, mqtt_client)
    try:
        coordinator.start()
        history = coordinator.run()
        assert [m.clients_answered for m in history] == [2] * ROUNDS  # the signed federation works
        final = ROUNDS + 1  # the final global frame, published after the last round
        _wait(lambda: all(b.client.global_frame and b.client.global_frame.round == final for b in boards),
              "the boards to hold the final global weights")  # fmt: skip
        _wait(lambda: (capture.pump(), len(capture.rounds) >= ROUNDS and len(capture.globals) >= final)[1],
              "the attacker to capture the announcements and global frames")  # fmt: skip
        before = [(b.client.updates_sent, b.client.rounds_completed, b.client.progress) for b in boards]
        held_global = [b.client.global_frame for b in boards]
        sha, run = coordinator.model_sha256, coordinator.run_id

        # An announcement of the round whose global weights the boards hold: accepted, they would train.
        bait = RoundAnnouncement(final, BOARDS, time.time() + 600, sha, 1, 2.0, 0.0, "float32", run)
        _publish(attacker, topics.round, bait.to_bytes())
        genuine = capture.rounds[-1]
        tampered = genuine.replace(b'"lr":0.05', b'"lr":2.00')
        assert tampered != genuine and len(tampered) == len(genuine)
        _publish(attacker, topics.round, tampered)
        _publish(attacker, topics.round, mallory_key.seal("round", bait.to_bytes()))
        _publish(attacker, topics.round, capture.rounds[0])  # round 1's, replayed
        first_global = next(iter(capture.globals.values()))  # round 1's global frame, replayed
        _chunked(attacker, topics.global_chunk, first_global)
        junk_model = bytes(range(256)) * 8
        meta = ModelMeta(sha_of(junk_model), len(junk_model), 1, tabular.manifest.to_json())
        _chunked(attacker, topics.model_chunk, split(junk_model))
        _publish(attacker, topics.model_meta, meta.to_bytes())
        weights = [(n, np.full_like(a, 1e3)) for n, a in coordinator.global_weights]
        brick = encode_frame(Frame("global", 10**6, sha, weights, run=run))
        _chunked(attacker, topics.global_chunk, split(brick, transfer_id=b"\x01" * 16))
        _chunked(attacker, topics.global_chunk, split(mallory_key.seal("global", brick), transfer_id=b"\x02" * 16))

        expected = {UNSIGNED: 3, BAD_SIGNATURE: 1, UNKNOWN_KEY: 2, REPLAYED: 2}  # meta + bait + brick unsigned
        for board in boards:
            _wait(lambda b=board: all(b.client.rejected[r] >= n for r, n in expected.items()),
                  f"{board.config.client_id} to refuse every forgery")  # fmt: skip
            assert {r: board.client.rejected[r] for r in expected} == expected, board.client.rejected
        for board, (sent, completed, progress), held in zip(boards, before, held_global, strict=True):
            assert (board.client.updates_sent, board.client.rounds_completed) == (sent, completed), "trained"
            assert board.client.progress == progress
            assert board.client.model_sha256 == sha
            assert board.client.global_frame is held

        # The forgeries are now what the broker retains; a rebooted board still keeps the coordinator's.
        boards[0].close()
        boards[0] = Board(url, topics, tmp_path, BOARDS[0], halves[0], trust)
        rebooted = boards[0].client
        # What the broker now retains: the unsigned meta, mallory's global frame, round 1's announcement.
        _wait(lambda: all(rebooted.rejected[r] >= 1 for r in (UNSIGNED, UNKNOWN_KEY, REPLAYED)),
              "the rebooted board to refuse the retained forgeries")  # fmt: skip
        assert rebooted.model_sha256 == sha
        assert rebooted.global_frame is not None and rebooted.global_frame.round == final
        assert rebooted.updates_sent == 0
        issued = json.loads((tmp_path / BOARDS[0] / "issued.json").read_text())
        assert set(issued) == {"model_meta", "global", "round"}
    finally:
        coordinator.close()
        for board in boards:
            board.close()


def sha_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_signed_announcement_stays_within_the_payload_limit(tabular, tmp_path):
    """Room is kept for the envelope: announcing many long ids never exceeds the chunk size once sealed."""
    from edge_client.transport import InMemoryBroker, InMemoryTransport

    broker = InMemoryBroker()
    key = SigningKey.generate()
    topics = Topics("limit")
    config = CoordinatorConfig(model_path=tabular.model_path, rounds=1, round_timeout=0.5, federation="limit",
                               checkpoint_dir=tmp_path / "ckpt", max_chunk=4096, max_attempts=1,
                               poll_interval=0.01)  # fmt: skip
    strategy = FedAvg(fraction_fit=1.0, min_fit=1, min_available=1)
    coordinator = Coordinator(config, InMemoryTransport(broker, "coordinator"), strategy, signer=key)
    watcher = InMemoryTransport(broker, "watcher")
    watcher.connect()
    watcher.subscribe(topics.round)
    board = InMemoryTransport(broker, "boards")
    board.connect()
    for i in range(200):
        board.publish(topics.presence(f"{i:03d}-" + "x" * 50), b'{"status": "online", "num_examples": 5}', retain=True)
    coordinator.start()
    with pytest.raises(CoordinatorError):  # nobody answers: the round fails after its one attempt
        coordinator.run()
    coordinator.close()
    announcements = []
    while (message := watcher.receive(0)) is not None:
        if message.payload:
            announcements.append(message.payload)
    assert announcements, "the round was announced"
    for envelope in announcements:
        assert len(envelope) <= 4096
        body = key.trust_key.open("round", envelope).body
        assert len(body) > 4096 - HEADER_SIZE - 70, "the announcement used the room it had"
        assert RoundAnnouncement.from_bytes(body).selected
