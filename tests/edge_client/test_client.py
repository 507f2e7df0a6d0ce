"""The edge client against a fake coordinator on the in-memory broker.

The fake coordinator speaks the wire protocol with the edge_client protocol
modules only (ModelMeta, chunks, frames, RoundAnnouncement, Ack), so these
tests pin the client to docs/protocol.md rather than to the coordinator's code.
Time is a fake clock: deadlines and resend timers move only when a test says so.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest

from edge_client.broker_url import Backoff
from edge_client.chunks import split
from edge_client.client import EdgeClient, last_will
from edge_client.config import ClientConfig, DataSourceConfig
from edge_client.errors import BrokerUnavailable
from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
from edge_client.messages import ModelMeta, Presence, RoundAnnouncement
from edge_client.model_file import sha256_hex
from edge_client.topics import Topics
from edge_client.transport import InMemoryBroker, InMemoryTransport, Message
from edge_client.weights import NamedArray
from tests.fakes import CLIENT, MODEL_CHUNK, RUN, T0, FakeCoordinator
from tests.helpers import separable_binary_data

UPDATE_CHUNK = 1024
ACK_TIMEOUT = 10.0
NUM_EXAMPLES = 48


def initial_weights(tabular) -> list[NamedArray]:
    return tabular.runtime().get_weights()


def shifted(weights: list[NamedArray], by: float) -> list[NamedArray]:
    return [NamedArray(n, (a + by).astype(np.float32)) for n, a in weights]


def make_config(tmp_path, **kw) -> ClientConfig:
    defaults = dict(
        client_id=CLIENT,
        state_dir=tmp_path / "state",
        ack_timeout=ACK_TIMEOUT,
        max_resends=2,
        max_chunk=UPDATE_CHUNK,
        seed=0,
    )
    return ClientConfig(**{**defaults, **kw})


class Harness:
    """A broker, a fake coordinator, a fake clock and clients on them."""

    def __init__(self, tmp_path, tabular, clock):
        self.tmp_path = tmp_path
        self.tabular = tabular
        self.broker = InMemoryBroker()
        self.clock = clock  # conftest's FakeClock
        self.clock.now = T0
        self.coordinator = FakeCoordinator(self.broker, tabular)
        self.dataset = separable_binary_data(NUM_EXAMPLES, seed=3)
        self.clients: list[EdgeClient] = []

    def client(self, dataset="default", start: bool = True, **config_kw) -> EdgeClient:
        config = make_config(self.tmp_path, **config_kw)
        transport = InMemoryTransport(self.broker, config.client_id, will=last_will(config))
        data = self.dataset if dataset == "default" else dataset
        client = EdgeClient(config, transport, dataset=data, clock=self.clock)
        self.clients.append(client)
        if start:
            client.start()
        return client

    def pump(self, client: EdgeClient, until=None, max_steps: int = 400, max_seconds: float = 10.0) -> None:
        """Step ``client`` until ``until()`` holds, or until it has no message left (no ``until``)."""
        deadline = time.monotonic() + max_seconds
        for _ in range(max_steps):
            handled = client.step(0.0)
            self.coordinator.drain()
            if until is not None and until():
                return
            if until is None and not handled:
                return
            if time.monotonic() > deadline:
                break
        if until is not None:
            raise AssertionError(f"condition not reached within {max_steps} steps / {max_seconds} s")

    def bootstrap(self, round: int = 3, weights=None, **announce_kw) -> RoundAnnouncement:
        self.coordinator.publish_model()
        self.coordinator.publish_global(weights or initial_weights(self.tabular), round)
        return self.coordinator.announce(round, **announce_kw)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.coordinator.close()


@pytest.fixture
def h(tmp_path, tabular, clock):
    harness = Harness(tmp_path, tabular, clock)
    yield harness
    harness.close()


def decode_update(h: Harness, payload: bytes, round: int, run: str | None = None) -> Frame:
    frame = decode_frame(payload)
    validate_frame(
        frame,
        h.tabular.manifest.weights,
        h.coordinator.sha,
        "update",
        current_round=round,
        run=run or h.coordinator.run,
    )
    return frame


# -- the happy path ------------------------------------------------------------------


def test_an_announcement_older_than_the_global_weights_held_is_over_and_asks_for_nothing(h):
    h.coordinator.publish_model()
    h.coordinator.publish_global(initial_weights(h.tabular), 4)  # round 3 has closed
    client = h.client()
    h.pump(client, until=lambda: client.global_frame is not None and client.global_frame.round == 4)
    h.coordinator.announce(3)  # round 3's, replayed (a retained message after a restart), selecting this board
    h.pump(client)
    assert client.announcement is None
    assert client.updates_sent == 0 and h.coordinator.updates == []


def test_client_downloads_model_trains_and_sends_a_valid_update(h):
    client = h.client()
    assert h.broker.retained[Topics().presence(CLIENT)].payload == Presence("online", NUM_EXAMPLES, "0.1.0").to_bytes()
    start = shifted(initial_weights(h.tabular), 0.01)
    h.bootstrap(round=3, weights=start, epochs=2, lr=0.05)

    h.pump(client, until=lambda: h.coordinator.updates)
    assert client.model_sha256 == h.coordinator.sha
    assert client.global_frame is not None and client.global_frame.round == 3
    assert len(h.coordinator.updates) == 1
    assert len(h.coordinator.update_messages) > 1, "the update should travel in several chunks"
    assert all(len(m) <= UPDATE_CHUNK for m in h.coordinator.update_messages)

    frame = decode_update(h, h.coordinator.updates[0], round=3)
    assert (frame.kind, frame.round, frame.client_id, frame.codec) == ("update", 3, CLIENT, "float32")
    assert frame.model_sha256 == h.coordinator.sha
    assert frame.num_examples == NUM_EXAMPLES
    assert set(frame.metrics) == {"loss", "accuracy", "train_seconds"}
    assert frame.metrics["train_seconds"] > 0
    assert all(np.isfinite(v) for v in frame.metrics.values()) and 0 <= frame.metrics["accuracy"] <= 1
    # delta = trained - global: the global weights plus the delta are the client's trained weights.
    trained = client.model.get_weights()
    for (name, delta), (_, g), (_, w) in zip(frame.tensors, start, trained, strict=True):
        assert delta.dtype == np.float32 and np.isfinite(delta).all()
        np.testing.assert_allclose(g + delta, w, rtol=0, atol=1e-6, err_msg=name)
    assert any(np.abs(d).max() > 1e-4 for _, d in frame.tensors), "training changed nothing"

    # The state directory holds the model, the global frame and the pending update.
    state = h.tmp_path / "state"
    assert sha256_hex((state / "model.tflite").read_bytes()) == h.coordinator.sha
    assert (state / "global.bin").is_file() and (state / "pending.bin").read_bytes() == h.coordinator.updates[0]
    assert client.progress.trained_round == 3 and client.progress.pending is not None

    h.coordinator.ack(3, "accepted")
    h.pump(client, until=lambda: client.progress.acked_round == 3)
    assert client.progress.pending is None and not (state / "pending.bin").exists()
    assert client.rounds_completed == 1
    assert sum(client.rejected.values()) == 0


def test_update_with_float16_codec(h):
    client = h.client()
    h.bootstrap(round=0, codec="float16")
    h.pump(client, until=lambda: h.coordinator.updates)
    frame = decode_update(h, h.coordinator.updates[0], round=0)
    assert frame.codec == "float16"


def test_data_from_the_config_file(h, tmp_path):
    x, y = separable_binary_data(40, seed=4)
    np.savez(tmp_path / "part.npz", features=x, labels=y[:, 0])
    source = DataSourceConfig("npz", tmp_path / "part.npz", x_key="features", y_key="labels")
    client = h.client(dataset=None, data=source)
    h.bootstrap(round=1)
    h.pump(client, until=lambda: h.coordinator.updates)
    assert decode_update(h, h.coordinator.updates[0], round=1).num_examples == 40
    assert h.coordinator.presence[CLIENT] == Presence("online", 40, "0.1.0")


def test_chunks_before_meta_and_global_before_model(h):
    """Retained messages may come in any order; nothing is downloaded twice."""
    client = h.client()
    h.coordinator.publish_global(initial_weights(h.tabular), 2)
    h.coordinator.publish_model_chunks()
    h.coordinator.announce(2)
    h.pump(client)
    assert client.model is None and not h.coordinator.updates
    h.coordinator.publish_meta()
    h.pump(client, until=lambda: h.coordinator.updates)
    assert client.global_frame.round == 2
    decode_update(h, h.coordinator.updates[0], round=2)


# -- when not to train -------------------------------------------------------------


def test_not_selected_sends_nothing(h):
    client = h.client()
    h.bootstrap(round=3, selected=("pi-2", "pi-3"))
    h.pump(client)
    assert client.model is not None and client.global_frame.round == 3
    assert h.coordinator.update_messages == []
    assert client.progress.trained_round is None


def test_passed_deadline_sends_nothing(h):
    client = h.client()
    h.clock.now = T0 + 1000
    h.bootstrap(round=3, deadline=T0 + 100)
    h.pump(client)
    assert h.coordinator.update_messages == []
    assert client.progress.trained_round is None


def test_waits_for_the_global_weights_of_the_announced_round(h):
    client = h.client()
    h.coordinator.publish_model()
    weights = initial_weights(h.tabular)
    h.coordinator.publish_global(weights, 3)
    h.coordinator.announce(4)
    h.pump(client)
    assert h.coordinator.update_messages == [] and client.global_frame.round == 3
    h.coordinator.publish_global(shifted(weights, 0.02), 4)
    h.pump(client, until=lambda: h.coordinator.updates)
    assert decode_update(h, h.coordinator.updates[0], round=4).round == 4
    # An older global frame never replaces a newer one.
    h.coordinator.publish_global(weights, 2)
    h.pump(client)
    assert client.global_frame.round == 4


def test_training_past_the_deadline_is_not_sent(h, caplog):
    client = h.client()
    h.coordinator.publish_model()
    h.pump(client, until=lambda: client.model is not None)
    fit = client.model.fit

    def slow_fit(*args, **kwargs):
        h.clock.now += 60  # each epoch "takes" a minute
        return fit(*args, **kwargs)

    client.model.fit = slow_fit
    h.coordinator.publish_global(initial_weights(h.tabular), 5)
    h.coordinator.announce(5, deadline=T0 + 90, epochs=3)
    with caplog.at_level(logging.INFO, logger="edge_client"):
        h.pump(client)
    assert h.coordinator.update_messages == []
    assert "too slow for round 5" in caplog.text
    # No update was sent, so the round is not "trained": a retry of round 5 may still get one.
    assert client.progress.trained_round is None and client.rounds_completed == 1


# -- acks and resends --------------------------------------------------------------


def _sends(h: Harness, chunks_per_send: int) -> list[bytes]:
    messages = h.coordinator.update_messages
    assert len(messages) % chunks_per_send == 0
    return [b"".join(messages[i : i + chunks_per_send]) for i in range(0, len(messages), chunks_per_send)]


def test_without_ack_it_resends_identical_bytes_then_gives_up(h):
    client = h.client(max_resends=2)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    h.pump(client)
    assert len(h.coordinator.update_messages) == per_send, "resent before ack_timeout"

    for expected_sends in (2, 3, 3, 3, 3):
        h.clock.now += ACK_TIMEOUT
        h.pump(client)
        assert len(_sends(h, per_send)) == expected_sends
    sends = _sends(h, per_send)
    assert all(s == sends[0] for s in sends), "a resend must repeat the same bytes"
    assert client.updates_sent == 3 and client.rounds_completed == 1
    assert len(h.coordinator.updates) == 3 and len(set(h.coordinator.updates)) == 1


def test_resends_stop_at_the_deadline(h):
    client = h.client(max_resends=100)
    h.bootstrap(round=3, deadline=T0 + 25)
    h.pump(client, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    for _ in range(10):
        h.clock.now += ACK_TIMEOUT
        h.pump(client)
    assert len(_sends(h, per_send)) == 3  # at T0, T0+10, T0+20; the deadline T0+25 ends it


@pytest.mark.parametrize("status", ["accepted", "duplicate"])
def test_an_ack_stops_the_resends(h, status):
    client = h.client(max_resends=5)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    h.clock.now += ACK_TIMEOUT
    h.pump(client)
    assert len(_sends(h, per_send)) == 2
    h.coordinator.ack(3, status)
    h.pump(client, until=lambda: client.progress.acked_round == 3)
    for _ in range(5):
        h.clock.now += ACK_TIMEOUT
        h.pump(client)
    assert len(_sends(h, per_send)) == 2
    assert client.progress.pending is None and client.rounds_completed == 1


def test_asked_again_after_an_ack_it_resends_without_retraining(h):
    """A coordinator restarted mid-round lost the acknowledged update and selects the client again."""
    client = h.client(max_resends=5)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    h.coordinator.ack(3, "accepted")
    h.pump(client, until=lambda: client.progress.acked_round == 3)
    h.coordinator.announce(3, deadline=T0 + 2000)  # same round, new announcement
    h.pump(client, until=lambda: len(h.coordinator.update_messages) == 2 * per_send)
    first, again = _sends(h, per_send)
    assert first == again, "the lost update is sent again as it was, not retrained"
    h.coordinator.announce(3, selected=("someone-else",), deadline=T0 + 3000)
    h.pump(client)
    assert len(_sends(h, per_send)) == 2, "not asked, nothing sent"


def test_a_rejection_is_logged_and_ends_the_round(h, caplog):
    client = h.client(max_resends=5)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    with caplog.at_level(logging.WARNING, logger="edge_client"):
        h.coordinator.ack(2, "accepted")  # for another round: ignored
        h.coordinator.ack(3, "rejected", "bad_tensors")
        h.pump(client, until=lambda: client.progress.pending is None)
    assert "bad_tensors" in caplog.text
    for _ in range(5):
        h.clock.now += ACK_TIMEOUT
        h.pump(client)
    assert len(_sends(h, per_send)) == 1
    assert client.progress.acked_round is None and client.progress.trained_round == 3


def test_a_newer_round_abandons_the_old_update(h):
    client = h.client(max_resends=5)
    weights = initial_weights(h.tabular)
    h.bootstrap(round=3, weights=weights, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    h.coordinator.publish_global(shifted(weights, 0.05), 4)
    h.coordinator.announce(4, deadline=T0 + 1000)
    h.pump(client, until=lambda: len(h.coordinator.updates) == 2)
    assert decode_update(h, h.coordinator.updates[1], round=4).round == 4
    before = len(h.coordinator.update_messages)
    h.coordinator.ack(4, "accepted")
    for _ in range(4):
        h.clock.now += ACK_TIMEOUT
        h.pump(client)
    assert len(h.coordinator.update_messages) == before, "round 3 must not be resent"
    assert client.progress.acked_round == 4


# -- malformed input ----------------------------------------------------------------


def _chunk_of(payload: bytes) -> bytes:
    (chunk,) = split(payload, 1 << 20)
    return chunk


def test_malformed_messages_are_counted_and_ignored(h):
    client = h.client()
    topics, coordinator = Topics(), h.coordinator
    weights = initial_weights(h.tabular)
    sha = coordinator.sha

    def global_chunk(frame: Frame) -> bytes:
        return _chunk_of(encode_frame(frame))

    bad = [
        (topics.model_meta, b"{not json", "bad_json"),
        (topics.model_meta, ModelMeta("ab" * 32, 10, 1, {"format": "nope"}).to_bytes(), "bad_json"),
        (topics.model_chunk(0), b"LFCK", "truncated"),
        (topics.model_chunk(0), b"XXXX" + bytes(60), "bad_magic"),
        (topics.model_chunk(0), _chunk_of(b"model")[:-1] + b"?", "bad_checksum"),
        (topics.global_chunk(0), _chunk_of(b"not a frame at all"), "bad_magic"),
        (topics.global_chunk(0), global_chunk(Frame("update", 3, sha, weights, run=RUN)), "wrong_kind"),
        (topics.global_chunk(0), global_chunk(Frame("global", 3, sha, weights[:1], run=RUN)), "bad_tensors"),
        (
            topics.global_chunk(0),
            global_chunk(Frame("global", 3, sha, shifted(weights, np.nan), run=RUN)),
            "bad_tensors",
        ),
        (
            topics.global_chunk(0),
            global_chunk(Frame("global", 3, "ef" * 32, weights[:1], run=RUN)),
            None,
        ),  # another model's
        (topics.round, b"[]", "bad_json"),
        (
            topics.round,
            RoundAnnouncement(3, (CLIENT,), T0 + 100, sha, codec="zstd", run=RUN).to_bytes(),
            "unknown_codec",
        ),
        (topics.round, RoundAnnouncement(3, (CLIENT,), T0 + 100, "not-a-hash", run=RUN).to_bytes(), "bad_sha256"),
        (topics.round, RoundAnnouncement(3, (CLIENT,), T0 + 100, sha.upper(), run=RUN).to_bytes(), "bad_sha256"),
        (topics.model_meta, ModelMeta("AB" * 32, 10, 1, coordinator.manifest.to_json()).to_bytes(), "bad_sha256"),
        (topics.round, RoundAnnouncement(3, (CLIENT,), T0 + 100, sha, run="../../x").to_bytes(), "bad_json"),
        (topics.ack(CLIENT), b'{"round": 3, "status": "maybe", "reason": "", "run": "1111111111111111"}', "bad_json"),
        (topics.ack(CLIENT), b'{"round": 3, "status": "accepted", "reason": ""}', "bad_json"),  # protocol v1
        (topics.ack(CLIENT), b"\xff\xfe", "bad_json"),
    ]
    coordinator.publish_model()
    h.pump(client, until=lambda: client.model is not None)
    for topic, payload, _ in bad:
        coordinator.publish(topic, payload)
    h.pump(client)
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    assert dict(client.rejected) == expected
    assert client.global_frame is None and client.announcement is None

    # Still fully working afterwards.
    coordinator.publish_global(weights, 3)
    coordinator.announce(3)
    h.pump(client, until=lambda: coordinator.updates)
    decode_update(h, coordinator.updates[0], round=3)


def test_a_model_that_does_not_match_its_meta_is_not_loaded(h):
    client = h.client()
    coordinator = h.coordinator
    coordinator.publish(
        Topics().model_meta,
        ModelMeta("cd" * 32, len(coordinator.model), 1, coordinator.manifest.to_json()).to_bytes(),
        retain=True,
    )
    h.pump(client)
    assert client.rejected == {"manifest_mismatch": 1}  # the manifest names another model
    coordinator.publish_model_chunks()
    h.pump(client)
    assert client.model is None  # complete, but no meta announced it


def test_a_model_whose_size_differs_from_its_meta_is_not_loaded(h):
    client = h.client()
    coordinator = h.coordinator
    count = len(split(coordinator.model, MODEL_CHUNK))
    meta = ModelMeta(coordinator.sha, len(coordinator.model) + 1, count, coordinator.manifest.to_json())
    coordinator.publish(Topics().model_meta, meta.to_bytes(), retain=True)
    coordinator.publish_model_chunks()
    h.pump(client)
    assert client.rejected == {"size_mismatch": 1} and client.model is None


def test_empty_retained_payloads_are_not_errors(h):
    client = h.client()
    h.bootstrap(round=3)
    h.pump(client, until=lambda: h.coordinator.updates)
    for topic in (Topics().model_chunk(9), Topics().global_chunk(9), Topics().round):
        h.coordinator.publish(topic, b"", retain=True)
    h.pump(client)
    assert sum(client.rejected.values()) == 0


# -- restarts ------------------------------------------------------------------------


def test_restart_resumes_without_retraining_or_downloading(h, caplog):
    first = h.client()
    h.bootstrap(round=3)
    h.pump(first, until=lambda: h.coordinator.updates)
    h.coordinator.ack(3, "accepted")
    h.pump(first, until=lambda: first.progress.acked_round == 3)
    first.transport.drop()  # power loss: the Last Will marks the board offline
    h.coordinator.drain()
    assert h.coordinator.presence[CLIENT].status == "offline"
    sent = len(h.coordinator.update_messages)

    with caplog.at_level(logging.INFO, logger="edge_client"):
        second = h.client()
        model = second.model
        assert model is not None and second.model_sha256 == h.coordinator.sha
        assert second.global_frame.round == 3
        assert second.progress.acked_round == 3 and second.progress.trained_round == 3
        h.pump(second)  # every retained message is replayed
    assert second.model is model, "the model was downloaded again"
    assert "loaded model" not in caplog.text and "global weights of round 3 received" not in caplog.text
    assert len(h.coordinator.update_messages) == sent, "an acknowledged round was trained again"
    assert h.coordinator.presence[CLIENT].status == "online"
    assert sum(second.rejected.values()) == 0


def test_restart_resends_the_pending_update_while_its_round_is_open(h):
    first = h.client(max_resends=5)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(first, until=lambda: h.coordinator.updates)
    original = h.coordinator.updates[0]
    per_send = len(h.coordinator.update_messages)
    first.transport.drop()

    h.clock.now += 5
    second = h.client(max_resends=5)
    assert second.progress.pending is not None
    h.pump(second, until=lambda: len(h.coordinator.update_messages) == 2 * per_send)
    sends = _sends(h, per_send)
    assert sends[1] == sends[0] and b"".join(split(original, UPDATE_CHUNK)) == sends[1]
    assert second.updates_sent == 1 and second.progress.trained_round == 3
    h.coordinator.ack(3, "duplicate")
    h.pump(second, until=lambda: second.progress.pending is None)
    assert second.progress.acked_round == 3


def test_an_acknowledged_update_survives_a_reboot_until_its_round_closes(h):
    """A coordinator restarted mid-round lost the update it had accepted, and the board rebooted meanwhile."""
    first = h.client(max_resends=5)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(first, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    h.coordinator.ack(3, "accepted")
    h.pump(first, until=lambda: first.progress.acked_round == 3)
    state = h.tmp_path / "state"
    assert first.progress.pending is None and first.progress.answered is not None
    assert (state / "answered.bin").read_bytes() == h.coordinator.updates[0]
    first.transport.drop()

    second = h.client(max_resends=5)
    h.pump(second)  # the announcement it answered, replayed: nothing new is asked
    assert len(h.coordinator.update_messages) == per_send
    h.coordinator.announce(3, deadline=T0 + 2000)  # the restarted coordinator asks again
    h.pump(second, until=lambda: len(h.coordinator.update_messages) == 2 * per_send)
    first_send, resend = _sends(h, per_send)
    assert resend == first_send and second.progress.trained_round == 3, "the same bytes, not retrained"
    h.coordinator.ack(3, "duplicate")
    h.pump(second, until=lambda: second.rounds_completed == 1)
    assert second.progress.answered is not None and (state / "answered.bin").is_file()
    h.coordinator.publish_global(initial_weights(h.tabular), 4)  # round 3 has closed
    h.pump(second, until=lambda: second.progress.answered is None)
    assert not (state / "answered.bin").exists() and not (state / "pending.bin").exists()
    h.coordinator.announce(3, deadline=T0 + 3000)
    h.pump(second)
    assert len(h.coordinator.update_messages) == 2 * per_send


def test_an_announcement_of_a_later_round_drops_the_acknowledged_update(h):
    client = h.client()
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    h.coordinator.ack(3, "accepted")
    h.pump(client, until=lambda: client.progress.answered is not None)
    h.coordinator.announce(4, selected=("someone-else",), deadline=T0 + 2000)
    h.pump(client, until=lambda: client.progress.answered is None)
    assert not (h.tmp_path / "state" / "answered.bin").exists()
    assert h.client().progress.answered is None, "durably"


def test_restart_after_the_round_closed_sends_nothing(h):
    first = h.client()
    h.bootstrap(round=3, deadline=T0 + 50)
    h.pump(first, until=lambda: h.coordinator.updates)
    first.transport.drop()
    sent = len(h.coordinator.update_messages)
    h.clock.now = T0 + 60
    second = h.client()
    h.pump(second)
    assert len(h.coordinator.update_messages) == sent


def test_a_damaged_state_directory_is_ignored(h):
    first = h.client()
    h.bootstrap(round=3)
    h.pump(first, until=lambda: h.coordinator.updates)
    first.transport.drop()
    state = h.tmp_path / "state"
    model = state / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])  # a write cut short by a power loss
    (state / "global.bin").write_bytes(b"LFWT")
    second = h.client()
    assert second.model is None and second.global_frame is None
    h.pump(second, until=lambda: second.global_frame is not None)
    assert second.model_sha256 == h.coordinator.sha
    assert sha256_hex(model.read_bytes()) == h.coordinator.sha


# -- presence and lifecycle --------------------------------------------------------------


def test_presence_online_then_offline_on_close(h):
    client = h.client()
    h.coordinator.drain()
    assert h.coordinator.presence[CLIENT] == Presence("online", NUM_EXAMPLES, "0.1.0")
    client.close()
    client.close()  # idempotent
    h.coordinator.drain()
    assert h.coordinator.presence[CLIENT].status == "offline"
    assert Presence.from_bytes(h.broker.retained[Topics().presence(CLIENT)].payload).status == "offline"


def test_presence_is_published_again_after_a_reconnection(h):
    client = h.client()
    client.transport.drop()
    h.coordinator.drain()
    assert h.coordinator.presence[CLIENT].status == "offline"
    client.step(0)
    client.transport.connect()
    client.step(0)
    h.coordinator.drain()
    assert h.coordinator.presence[CLIENT].status == "online"


def test_presence_comes_back_with_every_connection_without_the_loop(h):
    """A board busy training runs no step(): its transport says online (the birth message) by itself."""
    client = h.client()
    topic = Topics().presence(CLIENT)
    h.broker.restart(persistent=False)  # Mosquitto without persistence: every retained message is gone
    assert client.transport.reconnections == 1
    assert h.broker.retained[topic].payload == Presence("online", NUM_EXAMPLES, "0.1.0").to_bytes()
    client.transport.drop()  # the Last Will says offline...
    assert Presence.from_bytes(h.broker.retained[topic].payload).status == "offline"
    client.transport.connect()  # ... until the connection is back
    assert Presence.from_bytes(h.broker.retained[topic].payload).status == "online"
    client.close()
    assert client.transport.birth is None, "a closed client is never announced online again"


def test_a_board_that_boots_while_the_broker_is_down_waits_for_it(h, caplog):
    import threading

    config = make_config(h.tmp_path)
    transport = InMemoryTransport(h.broker, config.client_id, will=last_will(config))
    client = EdgeClient(config, transport, h.dataset, h.clock, backoff=Backoff(initial=0.01, maximum=0.05))
    h.clients.append(client)
    h.broker.stop()
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="edge_client"):
        booting = threading.Thread(target=client.start, args=(stop,), daemon=True)
        booting.start()
        deadline = time.monotonic() + 10
        while "retrying" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert booting.is_alive() and not client.transport.connected
        h.broker.start()
        booting.join(10)
    assert not booting.is_alive() and client.transport.connected
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(lines) == 1 and "down" in lines[0], "logged once (then once a minute), saying why"
    assert Presence.from_bytes(h.broker.retained[Topics().presence(CLIENT)].payload).status == "online"
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)  # and it takes part as any board


def test_a_board_stopped_while_waiting_for_the_broker_does_not_start(h):
    import threading

    h.broker.stop()
    client = h.client(start=False)
    stop = threading.Event()
    stop.set()
    assert client.run(stop) == 0 and not client.transport.connected
    with pytest.raises(BrokerUnavailable):  # without a stop event one attempt is made, as before
        client.start()


def test_run_stops_after_max_rounds(h):
    import threading

    client = h.client(start=False)
    h.bootstrap(round=3)
    stop = threading.Event()
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(client.run(stop, max_rounds=1)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not h.coordinator.updates and time.monotonic() < deadline:
        h.coordinator.drain()
        time.sleep(0.01)
    h.coordinator.ack(3, "accepted")
    worker.join(10)
    stop.set()
    assert not worker.is_alive() and result == [1]


def test_run_returns_when_stopped(h):
    import threading

    client = h.client()
    stop = threading.Event()
    stop.set()
    assert client.run(stop) == 0


def test_last_will_is_retained_offline_presence(tmp_path):
    config = make_config(tmp_path, federation="farm", topic_prefix="acme")
    will = last_will(config)
    assert will == Message("acme/farm/presence/pi-1", will.payload, retain=True)
    assert Presence.from_bytes(will.payload).status == "offline"


def test_step_before_start_is_an_error(h):
    client = h.client(start=False)
    with pytest.raises(RuntimeError):
        client.step(0)


def test_data_that_does_not_fit_the_model_means_no_training(h, caplog):
    x = np.zeros((10, 5), np.float32)  # the model takes 8 features
    client = h.client(dataset=(x, np.zeros(10, np.float32)))
    with caplog.at_level(logging.ERROR, logger="edge_client"):
        h.bootstrap(round=3)
        h.pump(client)
    assert h.coordinator.update_messages == []
    assert "does not fit" in caplog.text
    assert h.coordinator.presence[CLIENT].num_examples == 0


def test_dataclass_config_is_frozen(tmp_path):
    config = make_config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.client_id = "x"  # type: ignore[misc]


IMPORTS_WITHOUT_TENSORFLOW = """
import json
import sys

import edge_client.cli
import edge_client.client
import edge_client.config
import edge_client.state

prefixes = ("tensorflow", "keras", "tf_keras", "converter", "coordinator", "paho")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in prefixes)))
"""


def test_the_client_imports_no_tensorflow_converter_coordinator_or_paho(run_without_tensorflow):
    """paho comes in only through edge_client.mqtt, which cli.make_transport imports when it runs."""
    from tests.helpers import json_output

    assert json_output(run_without_tensorflow(IMPORTS_WITHOUT_TENSORFLOW)) == []


# -- error feedback ------------------------------------------------------------------


def test_a_lossy_codec_keeps_what_it_dropped_for_the_next_round(h):
    client = h.client()
    start = initial_weights(h.tabular)
    h.bootstrap(round=3, weights=start, codec="topk:0.1", epochs=2, lr=0.05)
    h.pump(client, until=lambda: h.coordinator.updates)
    frame = decode_update(h, h.coordinator.updates[0], round=3)
    trained = client.model.get_weights()
    residuals = h.tmp_path / "state" / "residuals.npz"
    assert residuals.is_file()
    dropped = 0
    for (name, sent), (_, g), (_, w) in zip(frame.tensors, start, trained, strict=True):
        residual = client.rounds.feedback.residual(name)
        # What was sent plus what was kept back is the whole delta of this first round.
        np.testing.assert_allclose(sent + residual, w - g, rtol=0, atol=1e-6, err_msg=name)
        dropped += int(np.count_nonzero(residual))
    assert dropped > 0, "top-10% should have held some of the delta back"

    h.coordinator.ack(3, "accepted")
    h.pump(client, until=lambda: client.progress.acked_round == 3)
    kept = {name: client.rounds.feedback.residual(name) for name, _ in start}
    client.transport.drop()
    second = h.client()  # after a reboot the residuals come back from the state directory
    for name, residual in kept.items():
        np.testing.assert_array_equal(second.rounds.feedback.residual(name), residual)


def test_float32_updates_need_no_residuals(h):
    client = h.client()
    h.bootstrap(round=1)
    h.pump(client, until=lambda: h.coordinator.updates)
    assert not (h.tmp_path / "state" / "residuals.npz").exists()


# -- runs ------------------------------------------------------------------------------
NEW_RUN = "2222222222222222"


def _ignored_lines(caplog, reason: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().endswith(f"({reason})")]


def test_a_new_run_is_joined_cleanly_and_durably(h, caplog):
    """The reported bug: a second run with the same model got no update for rounds 'already trained'."""
    client = h.client()
    h.bootstrap(round=3, codec="topk:0.1")
    h.pump(client, until=lambda: h.coordinator.updates)
    h.coordinator.ack(3, "accepted")
    h.pump(client, until=lambda: client.progress.acked_round == 3)
    assert (h.tmp_path / "state" / "residuals.npz").is_file()

    h.coordinator.run = NEW_RUN  # a second coordinator run: numbering starts again at round 1
    with caplog.at_level(logging.INFO, logger="edge_client"):
        h.coordinator.publish_global(shifted(initial_weights(h.tabular), 0.01), 1)
        h.pump(client, until=lambda: client.progress.run == NEW_RUN)
        # Joining dropped the old run's trained rounds and its residuals, on disk too.
        assert client.progress.trained_round is None and client.progress.acked_round is None
        assert not (h.tmp_path / "state" / "residuals.npz").exists()
        assert all(not np.any(client.rounds.feedback.residual(n)) for n, _ in initial_weights(h.tabular))
        h.coordinator.announce(1)
        h.pump(client, until=lambda: len(h.coordinator.updates) == 2)
    assert f"joining run {NEW_RUN}" in caplog.text and f"leaving run {RUN}" in caplog.text
    frame = decode_update(h, h.coordinator.updates[1], round=1, run=NEW_RUN)
    assert frame.round == 1 and client.progress.trained_round == 1
    h.coordinator.ack(1, "accepted")
    h.pump(client, until=lambda: client.progress.acked_round == 1)
    assert client.rounds_completed == 2  # round 1 of the new run is not round 1 of any other
    client.transport.drop()
    again = h.client()  # the run it follows survives a reboot
    assert again.progress.run == NEW_RUN and again.progress.trained_round == 1


def test_a_new_run_drops_the_old_runs_pending_update(h):
    client = h.client(max_resends=5)
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    per_send = len(h.coordinator.update_messages)
    assert (h.tmp_path / "state" / "pending.bin").is_file()
    h.coordinator.run = NEW_RUN
    h.coordinator.publish_global(initial_weights(h.tabular), 1)
    h.pump(client, until=lambda: client.progress.run == NEW_RUN)
    assert client.progress.pending is None and not (h.tmp_path / "state" / "pending.bin").exists()
    for _ in range(4):
        h.clock.now += ACK_TIMEOUT
        h.pump(client)
    assert len(h.coordinator.update_messages) == per_send, "the old run's update must not be resent"
    # The old run's coordinator may still answer it: that ack is ignored, not taken for the new run.
    h.coordinator.announce(1, deadline=T0 + 2000)
    h.pump(client, until=lambda: len(h.coordinator.updates) == 2)
    h.coordinator.ack(1, "accepted", run=RUN)
    h.pump(client)
    assert client.progress.pending is not None and client.progress.acked_round is None
    h.coordinator.ack(1, "accepted")
    h.pump(client, until=lambda: client.progress.acked_round == 1)


def test_a_stale_announcement_of_another_run_never_replaces_the_current_run(h, caplog):
    """A closed round of an older run (an old retained message) arriving late changes nothing."""
    client = h.client()
    h.coordinator.run = NEW_RUN
    h.bootstrap(round=1, deadline=T0 + 1000)
    h.pump(client, until=lambda: h.coordinator.updates)
    h.clock.now = T0 + 500
    with caplog.at_level(logging.INFO, logger="edge_client"):
        for _ in range(3):  # re-delivered, as a retained message is after every reconnection
            h.coordinator.announce(7, deadline=T0 + 400, run=RUN)
            h.pump(client)
    assert client.progress.run == NEW_RUN and client.progress.trained_round == 1
    assert client.progress.pending is not None and client.announcement.run == NEW_RUN
    (line,) = _ignored_lines(caplog, "stale_run")  # logged once, with the reason
    assert "round 7" in line and RUN in line and NEW_RUN in line
    assert len(set(h.coordinator.updates)) == 1, "only resends of the current run's update"


def test_an_already_trained_round_is_logged_once(h, caplog):
    first = h.client()
    h.bootstrap(round=3, deadline=T0 + 1000)
    h.pump(first, until=lambda: h.coordinator.updates)
    h.coordinator.ack(3, "accepted")
    h.pump(first, until=lambda: first.progress.acked_round == 3)
    first.transport.drop()
    # The acknowledged update survives a reboot (answered.bin); here the SD card lost it as well.
    (h.tmp_path / "state" / "answered.bin").unlink()
    with caplog.at_level(logging.INFO, logger="edge_client"):
        second = h.client()
        for deadline in (T0 + 2000, T0 + 3000):  # asked again, twice
            h.coordinator.announce(3, deadline=deadline)
            h.pump(second)
    (line,) = _ignored_lines(caplog, "already_trained")
    assert "round 3" in line
    assert len(h.coordinator.updates) == 1


def test_a_diverged_round_is_not_marked_trained_and_a_retry_trains_again(h, caplog):
    client = h.client()
    h.coordinator.publish_model()
    h.pump(client, until=lambda: client.model is not None)
    fit = client.model.fit

    def diverging_fit(*args, **kwargs):
        return dataclasses.replace(fit(*args, **kwargs), loss=float("nan"))

    client.model.fit = diverging_fit
    h.coordinator.publish_global(initial_weights(h.tabular), 2)
    h.coordinator.announce(2, deadline=T0 + 100)
    with caplog.at_level(logging.ERROR, logger="edge_client"):
        h.pump(client)
        h.pump(client)
    assert caplog.text.count("training diverged") == 1, "the same announcement must not train again"
    assert h.coordinator.update_messages == [] and client.progress.trained_round is None
    assert client.rounds_completed == 1

    client.model.fit = fit  # the retry (same round, new deadline) succeeds
    h.coordinator.announce(2, deadline=T0 + 200)
    h.pump(client, until=lambda: h.coordinator.updates)
    assert decode_update(h, h.coordinator.updates[0], round=2).round == 2
    assert client.progress.trained_round == 2
