"""Hostile input against a real Mosquitto: no message stops the coordinator (issue 11).

The same federation runs twice on the session's Mosquitto: a clean run (two
honest boards) and a hostile one, where an attacker connection and a
compromised board ("mallory") send what once killed or stalled the
coordinator: retained junk presence found at start, nested JSON and
5,000-digit integers as presence and update headers, 2,000 fake presences
with 64-character ids, a flapping presence, a junk chunk flood, updates
claiming more examples than their presence or 10**20, in the wrong codec or
too large. The honest boards are :class:`~tests.fakes.FakeClient` sending
fixed deltas, one after the other, so the hostile run's global model must
equal the clean run's exactly; its metrics count every refusal by reason.
"""

from __future__ import annotations

import json
import struct
import threading
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.metrics import RoundMetrics
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.strategies import FedAvg
from edge_client.chunks import split
from edge_client.frames import Frame
from edge_client.messages import Presence
from edge_client.model_file import sha256_hex
from edge_client.mqtt import MqttTransport
from edge_client.topics import Topics
from edge_client.transport import Message
from edge_client.weights import NamedArray
from tests.fakes import FakeClient

pytestmark = pytest.mark.integration

ROUNDS = 2
HONEST = ("pi-0", "pi-1")
EXAMPLES = {"pi-0": 30, "pi-1": 60}
FAKES = 2000
MAX_CLIENTS = 1000  # the 2,000 fakes overflow it; the announcement of the ~1,000 that fit stays under 96 KiB
MAX_NORM = 10.0  # honest deltas are ~0.2
ROUND_TIMEOUT = 4.0  # the hostile run waits it out: mallory and the fakes never send a valid update


class Federation:
    """One run: a coordinator thread on the broker, honest boards, and what the test adds."""

    def __init__(self, url: str, tabular, tmp_path: Path, make: Callable[..., MqttTransport], hostile: bool):
        self.url, self.tabular, self.make = url, tabular, make
        self.topics = Topics("hostile", f"test/{uuid.uuid4().hex[:12]}")
        self.tmp_path = tmp_path
        self.hostile = hostile
        self.boards = [self.board(c, EXAMPLES[c]) for c in HONEST]
        self.error: Exception | None = None
        self.thread: threading.Thread | None = None

    def board(self, client_id: str, examples: int) -> FakeClient:
        transport = self.make(self.url, client_id, connect=False, will=FakeClient.will(client_id, self.topics))
        return FakeClient(transport, client_id, num_examples=examples, topics=self.topics)

    def start(self, available: int) -> Coordinator:
        config = CoordinatorConfig(
            model_path=self.tabular.model_path,
            rounds=ROUNDS,
            round_timeout=ROUND_TIMEOUT if self.hostile else 60.0,
            federation=self.topics.federation,
            topic_prefix=self.topics.prefix,
            checkpoint_dir=self.tmp_path / "ckpt",
            seed=3,
            max_attempts=1,
            poll_interval=0.05,
            max_clients=MAX_CLIENTS,
            max_update_norm=MAX_NORM,
            max_update_bytes=64 << 10,  # per client: two of these, so a small flood exceeds its share
        )
        strategy = FedAvg(min_fit=len(HONEST), min_available=available)
        self.coordinator = Coordinator(config, self.make(self.url, "coordinator", connect=False), strategy)
        self.coordinator.start()  # subscribed once this returns: live messages from here on reach it
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self.coordinator

    def _run(self) -> None:
        try:
            self.coordinator.run()
        except Exception as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = 120.0) -> list[RoundMetrics]:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator did not finish its rounds in time"
        assert self.error is None, f"the coordinator stopped: {self.error!r}"
        return self.coordinator.history

    def honest_rounds(self, before_updates: Callable[[int], None] = lambda number: None) -> None:
        """Each round: wait for the announcement, let the test act, then each honest board sends, acked in turn."""
        for number in range(1, ROUNDS + 1):
            for board in self.boards:
                board.wait_for(lambda b=board, n=number: _announced(b, n), timeout=60)
            before_updates(number)
            for board in self.boards:
                board.send(self.update(board.id, number))
                board.wait_for(lambda b=board, n=number: any(a.round == n for a in b.acks), timeout=60)

    def update(self, client: str, number: int, **changes) -> Frame:
        seed = HONEST.index(client) * 10 + number if client in HONEST else 99
        fields = dict(kind="update", round=number, model_sha256=sha256_hex(self.tabular.tflite),
                      tensors=_delta(self.tabular, seed), client_id=client, num_examples=EXAMPLES.get(client, 10),
                      metrics={"loss": 0.5})  # fmt: skip
        return Frame(**{**fields, **changes})

    def close(self) -> None:
        self.coordinator.close()


def _announced(board: FakeClient, number: int) -> bool:
    return bool(board.rounds) and board.rounds[-1].round == number and board.id in board.rounds[-1].selected


def _delta(tabular, seed: int, scale: float = 0.01) -> list[NamedArray]:
    rng = np.random.default_rng(seed)
    return [NamedArray(s.name, (rng.normal(size=s.shape) * scale).astype(np.float32)) for s in tabular.manifest.weights]


def _raw_frame(header: bytes) -> bytes:
    """A weight frame with this header bytes as is (version 2, no tensors): the layout of docs/protocol.md."""
    body = struct.pack("<4sBI", b"LFWT", 2, len(header)) + header
    return body + struct.pack("<I", zlib.crc32(body))


def _hostile_headers(federation: Federation, number: int) -> list[bytes]:
    valid = {"kind": "update", "run": federation.coordinator.run_id, "round": number, "codec": "float32",
             "model_sha256": sha256_hex(federation.tabular.tflite), "client_id": "mallory", "num_examples": 1,
             "metrics": {}, "tensors": []}  # fmt: skip
    text = json.dumps(valid)
    deep = text.replace('"metrics": {}', '"metrics": ' + "[" * 2000 + "]" * 2000)  # ~4 KB: a RecursionError once
    huge = text.replace('"num_examples": 1', '"num_examples": ' + "9" * 5000)  # a ValueError once
    return [_raw_frame(deep.encode()), _raw_frame(huge.encode())]


def _attack(federation: Federation, attacker: MqttTransport, mallory: FakeClient) -> None:
    """Round 1 of the hostile run, once every board has its announcement: everything at once, then the honest."""
    topics = federation.topics
    for i in range(30):  # flapping faster than --presence-rate: after 12 in the minute (its last: online), ignored
        status = "offline" if i % 2 else "online"
        mallory.transport.publish(topics.presence("mallory"), Presence(status, 10).to_bytes())
    for header in _hostile_headers(federation, 1):
        for chunk in split(header, 2048):
            attacker.publish(topics.update("mallory"), chunk)
    # A flood on another client's topic: 200 transfers that never complete, 400 KB, over that client's share.
    junk = [split(n.to_bytes(4, "little") * 8000, 2048)[0] for n in range(200)]
    attacker.publish_many([Message(topics.update("flooder"), chunk) for chunk in junk + [b"not a chunk" * 10] * 5])
    run = federation.coordinator.run_id
    for frame in (
        federation.update("mallory", 1, num_examples=11, run=run),  # more than its presence (10)
        federation.update("mallory", 1, num_examples=10**20, run=run),  # within the JSON bounds, beyond the cap
        federation.update("mallory", 1, codec="float16", run=run),  # the round asked for float32
        federation.update("mallory", 1, tensors=_delta(federation.tabular, 5, scale=100.0), run=run),  # norm ~2,000
    ):
        mallory.send(frame)
    mallory.wait_for(lambda: len(mallory.acks) == 2 + 4, timeout=60)  # the two bad headers, the four updates
    assert all(a.status == "rejected" for a in mallory.acks)


def test_the_coordinator_survives_hostile_input_and_its_model_equals_a_clean_runs(
    mosquitto_broker, tabular, tmp_path, mqtt_client
):
    url = mosquitto_broker.url
    clean = Federation(url, tabular, tmp_path / "clean", mqtt_client, hostile=False)
    try:
        clean.start(available=len(HONEST))
        clean.honest_rounds()
        clean_history = clean.join()
    finally:
        clean.close()

    hostile = Federation(url, tabular, tmp_path / "hostile", mqtt_client, hostile=True)
    topics = hostile.topics
    attacker = mqtt_client(url, "attacker")
    junk_topics = [topics.presence(f"junk-{i}") for i in range(3)]
    try:
        # Retained junk presence, found by the coordinator when it (re)starts.
        deep = b'{"status": "online", "num_examples": ' + b"[" * 1500 + b"]" * 1500 + b"}"
        long_int = b'{"status": "online", "num_examples": ' + b"9" * 3000 + b"}"
        huge_int = b'{"status": "online", "num_examples": ' + b"9" * 5000 + b"}"
        for topic, junk in zip(junk_topics, (deep, long_int, huge_int), strict=True):
            attacker.publish(topic, junk, retain=True)
        mallory = hostile.board("mallory", 10)  # a compromised board: online, selected, never sends a valid update
        hostile.start(available=len(HONEST) + 1)
        fakes = [Presence("online", 10).to_bytes()] * FAKES
        attacker.publish_many([_fake(topics, i, p) for i, p in enumerate(fakes)])
        hostile.honest_rounds(lambda number: _attack(hostile, attacker, mallory) if number == 1 else None)
        history = hostile.join()
    finally:
        for topic in junk_topics:
            attacker.publish(topic, b"", retain=True)
        hostile.close()

    assert [m.round for m in history] == [m.round for m in clean_history] == [1, 2]
    for board in hostile.boards:  # every honest update was accepted, in every round
        assert sorted((a.round, a.status) for a in board.acks) == [(1, "accepted"), (2, "accepted")]
    for got, want in zip(hostile.coordinator.global_weights, clean.coordinator.global_weights, strict=True):
        np.testing.assert_array_equal(got.array, want.array)

    first = history[0]
    assert first.clients_answered == len(HONEST) and first.num_examples == sum(EXAMPLES.values())
    rejected = first.rejected_reasons
    assert rejected["too_many_examples"] == 2 and rejected["wrong_codec"] == 1 and rejected["norm_too_large"] == 1
    assert rejected["bad_header"] == 2 and rejected["bad_magic"] == 5 and rejected["too_busy"] > 100
    ignored = first.presence_ignored
    assert ignored["bad_json"] == 2 and ignored["too_large"] == 1 and ignored["rate_limited"] >= 18
    assert ignored["over_max_clients"] >= FAKES - MAX_CLIENTS
    assert first.clients_selected <= MAX_CLIENTS and first.clients_unannounced == 0
    assert history[1].clients_selected == MAX_CLIENTS  # the fakes that fit the cap, in a ~70 KB announcement


def _fake(topics: Topics, i: int, payload: bytes) -> Message:
    """Fake presence ``i``, under a distinct 64-character id."""
    return Message(topics.presence(f"{i:04d}".ljust(64, "f")), payload)
