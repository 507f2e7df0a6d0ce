"""The provisioned fleet against a real Mosquitto started with the generated mosquitto.conf.

The configuration is used as written, but for the listener bound to 127.0.0.1
(it listens on every interface for real boards), a log file, and ``user root``
when the tests run as root (Mosquitto would otherwise switch to its own user,
which cannot read the 0600 keys in the test's folder). Identities are the
generated certificates (and, in one test, the generated passwords): a publish
the ACL forbids is acknowledged and dropped by the broker, so each check ends
with a sentinel the reader may receive, and asserts that the sentinel is all
that came.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import find_mosquitto, free_port
from coordinator.cli.emulate import ClientProcess, stop_clients
from coordinator.metrics import read_jsonl
from coordinator.provision import coordinator_identity, plan, provision
from edge_client.config import load_config
from edge_client.errors import BrokerAuthError, BrokerUnavailable, SubscribeFailed
from edge_client.mqtt import BrokerUrl, MqttTransport
from edge_client.signing import SigningKey
from edge_client.topics import Topics
from tests.helpers import REPO_ROOT, separable_binary_data, stop_process
from tests.integration.test_mqtt import collect_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FEDERATION = "secure"
BOARDS = ("pi-a", "pi-b")
COORDINATOR = coordinator_identity(FEDERATION)
TOPICS = Topics(FEDERATION)
WAIT = 5.0  # upper bound of every wait for a message; the checks pass in milliseconds


@dataclass(frozen=True)
class Fleet:
    out: Path
    url: str

    def broker_url(self, identity: str | None) -> BrokerUrl:
        """``url`` with the CA and, unless None, the identity's certificate and key."""
        if identity is None:
            return BrokerUrl.parse(self.url, ca_file=self.out / "ca/ca.pem")
        folder, name = (
            (self.out / "coordinator", "coordinator")
            if identity == COORDINATOR
            else (self.out / "boards" / identity, "client")
        )
        return BrokerUrl.parse(
            self.url, ca_file=folder / "ca.pem", cert_file=folder / f"{name}.crt", key_file=folder / f"{name}.key"
        )


def _broker_config(fleet: Path, log_file: Path) -> str:
    text = (fleet / "mosquitto/mosquitto.conf").read_text()
    text, listeners = re.subn(r"(?m)^listener (\d+)$", r"listener \1 127.0.0.1", text)
    assert listeners >= 1, text
    extra = ["persistence false", f"log_dest file {log_file}", *(["user root"] if os.geteuid() == 0 else [])]
    return text + "\n".join(extra) + "\n"


@contextlib.contextmanager
def _mosquitto(out: Path) -> Iterator[None]:
    """Mosquitto with ``out``'s generated configuration, bound to 127.0.0.1, until the block ends."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is not installed; run scripts/setup.sh --dev")
    log_file = out.parent / "mosquitto.log"
    config = out.parent / "mosquitto.conf"
    config.write_text(_broker_config(out, log_file))
    with (out.parent / "mosquitto.out").open("wb") as output:
        broker = subprocess.Popen([str(binary), "-c", str(config)], stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 10
        while " running" not in (log_file.read_text() if log_file.is_file() else ""):
            if broker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start with the generated configuration:\n{_tail(out.parent)}")
            time.sleep(0.02)
        yield
    finally:
        stop_process(broker)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    out = tmp_path_factory.mktemp("provisioned") / "fleet"
    port = free_port()
    provision(out, plan(out, devices=BOARDS, federation=FEDERATION, port=port))  # boards' URL: 127.0.0.1:port
    with _mosquitto(out):
        yield Fleet(out, f"mqtts://127.0.0.1:{port}")


def _tail(directory: Path) -> str:
    return "\n".join(
        (directory / name).read_text(errors="replace")[-2000:]
        for name in ("mosquitto.out", "mosquitto.log")
        if (directory / name).is_file()
    )


@pytest.fixture
def connect(fleet) -> Iterator:
    """``connect(identity, *patterns)``: a connected transport with that identity, closed at teardown."""
    made: list[MqttTransport] = []

    def make(identity: str, *patterns: str) -> MqttTransport:
        # The broker replaces the client id with the certificate's CN: one connection per identity at a time.
        transport = MqttTransport(fleet.broker_url(identity), identity)
        made.append(transport)
        transport.connect(timeout=WAIT)
        for pattern in patterns:
            transport.subscribe(pattern)
        return transport

    yield make
    for transport in made:
        transport.close()


# -- who may connect ------------------------------------------------------------------------


def test_a_client_without_a_certificate_is_refused(fleet):
    no_cert = MqttTransport(fleet.broker_url(None), "anonymous")
    with pytest.raises(BrokerUnavailable, match="client certificate"):
        no_cert.connect(timeout=WAIT)
    plain = MqttTransport(fleet.url.replace("mqtts://", "mqtt://"), "plain")
    with pytest.raises(BrokerUnavailable):
        plain.connect(timeout=WAIT)


def test_a_certificate_from_another_ca_is_refused_even_with_a_provisioned_name(fleet, tmp_path):
    rogue = tmp_path / "rogue"
    provision(rogue, plan(rogue, devices=["pi-a"], federation=FEDERATION))  # same names, its own CA
    url = BrokerUrl.parse(
        fleet.url,
        ca_file=fleet.out / "ca/ca.pem",  # it trusts the real broker...
        cert_file=rogue / "boards/pi-a/client.crt",  # ...but presents a certificate the fleet's CA did not sign
        key_file=rogue / "boards/pi-a/client.key",
    )
    with pytest.raises(BrokerUnavailable):
        MqttTransport(url, "pi-a").connect(timeout=WAIT)


# -- what a board may write and read ------------------------------------------------------


FORGED = [  # (topic, retained): every topic of the other board and of the coordinator
    (TOPICS.update("pi-b"), False),
    (TOPICS.presence("pi-b"), True),
    (TOPICS.model_meta, True),
    (TOPICS.model_chunk(0), True),
    (TOPICS.global_chunk(0), True),
    (TOPICS.round, True),
    (TOPICS.ack("pi-b"), False),
]
BOARD_READS = (TOPICS.model_meta, TOPICS.model_chunks, TOPICS.global_chunks, TOPICS.round)


def test_a_board_cannot_write_another_boards_topics_or_the_coordinators(connect):
    coordinator = connect(COORDINATOR, TOPICS.updates, TOPICS.presences)
    other = connect("pi-b", *BOARD_READS, TOPICS.ack("pi-b"))
    attacker = connect("pi-a")
    for topic, retain in FORGED:
        attacker.publish(topic, b"forged by pi-a", retain=retain)  # acknowledged, and dropped
    attacker.publish(TOPICS.update("pi-a"), b"sentinel")  # its own topic: delivered, after the forged ones
    got = collect_until(coordinator, TOPICS.update("pi-a"), WAIT)
    assert [(m.topic, m.payload) for m in got] == [(TOPICS.update("pi-a"), b"sentinel")]
    coordinator.publish(TOPICS.ack("pi-b"), b"sentinel")
    got = collect_until(other, TOPICS.ack("pi-b"), WAIT)
    assert [(m.topic, m.payload) for m in got] == [(TOPICS.ack("pi-b"), b"sentinel")]
    other.close()
    # Nothing forged was retained either: a board connecting now gets only the coordinator's retained round.
    coordinator.publish(TOPICS.round, b"the real round", retain=True)
    try:
        late = connect("pi-b", *BOARD_READS)
        got = collect_until(late, TOPICS.round, WAIT)
        assert [(m.topic, m.payload) for m in got] == [(TOPICS.round, b"the real round")]
    finally:
        coordinator.publish(TOPICS.round, b"", retain=True)  # clears it for the other tests


def test_a_board_cannot_read_another_boards_updates(connect):
    coordinator = connect(COORDINATOR, TOPICS.updates)
    attacker = connect("pi-a", TOPICS.ack("pi-a"))
    for pattern in (TOPICS.update("pi-b"), TOPICS.updates, TOPICS.presences, f"{TOPICS.base}/#", "#"):
        # Mosquitto grants the subscription and filters each delivery by the ACL; refusing it is fine too.
        with contextlib.suppress(SubscribeFailed):
            attacker.subscribe(pattern)
    honest = connect("pi-b")
    honest.publish(TOPICS.update("pi-b"), b"pi-b's update")
    honest.publish(TOPICS.presence("pi-b"), b"pi-b's presence")
    got = collect_until(coordinator, TOPICS.update("pi-b"), WAIT)  # it was published, and reached its reader
    assert [m.payload for m in got] == [b"pi-b's update"]
    coordinator.publish(TOPICS.ack("pi-a"), b"sentinel")
    got = collect_until(attacker, TOPICS.ack("pi-a"), WAIT)
    assert [(m.topic, m.payload) for m in got] == [(TOPICS.ack("pi-a"), b"sentinel")]


# -- passwords instead of board certificates ---------------------------------------------


def test_boards_with_passwords_log_in_on_their_listener_with_the_same_acl(tmp_path):
    out = tmp_path / "fleet"
    port, password_port = free_port(), free_port()
    provision(out, plan(out, devices=BOARDS, federation=FEDERATION, port=port, password_port=password_port))
    board = load_config(out / "boards/pi-a/client.toml", require_data=False).broker()
    folder = out / "coordinator"
    coordinator_url = BrokerUrl.parse(
        f"mqtts://127.0.0.1:{port}",
        ca_file=folder / "ca.pem",
        cert_file=folder / "coordinator.crt",
        key_file=folder / "coordinator.key",
    )
    made: list[MqttTransport] = []
    with _mosquitto(out):
        try:
            coordinator = MqttTransport(coordinator_url, COORDINATOR)
            attacker = MqttTransport(board, "pi-a")  # the URL in its client.toml: its login, the password port
            made += [coordinator, attacker]
            coordinator.connect(timeout=WAIT)
            coordinator.subscribe(TOPICS.updates)
            attacker.connect(timeout=WAIT)
            attacker.publish(TOPICS.update("pi-b"), b"forged by pi-a")
            attacker.publish(TOPICS.update("pi-a"), b"sentinel")
            got = collect_until(coordinator, TOPICS.update("pi-a"), WAIT)
            assert [(m.topic, m.payload) for m in got] == [(TOPICS.update("pi-a"), b"sentinel")]
            wrong = BrokerUrl.parse(board.geturl(redact=True).replace("***", "wrong"), ca_file=board.ca_file)
            with pytest.raises(BrokerAuthError):
                MqttTransport(wrong, "pi-a").connect(timeout=WAIT)
            on_the_certificate_port = BrokerUrl.parse(
                board.geturl(redact=False).replace(f":{password_port}", f":{port}"), ca_file=board.ca_file
            )
            with pytest.raises(BrokerUnavailable):  # no certificate: refused in the TLS handshake
                MqttTransport(on_the_certificate_port, "pi-a").connect(timeout=WAIT)
        finally:
            for transport in made:
                transport.close()


# -- a federation over TLS ----------------------------------------------------------------


def test_the_coordinator_and_two_provisioned_boards_run_a_federation_over_tls(fleet, tabular, tmp_path):
    """litefed-client processes with the generated client.toml, and litefed-coordinator through coordinator.sh."""
    x, y = separable_binary_data(240, seed=3)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO_ROOT),
        # coordinator.sh runs the litefed-coordinator console script: the one installed next to this Python.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    clients = []
    try:
        for index, board in enumerate(BOARDS):
            data = tmp_path / f"{board}.npz"
            np.savez(data, x=x[index::2], y=y[index::2])
            log_path = tmp_path / f"{board}.log"
            argv = [sys.executable, "-m", "edge_client", "--config", str(fleet.out / "boards" / board / "client.toml"),
                    "--data", f"npz:{data}", "--state-dir", str(tmp_path / f"state-{board}")]  # fmt: skip
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            clients.append(ClientProcess(board, process, log_path))
        script = fleet.out / "coordinator/coordinator.sh"
        argv = [str(script), "--model", str(tabular.model_path), "--rounds", "2", "--min-fit", "2",
                "--min-available", "2", "--epochs", "1", "--lr", "0.05", "--round-timeout", "60",
                "--wait-for-clients", "60", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=100)
        logs = "\n".join(c.log_path.read_text()[-1500:] for c in clients)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + logs
        records = read_jsonl(tmp_path / "run/metrics.jsonl")
        assert [r["round"] for r in records] == [1, 2]
        assert all(r["clients_answered"] == 2 and r["clients_rejected"] == 0 for r in records), records
        key_id = SigningKey.load(fleet.out / "coordinator/signing.key").trust_key.key_id
        assert f"signing the model, global weights and rounds with key {key_id}" in done.stderr + done.stdout
    finally:
        stop_clients(clients, timeout=10)
    for c in clients:
        text = c.log_path.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert f"client {c.client_id!r} started in federation {FEDERATION!r}" in text, text[-3000:]
        assert "unsigned" not in text and "ignored a message" not in text, text[-3000:]  # it trusted what it got
