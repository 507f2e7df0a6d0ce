"""Fault injection: a federation that rides out outages (issue 11).

First the coordinator alone and with real edge clients on the in-memory
broker, which can be stopped and restarted at exact moments: a broker restart
without persistence, a round whose deadline passes while the broker is away,
an outage longer than ``broker_outage_timeout``, and an update resent after
its ack was lost (counted once).

Then the whole federation for real: a Mosquitto the test starts and restarts
(without, then with persistence), the coordinator as a ``litefed-coordinator``
process and three ``litefed-client`` processes on the tabular model, through
a broker restart mid-round, a coordinator ``kill -9`` mid-round and a restart
from its checkpoint, board ``kill -9`` and restarts (one while the broker is
down), and a board frozen (SIGSTOP) past a round's deadline and woken after
it, with no human action. A fourth board, the test's own, answers each round
last, so that every fault strikes while the round is open. The same
federation without a fault is the yardstick: the faulty run ends with as
many rounds, every update counted once, and its final test accuracy within
1 point of the clean run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import find_mosquitto, free_port
from coordinator.cli.emulate import ClientProcess, start_clients, stop_clients, write_client_files
from coordinator.errors import CoordinatorError
from coordinator.metrics import read_jsonl
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.strategies import FedAvg, RoundConfig
from edge_client.client import EdgeClient, last_will
from edge_client.config import ClientConfig
from edge_client.errors import BrokerDown
from edge_client.frames import Frame
from edge_client.messages import Ack, ModelMeta, Presence, RoundAnnouncement
from edge_client.model_file import sha256_hex
from edge_client.mqtt import Backoff, MqttTransport
from edge_client.topics import Topics
from edge_client.transport import InMemoryBroker, InMemoryTransport, Message
from edge_client.weights import NamedArray
from tests.fakes import SMALL_CHUNK, TOPICS, FakeClient
from tests.helpers import REPO_ROOT, separable_binary_data

WAIT = 30.0  # upper bound of every wait below; each is over in well under a second to a few seconds


def _wait(condition: Callable[[], object], what: str, timeout: float = WAIT, poll: Callable[[], None] | None = None):
    end = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < end, f"timed out after {timeout:g} s waiting for {what}"
        if poll is not None:
            poll()
        else:
            time.sleep(0.02)
    return result


class Background:
    """``coordinator.run`` in a thread (after ``start``); ``join`` returns what it raised, if anything."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator, self.stop, self.error = coordinator, threading.Event(), None
        coordinator.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.coordinator.run(self.stop)
        except Exception as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = WAIT) -> Exception | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator did not finish in time"
        return self.error


# -- the coordinator on the in-memory broker -------------------------------------------------


def _coordinator(broker, tabular, tmp_path, *, min_fit: int = 2, clock=time.time, **config) -> Coordinator:
    settings = {"rounds": 1, "round_timeout": 30.0, "max_chunk": SMALL_CHUNK, "poll_interval": 0.02, **config}
    cfg = CoordinatorConfig(
        model_path=tabular.model_path,
        federation="test",
        checkpoint_dir=tmp_path / "ckpt",
        metrics_path=tmp_path / "metrics.jsonl",
        **settings,
    )
    strategy = FedAvg(min_fit=min_fit, min_available=min_fit, round_config=RoundConfig(epochs=1, lr=0.05))
    return Coordinator(cfg, InMemoryTransport(broker, "coordinator"), strategy, clock=clock)


def _board(broker: InMemoryBroker, client_id: str, num_examples: int = 100) -> FakeClient:
    """A fake board whose transport says online on every connection, as an edge client's does."""
    board = FakeClient(broker, client_id, num_examples=num_examples)
    online = Presence("online", num_examples).to_bytes()
    board.transport.birth = Message(TOPICS.presence(client_id), online, retain=True)
    return board


def _update(tabular, client: str, ann: RoundAnnouncement, n: int = 100) -> Frame:
    delta = [NamedArray(s.name, np.full(s.shape, 0.01, np.float32)) for s in tabular.manifest.weights]
    sha = sha256_hex(tabular.tflite)
    return Frame("update", ann.round, sha, delta, client_id=client, num_examples=n, run=ann.run)


def test_after_a_restart_without_persistence_the_coordinator_publishes_its_retained_state_again(tabular, tmp_path):
    broker = InMemoryBroker()
    boards = [_board(broker, f"pi-{i}") for i in range(2)]
    running = Background(_coordinator(broker, tabular, tmp_path))
    for board in boards:
        board.wait_for(lambda b=board: b.rounds)
    announcement = broker.retained[TOPICS.round]
    broker.restart(persistent=False)  # a Mosquitto without persistence: every retained message is gone

    def republished() -> bool:
        held = broker.retained
        return all(topic in held for topic in (TOPICS.model_meta, TOPICS.global_chunk(0), TOPICS.round))

    _wait(republished, "the model, the global weights and the round, retained again")
    assert broker.retained[TOPICS.round] == announcement, "the open round's announcement, as it was"
    meta = ModelMeta.from_bytes(broker.retained[TOPICS.model_meta].payload)
    assert meta.model_sha256 == sha256_hex(tabular.tflite)
    assert all(TOPICS.model_chunk(i) in broker.retained for i in range(meta.chunks)), "a new board can join"
    for board in boards:
        board.send(_update(tabular, board.id, board.rounds[-1]))
    assert running.join() is None
    (metrics,) = running.coordinator.history
    assert (metrics.attempts, metrics.clients_answered) == (1, 2)


def test_a_round_whose_deadline_passes_while_the_broker_is_away_is_announced_again(tabular, tmp_path, caplog):
    """With max_attempts=1 the round would fail: an attempt during which the broker was away does not count."""
    broker = InMemoryBroker()
    boards = [_board(broker, f"pi-{i}") for i in range(2)]
    clock = [1_000_000_000.0]  # the coordinator's Unix time, moved by the test only
    coordinator = _coordinator(broker, tabular, tmp_path, round_timeout=10.0, max_attempts=1, clock=lambda: clock[0])
    running = Background(coordinator)
    for board in boards:
        board.wait_for(lambda b=board: b.rounds)
    first = boards[0].rounds[-1]
    broker.stop(persistent=True)
    clock[0] = first.deadline + 1  # the deadline passes while the broker is away
    _wait(lambda: any("Retrying while the broker" in r.getMessage() for r in caplog.records), "a retry")
    broker.start()
    for board in boards:  # the same round again, with a new deadline
        board.wait_for(lambda b=board: b.rounds[-1].deadline == clock[0] + 10.0)
        assert board.rounds[-1].round == first.round
        board.send(_update(tabular, board.id, board.rounds[-1]))
    assert running.join() is None
    (metrics,) = running.coordinator.history
    assert (metrics.attempts, metrics.clients_answered) == (1, 2)
    assert any("the broker was away during attempt 1" in r.getMessage() for r in caplog.records)


def test_the_coordinator_gives_up_after_the_broker_outage_timeout(tabular, tmp_path, caplog):
    broker = InMemoryBroker()
    coordinator = _coordinator(broker, tabular, tmp_path, broker_outage_timeout=0.5)
    coordinator.start()
    broker.stop()
    started = time.monotonic()
    with pytest.raises(CoordinatorError, match=r"unreachable for \d+ s \(--broker-outage-timeout 0.5\)"):
        coordinator.run(threading.Event())
    assert time.monotonic() - started < WAIT
    assert any("Retrying while the broker" in r.getMessage() for r in caplog.records)


def test_a_board_that_dies_while_a_broker_without_persistence_is_down_is_no_longer_online(tabular, tmp_path):
    """It left no Last Will and the broker lost its retained presence: only the boards that say online again count."""
    broker = InMemoryBroker()
    boards = [_board(broker, f"pi-{i}") for i in range(3)]
    running = Background(_coordinator(broker, tabular, tmp_path, min_fit=3))
    coordinator = running.coordinator
    try:
        for board in boards:
            board.wait_for(lambda b=board: b.rounds)  # round 1 is open, every board online
        assert set(coordinator.online) == {"pi-0", "pi-1", "pi-2"}
        broker.stop(persistent=False)
        boards[1].transport.close()  # loses power while the broker is down
        broker.start()
        _wait(lambda: set(coordinator.online) == {"pi-0", "pi-2"}, "pi-1 to be taken offline, the others back")
    finally:
        running.stop.set()
        assert running.join() is None


def test_a_stop_during_an_outage_ends_the_run_quietly(tabular, tmp_path):
    broker = InMemoryBroker()
    running = Background(_coordinator(broker, tabular, tmp_path))
    broker.stop()
    time.sleep(0.2)
    running.stop.set()
    assert running.join() is None and running.coordinator.history == []


def _edge_client(broker: InMemoryBroker, tmp_path: Path, client_id: str, data, **config) -> EdgeClient:
    settings = dict(federation="test", ack_timeout=0.3, max_resends=20, max_chunk=SMALL_CHUNK, seed=0, **config)
    cfg = ClientConfig(client_id=client_id, state_dir=tmp_path / client_id, **settings)
    return EdgeClient(cfg, InMemoryTransport(broker, client_id, will=last_will(cfg)), dataset=data)


def test_an_update_resent_after_its_ack_was_lost_is_counted_once(tabular, tmp_path):
    """Real edge clients: pi-0's first ack is lost, so it resends; the coordinator says duplicate, counts it once."""
    broker = InMemoryBroker()
    x, y = separable_binary_data(96, seed=4)
    clients = [_edge_client(broker, tmp_path, f"pi-{i}", (x[i * 48 : (i + 1) * 48], y[i * 48 : (i + 1) * 48]))
               for i in range(2)]  # fmt: skip
    acks = InMemoryTransport(broker, "watcher")
    acks.connect()
    acks.subscribe(TOPICS.ack("pi-0"))
    broker.drop_matching(TOPICS.ack("pi-0"), count=1)
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
    seen: list[Ack] = []

    def pi0_duplicate() -> bool:
        while (message := acks.receive(0.05)) is not None:
            seen.append(Ack.from_bytes(message.payload))
        return any(a.status == "duplicate" for a in seen)

    try:
        clients[1].start()  # online, but it answers only once pi-0's resend is answered: the round stays open
        threads[0].start()
        running = Background(_coordinator(broker, tabular, tmp_path))
        _wait(pi0_duplicate, "the duplicate ack of pi-0's resend", poll=lambda: None)
        threads[1].start()
        assert running.join() is None
        _wait(lambda: clients[0].rounds_completed == 1, "pi-0 to settle its round")
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(WAIT)
        for client in clients:
            client.close()
    (metrics,) = running.coordinator.history
    assert clients[0].updates_sent >= 2, "the lost ack made pi-0 resend"
    assert (metrics.clients_answered, metrics.num_examples) == (2, 96), "the resend was counted once"
    assert [a.status for a in seen] == ["duplicate"], "the first ack was lost, the resend was a duplicate"


# -- the whole federation, for real -----------------------------------------------------------

CLIENTS = 3
EXAMPLES = 120  # per board
HELD_OUT = 2000  # the coordinator's test set, of the boards' distribution: accuracy in steps of 0.05 points
ROUNDS = 7
SLEPT = 6  # the round board 0 sleeps through (SIGSTOP), past its deadline
# Slow enough that test accuracy still climbs at the end (97.0, 98.7 and 99.15 % after rounds 5 to 7
# of the clean run, not 100 %): a run that lost two rounds of training would miss by more than 1 point.
LR = 0.004
# Waited out once, in round SLEPT; every other round closes once every selected board answered, in
# at most about 4 s here (round 4: a broker restart and a board reboot), also with both cores busy.
ROUND_TIMEOUT = 20.0
TOLERANCE = 0.01  # final test accuracy of the faulty run against the clean run's: 1 point
FEDERATION = "faults"
HOLDER = "holder"  # the test's own board: it answers each round last, so the faults strike mid-round


class Mosquitto:
    """A Mosquitto process on a fixed port that the test stops and starts, with or without persistence."""

    def __init__(self, directory: Path):
        binary = find_mosquitto()
        if binary is None:
            pytest.fail("mosquitto is not installed; run scripts/setup.sh --dev to install it")
        self.binary, self.dir, self.port = binary, directory, free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self, persistent: bool) -> None:
        config = self.dir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 10000\n"
            f"persistence {'true' if persistent else 'false'}\npersistence_location {self.dir}/\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n" + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.process = subprocess.Popen([str(self.binary), "-c", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        probe = MqttTransport(self.url, f"probe-{time.monotonic_ns()}")
        _wait(lambda: self._reachable(probe), "mosquitto to accept connections")
        probe.close()

    def _reachable(self, probe: MqttTransport) -> bool:
        assert self.process is not None and self.process.poll() is None, "mosquitto exited at start"
        try:
            probe.connect(timeout=1)
        except BrokerDown:
            time.sleep(0.05)
            return False
        return True

    def stop(self) -> None:
        """SIGTERM: Mosquitto publishes the wills of its clients and, with persistence, saves what it retains."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


class Watcher:
    """The test's view of the federation: announcements and acks as they pass, and its own board."""

    def __init__(self, url: str, tabular):
        self.topics, self.tabular = Topics(FEDERATION), tabular
        self.transport = MqttTransport(url, f"watcher-{time.monotonic_ns()}", backoff=Backoff(0.05, 0.5))
        self.transport.connect()
        self.transport.subscribe(self.topics.round)
        self.transport.subscribe(f"{self.topics.base}/ack/+")
        self.rounds: list[RoundAnnouncement] = []
        self.acks: list[tuple[str, Ack]] = []
        online = Message(self.topics.presence(HOLDER), Presence("online", 1).to_bytes(), retain=True)
        will = FakeClient.will(HOLDER, self.topics)
        holder = MqttTransport(url, HOLDER, will=will, birth=online, backoff=Backoff(0.05, 0.5))
        self.holder = FakeClient(holder, HOLDER, num_examples=1, topics=self.topics)

    def pump(self) -> None:
        while (message := self.transport.receive(0.05)) is not None:
            if message.topic == self.topics.round and message.payload:
                self.rounds.append(RoundAnnouncement.from_bytes(message.payload))
            elif message.topic.startswith(f"{self.topics.base}/ack/"):
                self.acks.append((message.topic.rpartition("/")[2], Ack.from_bytes(message.payload)))

    def accepted(self, client: str, round: int) -> bool:
        return any(c == client and a.round == round and a.status == "accepted" for c, a in self.acks)

    def wait_round(self, round: int, after: float = 0.0) -> RoundAnnouncement:
        """The announcement of ``round`` with a deadline later than ``after`` (a new one, after a restart)."""
        found = _wait(lambda: [a for a in self.rounds if a.round == round and a.deadline > after], f"round {round}",
                      timeout=2 * WAIT, poll=self.pump)  # fmt: skip
        return found[-1]

    def wait_accepted(self, clients: list[str], round: int) -> None:
        for client in clients:
            _wait(lambda c=client: self.accepted(c, round), f"{client}'s update of round {round}", poll=self.pump)

    def hold_round(self, ann: RoundAnnouncement) -> None:
        """Answer ``ann`` as the holder (a zero update of one example), resending until it is acknowledged.

        A board resends the same way: right after a broker restart the coordinator may not be
        subscribed again yet, and an update published meanwhile reaches nobody.
        """
        zero = [NamedArray(s.name, np.zeros(s.shape, np.float32)) for s in self.tabular.manifest.weights]
        frame = Frame("update", ann.round, sha256_hex(self.tabular.tflite), zero, client_id=HOLDER, num_examples=1,
                      run=ann.run)  # fmt: skip
        self.holder.rounds.append(ann)
        before = sum(c == HOLDER for c, _ in self.acks)
        for _ in range(10):
            self.holder.send(frame)
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                self.pump()
                if sum(c == HOLDER for c, _ in self.acks) > before:
                    return
        raise AssertionError(f"the holder's update of round {ann.round} was never acknowledged")

    def close(self) -> None:
        self.holder.transport.close()
        self.transport.close()


def _progress(board: ClientProcess) -> dict:
    path = board.log_path.parent / "state" / "progress.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or being replaced
        return {}


def _retained(url: str, topics: list[str]) -> set[str]:
    """Which of ``topics`` a board connecting now finds retained."""
    late = MqttTransport(url, f"late-{time.monotonic_ns()}")
    late.connect()
    for topic in topics:
        late.subscribe(topic)
    found = set()
    while (message := late.receive(0.5)) is not None:
        if message.retain and message.payload:
            found.add(message.topic)
    late.close()
    return found


def _write_data(directory: Path, url: str) -> tuple[list[Path], Path]:
    """The boards' files, and the coordinator's held-out set drawn from the same distribution."""
    x, y = separable_binary_data(CLIENTS * EXAMPLES + HELD_OUT, seed=1)
    train = CLIENTS * EXAMPLES
    parts = np.array_split(np.arange(train), CLIENTS)
    configs = write_client_files(directory, x, y, parts, url, FEDERATION, seed=0)
    for config in configs:  # resend within seconds when an ack is lost, not after the default 30 s
        config.write_text("ack_timeout = 3\n" + config.read_text())
    test_data = directory / "test.npz"
    np.savez(test_data, x=x[train:], y=y[train:])
    return configs, test_data


def _kill(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL: no clean shutdown, as on a power loss
    process.wait(10)


class Federation:
    """The whole federation in ``directory``, and what the test does to its processes.

    Three ``litefed-client`` processes and a ``litefed-coordinator`` process
    (restarted from its checkpoint after a kill) on ``broker``, seen through
    ``watcher``. :meth:`stop` ends them all, waking a board left asleep first.
    """

    def __init__(self, tabular, broker: Mosquitto, watcher: Watcher, directory: Path):
        self.tabular, self.broker, self.watcher = tabular, broker, watcher
        self.out, self.log_path = directory / "run", directory / "coordinator.log"
        self.configs, self.test_data = _write_data(directory, broker.url)
        self.ids = [config.parent.name for config in self.configs]
        self.boards: list[ClientProcess] = []
        self.coordinators: list[subprocess.Popen] = []
        self.asleep: set[int] = set()  # boards stopped with SIGSTOP

    def start(self) -> None:
        self.boards = start_clients(self.configs)
        self.out.mkdir()
        self.start_coordinator()

    def start_coordinator(self) -> None:
        cmd = [sys.executable, "-m", "coordinator.cli.coordinate", "--model", str(self.tabular.model_path),
               "--broker", self.broker.url, "--federation", FEDERATION, "--rounds", str(ROUNDS),
               "--min-available", str(CLIENTS + 1), "--min-fit", "2", "--round-timeout", str(ROUND_TIMEOUT),
               "--epochs", "1", "--lr", str(LR), "--test-data", str(self.test_data), "--out", str(self.out),
               "--no-progress"]  # fmt: skip
        with open(self.log_path, "ab") as log_file:
            process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)  # fmt: skip
        self.coordinators.append(process)

    def restart_board(self, index: int) -> None:
        """``kill -9`` board ``index`` and start it again on its configuration and state directory."""
        _kill(self.boards[index].process)
        self.boards[index] = start_clients([self.configs[index]])[0]

    def sleep(self, index: int) -> None:
        """Freeze board ``index`` (SIGSTOP), as a board that hangs or is starved of CPU: its connection stays open."""
        self.boards[index].process.send_signal(signal.SIGSTOP)
        self.asleep.add(index)

    def wake(self, index: int) -> None:
        self.boards[index].process.send_signal(signal.SIGCONT)
        self.asleep.discard(index)

    def rounds_closed(self) -> int:
        """How many metrics lines the coordinator wrote so far (each in one write, newline last)."""
        path = self.out / "metrics.jsonl"
        return path.read_text().count("\n") if path.is_file() else 0

    def clean_round(self, number: int) -> None:
        """Round ``number`` without a fault: the boards answer, then the holder."""
        ann = self.watcher.wait_round(number)
        self.watcher.wait_accepted(self.ids, number)
        self.watcher.hold_round(ann)

    def finish(self) -> list[dict]:
        """Wait for the coordinator to end the run by itself; the run's metrics."""
        assert self.coordinators[-1].wait(2 * WAIT) == 0, self.log_path.read_text()[-4000:]
        return read_jsonl(self.out / "metrics.jsonl")

    def stop(self) -> None:
        for index in list(self.asleep):  # a stopped process would not see the SIGINT below
            self.wake(index)
        for process in self.coordinators:
            if process.poll() is None:
                _kill(process)
        stop_clients(self.boards, timeout=15)


@contextmanager
def _federation(tabular, directory: Path) -> Iterator[Federation]:
    """A running :class:`Federation`; everything it started is ended on the way out, whatever happened."""
    broker = Mosquitto(directory / "mosquitto")
    broker.start(persistent=False)
    watcher, federation = None, None
    try:
        watcher = Watcher(broker.url, tabular)
        federation = Federation(tabular, broker, watcher, directory)
        federation.start()
        yield federation
    finally:
        if federation is not None:
            federation.stop()
        if watcher is not None:
            watcher.close()
        broker.stop()


def _every_board_answered(record: dict) -> None:
    """Every board answered the round in its one attempt, and none was counted twice."""
    assert record["clients_answered"] == record["clients_selected"] == CLIENTS + 1, record
    assert record["attempts"] == 1 and record["num_examples"] == CLIENTS * EXAMPLES + 1, record


@pytest.fixture(scope="module")
def clean_run(tabular, tmp_path_factory) -> list[dict]:
    """The metrics of the same federation (data, seeds, settings, rounds) without a fault."""
    with _federation(tabular, tmp_path_factory.mktemp("clean")) as federation:
        for number in range(1, ROUNDS + 1):
            federation.clean_round(number)
        return federation.finish()


@pytest.mark.integration
@pytest.mark.slow
def test_a_clean_federation_learns_in_every_round_with_every_board(clean_run):
    """The run the faulty one is measured against; its accuracy still climbs at the end, so the comparison bites."""
    assert [r["round"] for r in clean_run] == list(range(1, ROUNDS + 1)), clean_run
    for record in clean_run:
        _every_board_answered(record)
    accuracy = [r["test_accuracy"] for r in clean_run]
    # Two rounds of training fewer would miss the final accuracy by more than the tolerance.
    assert accuracy[-1] - accuracy[-3] > TOLERANCE, accuracy
    assert accuracy[-1] < 1.0, accuracy


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_federation_rides_out_broker_coordinator_and_board_failures(tabular, tmp_path, clean_run):
    with _federation(tabular, tmp_path) as federation:
        _inflict_faults(federation)
        records = federation.finish()
    watcher, boards, ids = federation.watcher, federation.boards, federation.ids

    assert [r["round"] for r in records] == [r["round"] for r in clean_run] == list(range(1, ROUNDS + 1)), records
    for record in records:
        if record["round"] != SLEPT:
            _every_board_answered(record)
        # Refused, not counted: only late updates, e.g. the resend of a board rebooted as its round closed.
        assert record["clients_rejected"] == record["late_updates"], record
    # Board 0 slept through round SLEPT: the round closed at its deadline, in its one attempt, with the
    # updates of the others (min_fit 2); board 0 was asked but not counted, and sent nothing late.
    slept = records[SLEPT - 1]
    assert (slept["clients_selected"], slept["clients_answered"], slept["attempts"]) == (CLIENTS + 1, CLIENTS, 1)
    assert slept["num_examples"] == (CLIENTS - 1) * EXAMPLES + 1, slept
    assert not [a for c, a in watcher.acks if c == ids[0] and a.round == SLEPT], "board 0 sent an update late"
    assert watcher.accepted(ids[0], SLEPT + 1), "board 0 took part again in the round after"
    board_log = boards[0].log_path.read_text()
    assert f"round {SLEPT}: training on" not in board_log, "board 0 trained a round whose deadline had passed"

    # The faulty run learned what the clean run did: the same model until board 0's reboot in round 3
    # (from round 4 on a rebooted board shuffles anew), and the final accuracy within 1 point.
    for faulty, clean in zip(records[:3], clean_run[:3], strict=True):
        assert faulty["test_loss"] == pytest.approx(clean["test_loss"], abs=1e-6), (faulty, clean)
        assert faulty["test_accuracy"] == clean["test_accuracy"], (faulty, clean)
    faulty_accuracy, clean_accuracy = ([r["test_accuracy"] for r in run] for run in (records, clean_run))
    assert abs(faulty_accuracy[-1] - clean_accuracy[-1]) <= TOLERANCE, (
        f"faulty {faulty_accuracy}, clean {clean_accuracy}"
    )

    coordinator_log = federation.log_path.read_text()
    assert "publishing the model, the global weights and the round again" in coordinator_log
    assert "resuming run" in coordinator_log
    assert "restored the acknowledged update of round 3" in board_log, board_log[-4000:]
    assert "asked again for the update already acknowledged" in board_log, board_log[-4000:]
    for board in boards:
        assert "Traceback" not in board.log_path.read_text(), board.log_path.read_text()[-3000:]
    assert boards[1].process.returncode == 0, "the board that booted while the broker was down ran on"


def _inflict_faults(federation: Federation) -> None:
    """Rounds 1 to ROUNDS, each with its faults; the coordinator then ends the run by itself."""
    watcher, broker, boards, ids = federation.watcher, federation.broker, federation.boards, federation.ids
    watcher.hold_round(watcher.wait_round(1))  # a clean round first

    # Round 2: Mosquitto restarts without persistence, after the boards answered.
    ann = watcher.wait_round(2)
    watcher.wait_accepted(ids, 2)
    broker.stop()
    broker.start(persistent=True)  # comes back empty; persistent from now on, for round 4
    retained = [watcher.topics.model_meta, watcher.topics.global_chunk(0), watcher.topics.round]
    _wait(lambda: _retained(broker.url, retained) == set(retained), "the coordinator to republish")
    watcher.hold_round(ann)

    # Round 3: the coordinator is killed after accepting the boards' updates, and restarted
    # from its checkpoint; board 0 is killed and restarted meanwhile. Their updates are lost
    # with the coordinator: the boards send them again, board 0 from its state directory.
    ann = watcher.wait_round(3)
    watcher.wait_accepted(ids, 3)
    _kill(federation.coordinators[0])
    _wait(lambda: (_progress(boards[0]).get("answered") or {}).get("round") == 3, "board 0's kept update")
    federation.restart_board(0)
    federation.start_coordinator()
    watcher.hold_round(watcher.wait_round(3, after=ann.deadline))

    # Round 4: Mosquitto restarts with persistence, after the boards answered; board 1 reboots
    # while it is down, and waits for it instead of exiting.
    ann = watcher.wait_round(4)
    watcher.wait_accepted(ids, 4)
    broker.stop()
    federation.restart_board(1)
    _wait(lambda: "retrying (attempt 1" in boards[1].log_path.read_text(), "board 1 to retry the broker")
    broker.start(persistent=True)
    watcher.hold_round(ann)

    # Round 5: board 2 is killed as the round is announced (before or after it answered) and restarted.
    # Once board 0 answered, it falls asleep: round SLEPT = 6 is announced to it, connected and online.
    ann = watcher.wait_round(5)
    federation.restart_board(2)
    watcher.wait_accepted(ids, 5)
    federation.sleep(0)
    watcher.hold_round(ann)

    # Round 6: the others answer, then the round waits for board 0 until its deadline; board 0
    # wakes only after the coordinator closed the round, and goes on by itself.
    ann = watcher.wait_round(SLEPT)
    watcher.wait_accepted(ids[1:], SLEPT)
    watcher.hold_round(ann)
    _wait(lambda: federation.rounds_closed() == SLEPT, f"round {SLEPT} to close", timeout=ROUND_TIMEOUT + WAIT)
    assert time.time() >= ann.deadline, "the coordinator closed the round before its deadline"
    federation.wake(0)

    # Round 7: every board answers again, board 0 too.
    federation.clean_round(SLEPT + 1)
