"""``litefed-emulate`` runs on provisioned identities by default: TLS, client certificates and the ACL.

The emulation runs as a command (the small tabular model, 3 clients, 2
rounds): every client and the coordinator connect over ``mqtts://`` with
their certificate from ``OUT/provision``. The broker it starts is then
started again, by the same functions, from the same ``OUT/provision``: its
configuration requires a certificate and applies the ACL, and a client's
identity cannot publish on another client's update topic (the forged publish
is acknowledged and dropped, so the check ends with a sentinel and asserts
that the sentinel is all that came). ``--insecure`` still runs anonymous over
plain TCP, and without mosquitto the emulation says to install it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import EmbeddedBroker, find_mosquitto
from coordinator.cli import emulate
from coordinator.cli.settings import EmulateSettings
from coordinator.metrics import read_jsonl
from coordinator.provision import ProvisionResult, coordinator_identity
from edge_client.config import load_config
from edge_client.errors import BrokerUnavailable
from edge_client.mqtt import BrokerUrl, MqttTransport
from edge_client.signing import SigningKey
from edge_client.topics import Topics
from tests.helpers import REPO_ROOT, separable_binary_data
from tests.integration.test_mqtt import collect_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLIENTS = 3
ROUNDS = 2
FEDERATION = "default"
TOPICS = Topics(FEDERATION)
WAIT = 5.0  # upper bound of every wait for a message; the checks pass in milliseconds


def _emulate(tabular, tmp_path: Path, *extra: str, clients: int = CLIENTS, rounds: int = ROUNDS):
    """``litefed-emulate`` as a command on the tabular model; returns (its result, its --out)."""
    data = tmp_path / "data.npz"
    x, y = separable_binary_data(clients * 120, seed=4)
    np.savez(data, x=x, y=y)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "coordinator.cli.emulate", "--model", str(tabular.model_path), "--data", str(data),
            "--clients", str(clients), "--rounds", str(rounds), "--lr", "0.05", "--round-timeout", "60",
            "--out", str(out), "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(r["clients_answered"] == clients and r["clients_rejected"] == 0 for r in records), records
    return result, out


@pytest.fixture(scope="module")
def secure_run(tabular, tmp_path_factory):
    """The default emulation (no --broker, no --insecure), run once for the tests below."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; run scripts/setup.sh --dev")
    return _emulate(tabular, tmp_path_factory.mktemp("secure"))


def test_the_default_emulation_runs_every_round_over_tls_with_certificates(secure_run):
    result, out = secure_run
    provisioned = out / emulate.PROVISION_DIR
    said = "on provisioned identities (TLS with client certificates, the topic ACL); their files are in"
    assert f"{said} {provisioned}" in result.stderr
    assert "INSECURE" not in result.stderr
    coordinator = coordinator_identity(FEDERATION)
    connected = [line for line in result.stderr.splitlines() if "connected to mqtts://127.0.0.1:" in line]
    assert any(line.endswith(f" as {coordinator!r}") for line in connected), result.stderr[-3000:]
    for client in emulate.client_ids(CLIENTS):
        folder = out / "clients" / client
        url = load_config(folder / "client.toml").broker()
        assert url.tls and url.host == "127.0.0.1"
        assert url.cert_file is not None and url.key_file is not None
        own = (provisioned / "boards" / client).resolve()  # its own identity
        assert (url.cert_file.resolve(), url.key_file.resolve()) == (own / "client.crt", own / "client.key")
        log_text = (folder / "client.log").read_text()
        assert f"connected to mqtts://127.0.0.1:{url.port} as {client!r}" in log_text, log_text[-2000:]
        assert "Traceback" not in log_text and "ignored a message" not in log_text, log_text[-2000:]
        trust = load_config(folder / "client.toml").trust_key  # it acts only on what the coordinator signed
        assert trust is not None and trust.resolve() == own / "coordinator.pub"
        assert set(json.loads((folder / "state" / "issued.json").read_text())) == {"model_meta", "global", "round"}
    key_id = SigningKey.load(provisioned / "coordinator" / "signing.key").trust_key.key_id
    assert f"signing the model, global weights and rounds with key {key_id}" in result.stderr
    assert "publishing unsigned" not in result.stderr
    conf = (provisioned / "mosquitto/mosquitto.conf").read_text()
    assert "require_certificate true" in conf and f"acl_file {provisioned.resolve()}/mosquitto/acl" in conf
    acl = (provisioned / "mosquitto/acl").read_text()
    assert all(f"user {client}\ntopic write {TOPICS.update(client)}\n" in acl for client in emulate.client_ids(CLIENTS))


@pytest.fixture
def emulation_broker(secure_run) -> Iterator[tuple[EmbeddedBroker, ProvisionResult]]:
    """The emulation's broker, started again by the emulation's functions from the run's ``OUT/provision``."""
    _, out = secure_run
    folder = out / emulate.PROVISION_DIR
    key = (folder / "boards/client-000/client.key").read_bytes()
    fleet = emulate.provision_fleet(folder, emulate.client_ids(CLIENTS), FEDERATION, "litefed")
    assert (folder / "boards/client-000/client.key").read_bytes() == key  # a re-run keeps every identity
    with emulate.secure_broker(fleet) as broker:
        yield broker, fleet


def test_the_emulation_broker_requires_certificates_and_applies_the_acl(emulation_broker):
    broker, fleet = emulation_broker
    assert broker.url.startswith("mqtts://127.0.0.1:")
    served = (broker.tempdir / "mosquitto.conf").read_text()
    assert f"listener {broker.port} 127.0.0.1\n" in served
    for setting in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false", "acl_file "):
        assert setting in served, served
    made: list[MqttTransport] = []

    def connect(identity: str, *patterns: str) -> MqttTransport:
        transport = MqttTransport(BrokerUrl.parse(broker.url, **fleet.tls_files(identity)), identity)
        made.append(transport)
        transport.connect(timeout=WAIT)
        for pattern in patterns:
            transport.subscribe(pattern)
        return transport

    try:
        no_certificate = MqttTransport(BrokerUrl.parse(broker.url, ca_file=fleet.tls_files("client-000")["ca_file"]),
                                       "client-000")  # fmt: skip
        with pytest.raises(BrokerUnavailable):
            no_certificate.connect(timeout=WAIT)
        coordinator = connect(fleet.spec.coordinator, TOPICS.updates)
        attacker = connect("client-000")
        attacker.publish(TOPICS.update("client-001"), b"forged by client-000")  # acknowledged, and dropped
        attacker.publish(TOPICS.update("client-000"), b"sentinel")  # its own topic: delivered, after the forged one
        got = collect_until(coordinator, TOPICS.update("client-000"), WAIT)
        assert [(m.topic, m.payload) for m in got] == [(TOPICS.update("client-000"), b"sentinel")]
    finally:
        for transport in made:
            transport.close()


def test_insecure_emulation_runs_anonymous_over_plain_tcp(tabular, tmp_path):
    result, out = _emulate(tabular, tmp_path, "--insecure", clients=2, rounds=1)
    assert "INSECURE emulation (--insecure): anonymous clients over plain TCP" in result.stderr
    assert not (out / emulate.PROVISION_DIR).exists()
    for client in emulate.client_ids(2):
        url = load_config(out / "clients" / client / "client.toml").broker()
        assert not url.tls and url.cert_file is None


def _settings(*argv: str) -> EmulateSettings:
    return EmulateSettings.from_args(emulate.build_parser().parse_args(list(argv)))


def test_without_mosquitto_the_emulation_says_to_install_it(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="litefed.emulate")
    monkeypatch.setattr("coordinator.broker.find_mosquitto", lambda: Path("/usr/sbin/mosquitto"))
    assert emulate.runs_secure(_settings())
    assert emulate.runs_secure(_settings("--broker", "mosquitto"))
    assert not caplog.records
    monkeypatch.setattr("coordinator.broker.find_mosquitto", lambda: None)
    assert not emulate.runs_secure(_settings())
    assert not emulate.runs_secure(_settings("--broker", "amqtt"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("INSECURE" in m and "install mosquitto" in m for m in messages), messages
    assert "mosquitto is not installed" in messages[0] and "--broker amqtt" in messages[1]


def test_insecure_is_refused_with_a_running_broker(capsys):
    assert emulate.main(["--insecure", "--broker", "mqtt://127.0.0.1:1883"]) == 2
    assert "--insecure applies to the embedded broker" in capsys.readouterr().err
