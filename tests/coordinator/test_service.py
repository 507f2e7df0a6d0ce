"""The coordinator service over the in-memory broker, with scripted clients.

The fake clients send hand-made deltas, so every new global model can be
checked exactly against a NumPy FedAvg reference.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.checkpoint import load_checkpoint
from coordinator.errors import CoordinatorError
from coordinator.metrics import read_jsonl
from coordinator.presence import Presences
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.strategies import FedAvg, RoundConfig
from edge_client.chunks import Reassembler, split
from edge_client.frames import Frame, decode_frame, encode_frame
from edge_client.messages import UNNAMED_RUN, Ack, ModelMeta, Presence, RoundAnnouncement, is_run_id
from edge_client.model_file import sha256_hex
from edge_client.transport import InMemoryBroker, InMemoryTransport
from edge_client.weights import NamedArray
from tests.fakes import SMALL_CHUNK, TOPICS, FakeClient


@pytest.fixture()
def model_path(tabular) -> Path:
    return tabular.model_path


def _specs(tabular):
    return tabular.manifest.weights


def _delta(tabular, seed: int, scale: float = 0.01) -> list[NamedArray]:
    rng = np.random.default_rng(seed)
    return [NamedArray(s.name, (rng.normal(size=s.shape) * scale).astype(np.float32)) for s in _specs(tabular)]


def _update(tabular, client: str, round_: int, delta, n: int, **changes) -> Frame:
    fields = dict(
        kind="update",
        round=round_,
        model_sha256=sha256_hex(tabular.tflite),
        tensors=delta,
        client_id=client,
        num_examples=n,
        metrics={"loss": 0.5, "accuracy": 0.75, "train_seconds": n / 100},
    )
    fields.update(changes)
    return Frame(**fields)


class Running:
    """A coordinator running in a background thread."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator, self.stop, self.error = coordinator, threading.Event(), None
        coordinator.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.coordinator.run(self.stop)
        except Exception as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = 20.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "coordinator did not finish in time"
        return self.error


def _coordinator(broker, model_path, tmp_path, strategy=None, **config) -> Coordinator:
    cfg = CoordinatorConfig(
        model_path=model_path,
        federation="test",
        checkpoint_dir=tmp_path / "ckpt",
        metrics_path=tmp_path / "metrics.jsonl",
        max_chunk=SMALL_CHUNK,
        poll_interval=0.02,
        **{"rounds": 1, "round_timeout": 5.0, **config},
    )
    strategy = strategy or FedAvg(min_fit=3, min_available=3, round_config=RoundConfig(epochs=2, lr=0.05))
    return Coordinator(cfg, InMemoryTransport(broker, "coordinator"), strategy)


def test_model_and_global_weights_are_retained_for_late_boards(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    coordinator = _coordinator(broker, model_path, tmp_path)
    coordinator.start()
    coordinator.publish_global()  # the global weights of round 1
    late = InMemoryTransport(broker, "late-board")
    late.connect()
    for pattern in (TOPICS.model_meta, TOPICS.model_chunks, TOPICS.global_chunks):
        late.subscribe(pattern)
    received, reassembler, meta = {}, Reassembler(), None
    while (message := late.receive(timeout=0.2)) is not None:
        if message.topic == TOPICS.model_meta:
            meta = ModelMeta.from_bytes(message.payload)
        elif (payload := reassembler.add(message.payload, message.topic.split("/chunk/")[0])) is not None:
            received[message.topic.split("/")[2]] = payload
    assert meta is not None and meta.model_sha256 == sha256_hex(tabular.tflite) and meta.chunks > 1
    assert received["model"] == tabular.tflite
    frame = decode_frame(received["global"])
    assert frame.kind == "global" and frame.round == 1
    for got, initial in zip(frame.tensors, tabular.runtime().get_weights(), strict=True):
        np.testing.assert_array_equal(got.array, initial.array)


def test_a_round_is_weighted_fedavg_of_the_deltas(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    clients = [FakeClient(broker, f"pi-{i}") for i in range(3)]
    running = Running(_coordinator(broker, model_path, tmp_path))
    initial = running.coordinator.global_weights
    counts = [10, 30, 60]
    deltas = [_delta(tabular, seed) for seed in range(3)]
    for client in clients:
        client.wait_for(lambda c=client: c.rounds and c.globals.get(1))
        assert client.rounds[-1].selected == ("pi-0", "pi-1", "pi-2")
        # Global frame and announcement name the run; the update must echo it (FakeClient.send).
        assert client.rounds[-1].run == client.globals[1].run == running.coordinator.run_id
        assert (client.rounds[-1].epochs, client.rounds[-1].lr) == (2, 0.05)
    for client, delta, n in zip(clients, deltas, counts, strict=True):
        client.send(_update(tabular, client.id, 1, delta, n))
    assert running.join() is None
    for client in clients:
        client.wait_for(lambda c=client: c.acks)
        assert client.acks == [Ack(1, "accepted", run=running.coordinator.run_id)]
    expected = [
        i.array + sum(n * d[k].array.astype(np.float64) for d, n in zip(deltas, counts, strict=True)) / sum(counts)
        for k, i in enumerate(initial)
    ]
    got = running.coordinator.global_weights
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.array, e, rtol=1e-6, atol=1e-7)
    (line,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert line["round"] == 1 and line["clients_selected"] == 3 and line["clients_answered"] == 3
    assert line["num_examples"] == 100 and line["train_loss"] == pytest.approx(0.5)
    assert line["bytes_in"] > sum(len(encode_frame(_update(tabular, "x", 1, d, 1))) for d in deltas) * 0.9
    assert line["bytes_out"] > 0 and line["clients_rejected"] == 0
    assert line["slowest_client_seconds"] == pytest.approx(0.6)  # the 60-example client's train_seconds
    checkpoint = load_checkpoint(tmp_path / "ckpt", sha256_hex(tabular.tflite))
    assert checkpoint.round == 1
    for c, g in zip(checkpoint.weights, got, strict=True):
        np.testing.assert_array_equal(c.array, g.array)
    # The final global model stays retained for boards that connect later.
    clients[0].wait_for(lambda: 2 in clients[0].globals)


OTHER_RUN = "0123456789abcdef"
BAD_UPDATES = {  # (tabular, delta, the coordinator's run) -> update bytes
    "unknown_model": lambda t, d, r: encode_frame(_update(t, "pi-0", 1, d, 5, model_sha256="0" * 64, run=r)),
    "stale_round": lambda t, d, r: encode_frame(_update(t, "pi-0", 0, d, 5, run=r)),
    "stale_run": lambda t, d, r: encode_frame(_update(t, "pi-0", 1, d, 5, run=OTHER_RUN)),
    "bad_tensors": lambda t, d, r: encode_frame(
        _update(t, "pi-0", 1, [d[0]._replace(array=d[0].array * np.nan), *d[1:]], 5, run=r)
    ),
    "client_mismatch": lambda t, d, r: encode_frame(_update(t, "pi-9", 1, d, 5, run=r)),
    "bad_magic": lambda t, d, r: b"garbage" * 20,
    "bad_checksum": lambda t, d, r: encode_frame(_update(t, "pi-0", 1, d, 5, run=r))[:-1] + b"\x00",
}


def test_bad_updates_are_rejected_with_reasons_and_do_not_touch_the_model(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    good, bad = FakeClient(broker, "pi-1"), FakeClient(broker, "pi-0")
    strategy = FedAvg(min_fit=2, min_available=2)
    # The round stays open for all the bad updates (its deadline is only what the assertion waits out),
    # also on a loaded machine: a shorter one let late bad updates be refused as stale_round instead.
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, round_timeout=3.0, max_attempts=1))
    initial = running.coordinator.global_weights
    good.wait_for(lambda: good.rounds)
    delta = _delta(tabular, 7)
    for make in BAD_UPDATES.values():
        bad.send(make(tabular, delta, running.coordinator.run_id))
    bad.wait_for(lambda: len(bad.acks) >= len(BAD_UPDATES))
    good.send(_update(tabular, "pi-1", 1, delta, 5))
    error = running.join()
    # Only one of the two selected clients sent a valid update: min_fit=2 is not reached.
    assert isinstance(error, CoordinatorError) and "min_fit=2" in str(error)
    reasons = {a.reason for a in bad.acks}
    assert set(BAD_UPDATES) <= reasons
    assert all(a.status == "rejected" for a in bad.acks)
    # An ack names the round and run of the update it answers (here the stale round 0, the other run).
    assert [a.round for a in bad.acks if a.reason == "stale_round"] == [0]
    assert [a.run for a in bad.acks if a.reason == "stale_run"] == [OTHER_RUN]
    assert {a.run for a in bad.acks if a.reason == "bad_magic"} == {running.coordinator.run_id}
    for now, before in zip(running.coordinator.global_weights, initial, strict=True):
        np.testing.assert_array_equal(now.array, before.array)


def test_duplicates_are_acknowledged_once_and_counted_once(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    clients = [FakeClient(broker, f"pi-{i}") for i in range(2)]
    running = Running(_coordinator(broker, model_path, tmp_path, FedAvg(min_fit=2, min_available=2)))
    initial = running.coordinator.global_weights
    for c in clients:
        c.wait_for(lambda c=c: c.rounds)
    d0, d1 = _delta(tabular, 1), _delta(tabular, 2)
    broker.duplicate_next(3)  # QoS 1 duplicates of the first chunks
    clients[0].send(_update(tabular, "pi-0", 1, d0, 10))
    clients[0].wait_for(lambda: clients[0].acks)
    clients[0].send(_update(tabular, "pi-0", 1, d0, 10))  # a resend after a lost ack
    clients[0].wait_for(lambda: any(a.status == "duplicate" for a in clients[0].acks))
    clients[1].send(_update(tabular, "pi-1", 1, d1, 30))
    assert running.join() is None
    assert {a.status for a in clients[0].acks} == {"accepted", "duplicate"}
    # The exact aggregate below proves the update was counted once.
    for k, got in enumerate(running.coordinator.global_weights):
        expected = initial[k].array + (10 * d0[k].array.astype(np.float64) + 30 * d1[k].array) / 40
        np.testing.assert_allclose(got.array, expected, rtol=1e-6, atol=1e-7)


def test_a_silent_client_does_not_stall_the_round(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    clients = [FakeClient(broker, f"pi-{i}") for i in range(3)]
    running = Running(_coordinator(broker, model_path, tmp_path, FedAvg(min_fit=2, min_available=3), round_timeout=1.0))
    for c in clients:
        c.wait_for(lambda c=c: c.rounds)
    clients[2].transport.drop()  # loses power mid-round: no update ever comes
    for c in clients[:2]:
        c.send(_update(tabular, c.id, 1, _delta(tabular, 3), 10))
    started = time.monotonic()
    assert running.join() is None
    assert time.monotonic() - started < 10
    metrics = running.coordinator.history[0]
    assert (metrics.clients_selected, metrics.clients_answered) == (3, 2)
    assert "pi-2" not in running.coordinator.online  # its Last Will marked it offline


def test_clients_without_usable_data_are_not_selected(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    ready, empty = FakeClient(broker, "pi-0"), FakeClient(broker, "pi-1")
    empty.transport.publish(TOPICS.presence("pi-1"), Presence("online", 0).to_bytes(), retain=True)
    running = Running(_coordinator(broker, model_path, tmp_path, FedAvg(min_fit=1, min_available=1)))
    ready.wait_for(lambda: ready.rounds)
    assert ready.rounds[-1].selected == ("pi-0",)
    ready.send(_update(tabular, "pi-0", 1, _delta(tabular, 8), 10))
    assert running.join() is None
    assert running.coordinator.history[0].clients_selected == 1


def test_too_few_updates_retry_the_round_and_say_whom_it_asks(tabular, model_path, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.service")
    broker = InMemoryBroker()
    first, lost = FakeClient(broker, "pi-0"), FakeClient(broker, "pi-1")
    strategy = FedAvg(min_fit=2, min_available=2)
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, round_timeout=0.8))
    first.wait_for(lambda: first.rounds)
    lost.transport.drop()  # selected, then loses power: attempt 1 ends with one update
    first.send(_update(tabular, "pi-0", 1, _delta(tabular, 4), 10))
    first.wait_for(lambda: first.acks)
    fresh = FakeClient(broker, "pi-2")  # comes online during attempt 1
    fresh.wait_for(lambda: fresh.rounds and "pi-2" in fresh.rounds[-1].selected)
    fresh.send(_update(tabular, "pi-2", 1, _delta(tabular, 5), 10))
    assert running.join() is None
    metrics = running.coordinator.history[0]
    assert metrics.attempts == 2 and metrics.clients_answered == 2
    # The retry asks only clients without an accepted update; the round still counts all three.
    assert set(fresh.rounds[-1].selected) == {"pi-1", "pi-2"} and metrics.clients_selected == 3
    # Its update was kept, not asked for again.
    assert first.acks == [Ack(1, "accepted", run=running.coordinator.run_id)]
    # The log says what the retry does: how many it asks and why (not "more clients").
    assert (
        "1 accepted update(s) by the deadline, min_fit is 2; announcing the round again (attempt 2 of 3)" in caplog.text
    )
    assert (
        "round 1 (attempt 2): asking 2 client(s) for an update: 1 selected earlier without an update yet, "
        "1 newly sampled from the 1 eligible online clients without an accepted update (1 accepted so far)"
    ) in caplog.text
    assert "more clients" not in caplog.text


def test_the_round_message_carries_the_decayed_lr(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    client = FakeClient(broker, "pi-0")
    strategy = FedAvg(min_fit=1, min_available=1, round_config=RoundConfig(lr=0.08), lr_decay=0.5)
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, rounds=2))
    for number in (1, 2):
        client.wait_for(lambda n=number: client.rounds and client.rounds[-1].round == n)
        client.send(_update(tabular, "pi-0", number, _delta(tabular, number), 10))
        client.wait_for(lambda n=number: len(client.acks) == n)
    assert running.join() is None
    assert [r.lr for r in client.rounds if r.round == 2][-1] == pytest.approx(0.04)
    assert [m.client_lr for m in running.coordinator.history] == pytest.approx([0.08, 0.04])
    assert [line["client_lr"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == pytest.approx([0.08, 0.04])


def test_restart_resumes_from_the_checkpoint(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    client = FakeClient(broker, "pi-0")
    strategy = FedAvg(min_fit=1, min_available=1)
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, rounds=2))
    client.wait_for(lambda: client.rounds)
    client.send(_update(tabular, "pi-0", 1, _delta(tabular, 6), 10))
    client.wait_for(lambda: client.acks)
    client.wait_for(lambda: client.rounds[-1].round == 2)
    running.stop.set()  # the coordinator "crashes" during round 2
    assert running.join() is None
    after_round_1 = running.coordinator.global_weights
    running.coordinator.close()

    restarted = _coordinator(InMemoryBroker(), model_path, tmp_path, strategy, rounds=2)
    restarted.engine.restore()
    assert restarted.completed_round == 1
    for a, b in zip(restarted.global_weights, after_round_1, strict=True):
        np.testing.assert_array_equal(a.array, b.array)


def test_a_restarted_coordinator_gets_its_server_optimizer_state_back(tabular, model_path, tmp_path):
    from coordinator.strategies import FedAdam

    broker = InMemoryBroker()
    client = FakeClient(broker, "pi-0")
    running = Running(_coordinator(broker, model_path, tmp_path, FedAdam(min_fit=1, min_available=1)))
    client.wait_for(lambda: client.rounds)
    client.send(_update(tabular, "pi-0", 1, _delta(tabular, 9), 10))
    assert running.join() is None
    saved = running.coordinator.strategy.state_dict()
    assert saved and all(np.any(v != 0) for k, v in saved.items() if k.startswith("m/"))

    restarted = _coordinator(InMemoryBroker(), model_path, tmp_path, FedAdam(min_fit=1, min_available=1))
    restarted.engine.restore()
    restored = restarted.strategy.state_dict()
    assert restored.keys() == saved.keys()
    for key in saved:
        np.testing.assert_array_equal(restored[key], saved[key])


def test_stop_while_waiting_for_clients(model_path, tmp_path):
    running = Running(_coordinator(InMemoryBroker(), model_path, tmp_path))
    time.sleep(0.1)
    running.stop.set()
    assert running.join(5) is None
    assert running.coordinator.history == []


def test_waiting_too_long_for_clients_is_a_clear_error(model_path, tmp_path):
    running = Running(_coordinator(InMemoryBroker(), model_path, tmp_path, wait_for_clients=0.2))
    error = running.join(5)
    assert isinstance(error, CoordinatorError) and "lower --min-available" in str(error)


def test_a_private_round_clips_each_update_and_reports_epsilon(tabular, model_path, tmp_path):
    from coordinator.strategies.dp import DifferentialPrivacy, update_norm

    broker = InMemoryBroker()
    clients = [FakeClient(broker, f"pi-{i}") for i in range(3)]
    inner = FedAvg(min_fit=3, min_available=3, round_config=RoundConfig(epochs=1, lr=0.05))
    strategy = DifferentialPrivacy(inner, clip_norm=0.1, noise_multiplier=0.0)
    running = Running(_coordinator(broker, model_path, tmp_path, strategy=strategy))
    initial = running.coordinator.global_weights
    deltas = [_delta(tabular, seed, scale=10.0) for seed in range(3)]  # far beyond the clip norm
    for client, delta in zip(clients, deltas, strict=True):
        client.wait_for(lambda c=client: c.rounds and c.globals.get(1))
        client.send(_update(tabular, client.id, 1, delta, 1000))
    assert running.join() is None
    after = running.coordinator.global_weights
    moved = [NamedArray(n, g - i) for (n, g), (_, i) in zip(after, initial, strict=True)]
    assert update_norm(moved) <= 0.1 * (1 + 1e-5)  # the mean of three clipped updates
    (line,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert line["dp_epsilon"] is None  # clipping without noise: infinite epsilon, written as null


# -- runs ------------------------------------------------------------------------------------


def test_a_resumed_run_keeps_its_run_id_and_a_new_run_draws_a_new_one(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    client = FakeClient(broker, "pi-0")
    strategy = FedAvg(min_fit=1, min_available=1)
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, rounds=2))
    run = running.coordinator.run_id
    assert is_run_id(run)
    client.wait_for(lambda: client.rounds)
    client.send(_update(tabular, "pi-0", 1, _delta(tabular, 6), 10))
    client.wait_for(lambda: client.rounds[-1].round == 2)
    running.stop.set()  # "crashes" during round 2
    assert running.join() is None
    running.coordinator.close()
    assert load_checkpoint(tmp_path / "ckpt", sha256_hex(tabular.tflite)).run_id == run

    client.rounds.clear()  # from now on, only what the resumed run publishes
    client.globals.clear()
    resumed = Running(_coordinator(broker, model_path, tmp_path, strategy, rounds=2))
    assert resumed.coordinator.run_id == run and resumed.coordinator.completed_round == 1
    client.wait_for(lambda: client.rounds and client.globals.get(2))
    assert client.rounds[-1].round == 2
    assert client.rounds[-1].run == client.globals[2].run == run  # boards see the same run go on
    client.send(_update(tabular, "pi-0", 2, _delta(tabular, 7), 10))
    assert resumed.join() is None
    client.wait_for(lambda: client.acks[-1].round == 2)
    assert client.acks[-1] == Ack(2, "accepted", run=run)

    other = _coordinator(broker, model_path, tmp_path / "elsewhere", strategy)  # a new --out: a new run
    other.start()
    other.close()
    assert other.run_id != run and other.completed_round == 0


def test_a_restart_before_round_1_completes_keeps_the_run_id(tabular, model_path, tmp_path):
    first = _coordinator(InMemoryBroker(), model_path, tmp_path)
    first.start()  # checkpointed at once, before any round completes
    first.close()
    again = _coordinator(InMemoryBroker(), model_path, tmp_path)
    again.start()
    assert again.run_id == first.run_id and again.completed_round == 0


def test_start_clears_the_retained_announcement_of_an_earlier_run(tabular, model_path, tmp_path):
    """Until the new run announces its round, a board must not find an old run's round on the broker."""
    broker = InMemoryBroker()
    old = RoundAnnouncement(7, ("pi-0",), time.time() + 600, sha256_hex(tabular.tflite), run=OTHER_RUN)
    seed = InMemoryTransport(broker, "old-coordinator")
    seed.connect()
    seed.publish(TOPICS.round, old.to_bytes(), retain=True)
    coordinator = _coordinator(broker, model_path, tmp_path)
    coordinator.start()
    coordinator.publish_global()  # the global weights of round 1
    assert TOPICS.round not in broker.retained
    board = FakeClient(broker, "pi-0")
    board.pump(0.2)
    assert board.rounds == [] and board.globals[1].run == coordinator.run_id


def test_a_checkpoint_of_protocol_v1_resumes_under_a_new_run_id(tabular, model_path, tmp_path):
    import json
    import struct
    import zlib

    from coordinator.checkpoint import ServerState, save_checkpoint

    weights = [NamedArray(w.name, w.array + 0.5) for w in tabular.runtime().get_weights()]
    save_checkpoint(tmp_path / "ckpt", sha256_hex(tabular.tflite), ServerState(3, weights))
    # Rewrite it as v1 wrote it: no "run" in the index, a version-1 frame without "run".
    index_path = tmp_path / "ckpt" / "checkpoint.json"
    index = json.loads(index_path.read_text())
    del index["run"]
    index_path.write_text(json.dumps(index))
    frame_path = tmp_path / "ckpt" / index["weights"]
    data = frame_path.read_bytes()
    (header_len,) = struct.unpack_from("<I", data, 5)
    header = json.loads(data[9 : 9 + header_len])
    del header["run"]
    raw = json.dumps(header).encode()
    body = b"LFWT" + struct.pack("<BI", 1, len(raw)) + raw + data[9 + header_len : -4]
    frame_path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))

    resumed = _coordinator(InMemoryBroker(), model_path, tmp_path, rounds=5)
    resumed.start()
    resumed.close()
    assert resumed.completed_round == 3 and is_run_id(resumed.run_id) and resumed.run_id != UNNAMED_RUN
    assert load_checkpoint(tmp_path / "ckpt", sha256_hex(tabular.tflite)).run_id == resumed.run_id  # kept from now on
    for a, b in zip(resumed.global_weights, weights, strict=True):
        np.testing.assert_array_equal(a.array, b.array)


def test_an_overflowing_aggregate_keeps_the_global_model_and_the_run_goes_on(tabular, model_path, tmp_path, caplog):
    """Finite updates whose mean overflows float32 end the round with the model unchanged, not the run."""
    broker = InMemoryBroker()
    clients = [FakeClient(broker, f"pi-{i}") for i in range(3)]
    strategy = FedAvg(min_fit=3, min_available=3, server_lr=2.0)  # 2 * 3e38 is past float32's 3.4e38
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, rounds=2))
    initial = running.coordinator.global_weights
    huge = [NamedArray(s.name, np.full(s.shape, 3e38, np.float32)) for s in _specs(tabular)]
    for client in clients:
        client.wait_for(lambda c=client: c.rounds and c.globals.get(1))
        client.send(_update(tabular, client.id, 1, huge, 10))
    for client in clients:
        client.wait_for(lambda c=client: c.globals.get(2))
        client.send(_update(tabular, client.id, 2, _delta(tabular, 1), 10))
    assert running.join() is None
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    assert "NaN or Inf" in first["aggregation_error"]
    assert second["aggregation_error"] is None and second["round"] == 2
    assert "aggregate refused" in caplog.text
    after_round_1 = clients[0].globals[2].tensors
    for got, start in zip(after_round_1, initial, strict=True):
        np.testing.assert_array_equal(got.array, start.array)
    assert all(np.isfinite(w.array).all() for w in running.coordinator.global_weights)


# -- hostile input (issue 11): no message stops the coordinator --------------------------------

DEEP = b'{"status": "online", "num_examples": ' + b"[" * 1500 + b"]" * 1500 + b"}"  # 3 KB: a RecursionError once
LONG_INT = b'{"status": "online", "num_examples": ' + b"9" * 3000 + b"}"  # a ValueError in json.loads once
HUGE_INT = b'{"status": "online", "num_examples": ' + b"9" * 5000 + b"}"  # over the 4 KiB a presence may have


def _attacker(broker) -> InMemoryTransport:
    attacker = InMemoryTransport(broker, "attacker")
    attacker.connect()
    return attacker


def _fedavg(initial, deltas, counts):
    return [
        i.array + sum(n * d[k].array.astype(np.float64) for d, n in zip(deltas, counts, strict=True)) / sum(counts)
        for k, i in enumerate(initial)
    ]


def test_junk_presence_retained_or_live_never_stops_the_coordinator(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    attacker = _attacker(broker)
    junks = (DEEP, LONG_INT, HUGE_INT, b"\xff" * 10, b"[]")
    for client, junk in zip(("junk-0", "junk-1", "junk-2", "junk-3", "junk-4"), junks, strict=True):
        attacker.publish(TOPICS.presence(client), junk, retain=True)  # what a (re)started coordinator finds first
    clients = [FakeClient(broker, f"pi-{i}") for i in range(2)]
    running = Running(_coordinator(broker, model_path, tmp_path, FedAvg(min_fit=2, min_available=2)))
    initial, deltas = running.coordinator.global_weights, [_delta(tabular, s) for s in range(2)]
    attacker.publish(TOPICS.presence("pi-0"), DEEP)  # an honest client's topic: its state stays online
    for client, delta in zip(clients, deltas, strict=True):
        client.wait_for(lambda c=client: c.rounds)
        client.send(_update(tabular, client.id, 1, delta, 10))
    assert running.join() is None
    metrics = running.coordinator.history[0]
    assert metrics.presence_ignored == {"bad_json": 5, "too_large": 1} and metrics.clients_answered == 2
    assert set(running.coordinator.online) == {"pi-0", "pi-1"}
    for got, want in zip(running.coordinator.global_weights, _fedavg(initial, deltas, [10, 10]), strict=True):
        np.testing.assert_allclose(got.array, want, rtol=1e-6, atol=1e-7)


def test_updates_beyond_their_presence_or_in_another_codec_are_refused_and_honest_ones_count(
    tabular, model_path, tmp_path
):
    broker = InMemoryBroker()
    honest, mallory = FakeClient(broker, "pi-0", num_examples=50), FakeClient(broker, "pi-1", num_examples=10)
    running = Running(_coordinator(broker, model_path, tmp_path, FedAvg(min_fit=1, min_available=2), round_timeout=3))
    initial, delta = running.coordinator.global_weights, _delta(tabular, 3)
    mallory.wait_for(lambda: mallory.rounds)
    run = running.coordinator.run_id
    for frame in (
        _update(tabular, "pi-1", 1, delta, 11),  # one more than its presence said
        _update(tabular, "pi-1", 1, delta, 10**20),  # within the JSON bounds, far beyond the cap
        _update(tabular, "pi-1", 1, delta, 10, codec="float16"),  # the round asked for float32
    ):
        mallory.send(frame)
    mallory.wait_for(lambda: len(mallory.acks) == 3)
    honest.wait_for(lambda: honest.rounds)
    honest.send(_update(tabular, "pi-0", 1, delta, 50))
    assert running.join() is None
    assert [a.reason for a in mallory.acks] == ["too_many_examples", "too_many_examples", "wrong_codec"]
    assert all(a.status == "rejected" and a.run == run for a in mallory.acks)
    metrics = running.coordinator.history[0]
    assert metrics.rejected_reasons == {"too_many_examples": 2, "wrong_codec": 1}
    assert metrics.clients_answered == 1 and metrics.num_examples == 50
    for got, want in zip(running.coordinator.global_weights, _fedavg(initial, [delta], [50]), strict=True):
        np.testing.assert_allclose(got.array, want, rtol=1e-6, atol=1e-7)


def test_a_client_that_went_offline_is_bound_by_the_presence_it_was_selected_with(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    client = FakeClient(broker, "pi-0", num_examples=20)
    running = Running(_coordinator(broker, model_path, tmp_path, FedAvg(min_fit=1, min_available=1)))
    client.wait_for(lambda: client.rounds)
    client.transport.publish(TOPICS.presence("pi-0"), b'{"status": "offline"}', retain=True)  # its Last Will
    client.send(_update(tabular, "pi-0", 1, _delta(tabular, 1), 21))
    client.wait_for(lambda: client.acks)
    client.send(_update(tabular, "pi-0", 1, _delta(tabular, 1), 20))
    assert running.join() is None
    client.wait_for(lambda: len(client.acks) == 2)
    assert [a.reason for a in client.acks] == ["too_many_examples", ""]
    assert running.coordinator.history[0].num_examples == 20


def test_a_junk_chunk_flood_from_one_client_does_not_make_the_others_too_busy(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    clients = [FakeClient(broker, f"pi-{i}") for i in range(2)]
    coordinator = _coordinator(broker, model_path, tmp_path, FedAvg(min_fit=2, min_available=2))
    frame_size = len(encode_frame(_update(tabular, "pi-0", 1, _delta(tabular, 0), 10)))
    # Small bounds, so that a small flood exceeds the flooder's share: two updates per client, six in all.
    coordinator._reassembler = Reassembler(max_payload=frame_size + 1024, max_pending=6 * frame_size)
    running = Running(coordinator)
    initial, deltas = coordinator.global_weights, [_delta(tabular, s) for s in range(2)]
    flooder = _attacker(broker)
    for client in clients:
        client.wait_for(lambda c=client: c.rounds)
    for n in range(3 * frame_size // SMALL_CHUNK):  # each a new transfer that never completes
        junk = split(n.to_bytes(4, "little") * (frame_size // 4), SMALL_CHUNK)[0]
        flooder.publish(TOPICS.update("mallory"), junk)
    for client, delta in zip(clients, deltas, strict=True):
        client.send(_update(tabular, client.id, 1, delta, 10))
    assert running.join() is None
    for client in clients:
        client.wait_for(lambda c=client: c.acks)
        assert [a.status for a in client.acks] == ["accepted"]
    metrics = coordinator.history[0]
    assert metrics.rejected_reasons["too_busy"] > 0 and metrics.clients_answered == 2
    for got, want in zip(coordinator.global_weights, _fedavg(initial, deltas, [10, 10]), strict=True):
        np.testing.assert_allclose(got.array, want, rtol=1e-6, atol=1e-7)


def test_the_announcement_never_exceeds_the_payload_limit_however_many_are_selected(
    tabular, model_path, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="coordinator.service")
    broker = InMemoryBroker()
    attacker = _attacker(broker)
    fakes = [f"{i:04d}".ljust(64, "f") for i in range(2000)]  # 64-character ids: ~130 KB of announcement
    for fake in fakes:
        attacker.publish(TOPICS.presence(fake), Presence("online", 10).to_bytes(), retain=True)
    clients = [FakeClient(broker, f"pi-{i}") for i in range(2)]
    strategy = FedAvg(min_fit=1, min_available=len(fakes) + 2)
    cfg = CoordinatorConfig(model_path=model_path, federation="test", rounds=1, round_timeout=1.0, poll_interval=0.02,
                            checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    transport = InMemoryTransport(broker, "coordinator")  # 128 KiB max_payload; the 96 KiB chunk is the limit
    running = Running(Coordinator(cfg, transport, strategy))
    watcher = InMemoryTransport(broker, "watcher")
    watcher.connect()
    watcher.subscribe(TOPICS.round)
    sent, give_up = set(), time.monotonic() + 60
    while running.thread.is_alive() and time.monotonic() < give_up:  # an honest client answers when asked
        for client in clients:
            client.pump(0.02)
            if client.id not in sent and client.rounds and client.id in client.rounds[-1].selected:
                client.send(_update(tabular, client.id, 1, _delta(tabular, 1), 10))
                sent.add(client.id)
    assert running.join() is None
    announcements = []
    while (message := watcher.receive(0)) is not None:
        if message.payload:
            assert len(message.payload) <= cfg.max_chunk
            announcements.append(RoundAnnouncement.from_bytes(message.payload))
    assert announcements and all(1000 < len(a.selected) < 1500 for a in announcements)
    metrics = running.coordinator.history[0]
    assert metrics.clients_unannounced > 500 and metrics.clients_answered == len(sent) >= 1
    assert "would exceed the 98304-byte payload limit" in caplog.text


ONLINE = Presence("online", 10).to_bytes()
OFFLINE = b'{"status": "offline"}'


def test_presence_beyond_max_clients_is_ignored_and_warned_about_once_a_minute(caplog):
    now = [0.0]
    presences = Presences(max_clients=3, rate=10, allowed=None, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="coordinator.service"):
        whys = [presences.update(f"c{i}", ONLINE) for i in range(100)]
        assert whys == [None] * 3 + ["over_max_clients"] * 97 and set(presences.online) == {"c0", "c1", "c2"}
        assert presences.update("c0", Presence("online", 99).to_bytes()) is None  # a known client may change
        assert presences.update("c1", OFFLINE) is None and presences.update("c5", ONLINE) is None  # room again
        now[0] = 61.0
        assert presences.update("c6", ONLINE) == "over_max_clients"
    assert presences.online == {"c0": 99, "c2": 10, "c5": 10}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "raise --max-clients" in warnings[0]
    assert "and 96 more ignored since the last such warning" in warnings[1]


def test_a_flapping_presence_is_ignored_for_the_rest_of_the_minute_then_its_latest_state_applies():
    now = [0.0]
    presences = Presences(max_clients=10, rate=3, allowed=None, clock=lambda: now[0])
    whys = [presences.update("flappy", OFFLINE if i % 2 else ONLINE) for i in range(6)]
    assert whys == [None, None, None, "rate_limited", "rate_limited", "rate_limited"]
    assert "flappy" in presences.online  # the third change (online) was the last one applied
    assert presences.update("steady", ONLINE) is None  # other clients are not limited
    now[0] = 59.0
    presences.settle()
    assert "flappy" in presences.online
    now[0] = 60.0
    presences.settle()  # the window ended: the latest state it sent (offline) applies
    assert "flappy" not in presences.online and "steady" in presences.online
    assert presences.update("flappy", ONLINE) is None  # a new window


def test_after_a_reconnection_only_clients_heard_from_since_stay_online():
    presences = Presences(max_clients=10, rate=10, allowed=None, clock=lambda: 0.0)
    for client in ("pi-0", "pi-1", "pi-2"):
        presences.update(client, ONLINE, epoch=0)
    presences.update("pi-2", ONLINE, epoch=1)  # said online again on the new connection
    assert presences.forget_before(1) == ["pi-0", "pi-1"]
    assert set(presences.online) == {"pi-2"}
    presences.update("pi-0", ONLINE, epoch=1)  # its birth message, a little later
    assert set(presences.online) == {"pi-0", "pi-2"} and presences.forget_before(1) == []


def test_with_a_list_of_clients_other_ids_are_ignored():
    presences = Presences(max_clients=10, rate=10, allowed=frozenset({"pi-1"}), clock=lambda: 0.0)
    assert presences.update("pi-1", ONLINE) is None
    assert presences.update("intruder", ONLINE) == "not_listed"
    assert presences.update("pi-1", b"") is None  # a cleared retained presence is offline
    assert presences.online == {}


def test_with_allowed_clients_unlisted_boards_are_never_selected(tabular, model_path, tmp_path):
    broker = InMemoryBroker()
    listed, intruder = FakeClient(broker, "pi-0"), FakeClient(broker, "intruder")
    strategy = FedAvg(min_fit=1, min_available=1)
    running = Running(_coordinator(broker, model_path, tmp_path, strategy, allowed_clients=frozenset({"pi-0"})))
    listed.wait_for(lambda: listed.rounds)
    assert listed.rounds[-1].selected == ("pi-0",)
    intruder.wait_for(lambda: intruder.rounds)
    intruder.send(_update(tabular, "intruder", 1, _delta(tabular, 1), 10))
    intruder.wait_for(lambda: intruder.acks)
    listed.send(_update(tabular, "pi-0", 1, _delta(tabular, 1), 10))
    assert running.join() is None
    assert [a.reason for a in intruder.acks] == ["not_selected"]
    assert running.coordinator.history[0].presence_ignored == {"not_listed": 1}


def test_a_coordinator_started_while_the_broker_is_down_waits_for_it(model_path, tmp_path):
    broker = InMemoryBroker()
    broker.stop()
    coordinator = _coordinator(broker, model_path, tmp_path, broker_outage_timeout=30.0)
    starting = threading.Thread(target=coordinator.start, daemon=True)
    starting.start()
    starting.join(0.5)
    assert starting.is_alive(), "start() returned although the broker is down"
    assert TOPICS.model_meta not in broker.retained
    broker.start()
    starting.join(15)
    assert not starting.is_alive(), "start() did not connect once the broker was back"
    assert TOPICS.model_meta in broker.retained  # the model is published: boards can join
    coordinator.close()


def test_a_coordinator_stopped_while_waiting_for_the_broker_runs_no_round(model_path, tmp_path):
    broker = InMemoryBroker()
    broker.stop()
    coordinator = _coordinator(broker, model_path, tmp_path, broker_outage_timeout=30.0)
    stop = threading.Event()
    starting = threading.Thread(target=coordinator.start, args=(stop,), daemon=True)
    starting.start()
    stop.set()
    starting.join(15)
    assert not starting.is_alive() and coordinator.run(stop) == []
