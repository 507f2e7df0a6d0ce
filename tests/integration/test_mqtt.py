"""MqttTransport against real brokers: mosquitto and amqtt on 127.0.0.1."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import EmbeddedBroker, find_mosquitto, free_port
from edge_client.errors import BrokerAuthError, BrokerDown, BrokerUnavailable, PayloadTooLarge, PublishFailed
from edge_client.mqtt import Backoff, BrokerUrl, MqttTransport
from edge_client.transport import Message
from tests.helpers import stop_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = 5.0  # upper bound of every wait for a message; tests pass in milliseconds


def collect(transport: MqttTransport, count: int, timeout: float = WAIT) -> list[Message]:
    """Up to ``count`` messages, giving up ``timeout`` seconds from now."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and (remaining := deadline - time.monotonic()) > 0:
        message = transport.receive(remaining)
        if message is None:
            break
        out.append(message)
    return out


def collect_until(transport: MqttTransport, topic: str, timeout: float = WAIT, limit: int = 100) -> list[Message]:
    """Messages up to and including the first one on ``topic`` (a sentinel); fails if it never comes."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < limit and (remaining := deadline - time.monotonic()) > 0:
        message = transport.receive(remaining)
        if message is None:
            break
        out.append(message)
        if message.topic == topic:
            return out
    raise AssertionError(f"no message on {topic} within {timeout} s; got {out}")


def test_round_trip_with_wildcards_and_binary_payloads(broker_url, mqtt_client, prefix):
    sub = mqtt_client(broker_url, "sub")
    pub = mqtt_client(broker_url, "pub")
    sub.subscribe(f"{prefix}/+/update")
    sub.subscribe(f"{prefix}/done")
    sent = [(f"{prefix}/c1/update", bytes(range(256))), (f"{prefix}/c2/update", b"")]
    pub.publish(*sent[0])
    pub.publish(f"{prefix}/c1/other", b"not for sub")
    pub.publish(*sent[1])
    pub.publish(f"{prefix}/done", b"")
    got = collect_until(sub, f"{prefix}/done")
    assert got == [Message(topic, payload) for topic, payload in sent] + [Message(f"{prefix}/done", b"")]
    assert sub.connected and sub.dropped_messages == 0


def test_publish_many_delivers_a_long_transfer_in_order(broker_url, mqtt_client, prefix):
    """More chunks than the in-flight window and than paho's queue cap, each acknowledged."""
    sub = mqtt_client(broker_url, "sub")
    pub = mqtt_client(broker_url, "pub")
    sub.subscribe(f"{prefix}/bulk")
    payloads = [i.to_bytes(4, "little") * 2000 for i in range(100)]
    pub.publish_many([Message(f"{prefix}/bulk", p) for p in payloads])
    got = []
    end = time.monotonic() + 20
    while len(got) < len(payloads) and time.monotonic() < end:
        message = sub.receive(timeout=0.5)
        if message is not None:
            got.append(message.payload)
    assert got == payloads


def test_patterns_given_before_connect_are_active_when_connect_returns(broker_url, mqtt_client, prefix):
    pub = mqtt_client(broker_url, "pub")
    pub.publish(f"{prefix}/state", b"retained", retain=True)
    sub = mqtt_client(broker_url, "sub", connect=False)
    sub.subscribe(f"{prefix}/#")
    assert not sub.connected
    sub.connect(timeout=5)
    pub.publish(f"{prefix}/live", b"live")
    assert collect(sub, 2) == [Message(f"{prefix}/state", b"retained", retain=True), Message(f"{prefix}/live", b"live")]
    pub.publish(f"{prefix}/state", b"", retain=True)


def test_retained_message_reaches_a_late_subscriber(broker_url, mqtt_client, prefix):
    pub = mqtt_client(broker_url, "pub")
    pub.publish(f"{prefix}/round", b"7", retain=True)
    late = mqtt_client(broker_url, "late")
    late.subscribe(f"{prefix}/#")
    assert collect(late, 1) == [Message(f"{prefix}/round", b"7", retain=True)]
    # An empty retained payload clears it: a later subscriber gets only the sentinel.
    pub.publish(f"{prefix}/round", b"", retain=True)
    later = mqtt_client(broker_url, "later")
    later.subscribe(f"{prefix}/#")
    pub.publish(f"{prefix}/sentinel", b"")
    assert collect_until(later, f"{prefix}/sentinel") == [Message(f"{prefix}/sentinel", b"")]


_CHILD = """
import sys, time
from edge_client.mqtt import MqttTransport
from edge_client.transport import Message
t = MqttTransport(sys.argv[1], sys.argv[2], will=Message(sys.argv[3], b"offline", retain=True))
t.connect(timeout=5)
print("connected", flush=True)
time.sleep(60)
"""


def _spawn_client_with_will(url: str, client_id: str, will_topic: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, client_id, will_topic],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
        text=True,
    )
    ready, _, _ = select.select([child.stdout], [], [], 20)
    line = child.stdout.readline() if ready else ""
    if line.strip() != "connected":
        child.kill()
        _, err = child.communicate(timeout=5)
        raise AssertionError(f"the client process did not connect: {line!r}\n{err}")
    return child


def test_will_is_published_retained_when_the_client_process_is_killed(broker_url, mqtt_client, prefix):
    will_topic = f"{prefix}/presence/pi"
    watcher = mqtt_client(broker_url, "watcher")
    watcher.subscribe(f"{prefix}/presence/+")
    child = _spawn_client_with_will(broker_url, f"pi-{prefix[-8:]}", will_topic)
    try:
        child.kill()  # SIGKILL: no DISCONNECT packet, as on a power loss
        child.wait(5)
    finally:
        child.stdout.close()
        child.stderr.close()
    assert collect(watcher, 1) == [Message(will_topic, b"offline")]
    late = mqtt_client(broker_url, "late")
    late.subscribe(will_topic)
    assert collect(late, 1) == [Message(will_topic, b"offline", retain=True)]
    watcher.publish(will_topic, b"", retain=True)  # leave the session broker clean


def test_will_is_not_published_on_clean_close(broker_url, mqtt_client, prefix):
    will_topic = f"{prefix}/presence/pi"
    watcher = mqtt_client(broker_url, "watcher")
    watcher.subscribe(f"{prefix}/#")
    pi = mqtt_client(broker_url, "pi", will=Message(will_topic, b"offline", retain=True))
    pi.close()
    assert not pi.connected
    # The broker handled the DISCONNECT before this later publish, so a will would come first.
    watcher.publish(f"{prefix}/sentinel", b"")
    assert [m.topic for m in collect_until(watcher, f"{prefix}/sentinel")] == [f"{prefix}/sentinel"]
    late = mqtt_client(broker_url, "late")
    late.subscribe(f"{prefix}/presence/+")
    late.subscribe(f"{prefix}/sentinel2")
    watcher.publish(f"{prefix}/sentinel2", b"")
    assert [m.topic for m in collect_until(late, f"{prefix}/sentinel2")] == [f"{prefix}/sentinel2"]


def test_payload_over_max_payload_raises_and_the_limit_itself_passes(broker_url, mqtt_client, prefix):
    client = mqtt_client(broker_url, "c", max_payload=1024)
    client.subscribe(f"{prefix}/t")
    with pytest.raises(PayloadTooLarge, match="max_payload=1024"):
        client.publish(f"{prefix}/t", b"x" * 1025)
    client.publish(f"{prefix}/t", b"x" * 1024)
    assert collect(client, 1) == [Message(f"{prefix}/t", b"x" * 1024)]


def test_slow_consumer_keeps_the_newest_messages(broker_url, mqtt_client, prefix):
    slow = mqtt_client(broker_url, "slow", queue_size=5)
    slow.subscribe(f"{prefix}/t")
    pub = mqtt_client(broker_url, "pub")
    for i in range(20):
        pub.publish(f"{prefix}/t", str(i).encode())
    deadline = time.monotonic() + WAIT
    while slow.dropped_messages < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow.dropped_messages == 15
    assert [m.payload for m in collect(slow, 5)] == [str(i).encode() for i in range(15, 20)]


def test_mqtt5_round_trip(mosquitto_broker, mqtt_client, prefix):
    sub = mqtt_client(mosquitto_broker.url, "sub5", protocol="5")
    pub = mqtt_client(mosquitto_broker.url, "pub5", protocol="5")
    sub.subscribe(f"{prefix}/#")
    pub.publish(f"{prefix}/a", b"v5", retain=True)
    assert collect(sub, 1) == [Message(f"{prefix}/a", b"v5")]
    pub.publish(f"{prefix}/a", b"", retain=True)


def test_connecting_to_a_closed_port_raises_broker_unavailable():
    url = f"mqtt://127.0.0.1:{free_port()}"
    transport = MqttTransport(url, "nobody")
    with pytest.raises(BrokerUnavailable, match="(?s)cannot reach.*127.0.0.1.*refused.*Check that the broker"):
        transport.connect(timeout=2)
    assert not transport.connected
    transport.close()


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_refused_connection_is_a_broker_auth_error(kind):
    with EmbeddedBroker(kind, allow_anonymous=False) as broker:
        transport = MqttTransport(broker.url, "anonymous")
        with pytest.raises(BrokerAuthError, match="(?s)refused the connection.*user name and password"):
            transport.connect(timeout=5)
        transport.close()


def test_reconnects_and_resubscribes_after_the_broker_restarts(mqtt_client, prefix):
    first = EmbeddedBroker("mosquitto")
    url = first.start()
    port = first.port
    try:
        client = mqtt_client(url, "pi", backoff=Backoff(initial=0.05, maximum=0.2))
        client.subscribe(f"{prefix}/#")
    finally:
        first.stop()
    assert _wait_disconnected(client), "the client did not notice the broker stopping"
    with pytest.raises(PublishFailed, match="not connected"):
        client.publish(f"{prefix}/x", b"", timeout=0.1)
    with EmbeddedBroker("mosquitto", port=port) as second:
        assert client.wait_connected(WAIT), "no reconnection within the wait"
        assert client.reconnections == 1
        other = mqtt_client(second.url, "coordinator")
        other.publish(f"{prefix}/round", b"after restart")
        assert collect(client, 1) == [Message(f"{prefix}/round", b"after restart")]
        client.publish(f"{prefix}/update", b"from pi")  # publishing works again too
        assert collect(client, 1) == [Message(f"{prefix}/update", b"from pi")]
        client.close()  # before the broker goes: closing mid-backoff waits out paho's sleep slice
        other.close()


def test_the_birth_message_comes_back_with_every_connection(mqtt_client, prefix):
    """A board's presence after a broker restart: Mosquitto publishes the will as it shuts down, then forgets it."""
    topic = f"{prefix}/presence/pi"
    will, birth = Message(topic, b"offline", retain=True), Message(topic, b"online", retain=True)
    first = EmbeddedBroker("mosquitto")
    url = first.start()
    port = first.port
    backoff = Backoff(initial=0.05, maximum=0.2)
    try:
        watcher = mqtt_client(url, "watcher", backoff=backoff)
        watcher.subscribe(f"{prefix}/presence/+")
        pi = mqtt_client(url, "pi", will=will, birth=birth, backoff=backoff)
        assert collect(watcher, 1) == [Message(topic, b"online")]
    finally:
        first.stop()
    # The board never calls receive() (busy training): its transport answers by itself.
    with EmbeddedBroker("mosquitto", port=port) as second:
        assert pi.wait_connected(WAIT) and watcher.wait_connected(WAIT)
        # Live, or replayed as retained if the watcher subscribed again only after pi's reconnection.
        said = collect_until(watcher, topic)
        while said[-1].payload == b"offline":  # the will, published as the first broker shut down
            said = collect_until(watcher, topic)
        assert said[-1].payload == b"online", "said online again after the reconnection"
        late = mqtt_client(second.url, "late")
        late.subscribe(topic)
        assert collect(late, 1) == [Message(topic, b"online", retain=True)]
        late.publish(topic, b"", retain=True)
        for transport in (pi, watcher, late):
            transport.close()  # before the broker goes: closing mid-backoff waits out paho's sleep slice


def test_a_first_connection_can_be_retried_until_the_broker_is_up(mqtt_client, prefix):
    port = free_port()
    topic = f"{prefix}/presence/pi"
    pi = MqttTransport(f"mqtt://127.0.0.1:{port}", "pi", birth=Message(topic, b"online", retain=True))
    pi.subscribe(f"{prefix}/round")
    try:
        for _ in range(2):  # a board that boots before its broker
            with pytest.raises(BrokerDown, match="cannot reach"):
                pi.connect(timeout=2)
        with EmbeddedBroker("mosquitto", port=port) as broker:
            pi.connect(timeout=5)
            assert pi.connected and pi.reconnections == 0
            other = mqtt_client(broker.url, "coordinator")
            other.subscribe(topic)
            assert collect(other, 1) == [Message(topic, b"online", retain=True)]
            other.publish(f"{prefix}/round", b"3")
            assert collect(pi, 1) == [Message(f"{prefix}/round", b"3")], "subscribed as asked before connecting"
            pi.close()
            other.close()
    finally:
        pi.close()


def _wait_disconnected(client: MqttTransport) -> bool:
    deadline = time.monotonic() + WAIT
    while client.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    return not client.connected


# -- TLS ------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (P-256 keys: fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca"]
    _openssl("req", "-x509", *ec, *ca, cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        sign = ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
        _openssl(*sign, "-out", f"{name}.pem", "-days", "1", *extra, cwd=directory)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """``(mqtts URL, certificate directory)`` of a mosquitto that requires client certificates."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command to make their certificates; run scripts/setup.sh --dev")
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is not installed; run scripts/setup.sh --dev")
    certs = tmp_path_factory.mktemp("tls")
    _make_certificates(certs)
    port = free_port()
    config = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        f"cafile {certs / 'ca.pem'}",
        f"certfile {certs / 'server.pem'}",
        f"keyfile {certs / 'server.key'}",
        "require_certificate true",
        *(["user root"] if os.geteuid() == 0 else []),  # else it cannot read the keys in tmp_path
    ]
    (certs / "mosquitto.conf").write_text("\n".join(config) + "\n")
    with (certs / "mosquitto.out").open("wb") as out:
        broker = subprocess.Popen([str(binary), "-c", str(certs / "mosquitto.conf")], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while broker.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        else:
            pytest.fail(f"the TLS mosquitto did not start:\n{(certs / 'mosquitto.out').read_text()}")
        yield f"mqtts://127.0.0.1:{port}", certs
    finally:
        stop_process(broker)


def test_mutual_tls_round_trip(tls_broker, mqtt_client, prefix):
    url, certs = tls_broker
    broker_url = BrokerUrl.parse(
        url, ca_file=certs / "ca.pem", cert_file=certs / "client.pem", key_file=certs / "client.key"
    )
    client = mqtt_client(broker_url, "tls")
    client.subscribe(f"{prefix}/t")
    client.publish(f"{prefix}/t", b"over TLS")
    assert collect(client, 1) == [Message(f"{prefix}/t", b"over TLS")]


def test_tls_without_a_client_certificate_or_the_ca_says_what_to_check(tls_broker):
    url, certs = tls_broker
    no_cert = MqttTransport(BrokerUrl.parse(url, ca_file=certs / "ca.pem"), "no-cert")
    with pytest.raises(BrokerUnavailable, match="closed the connection before accepting it.*client certificate"):
        no_cert.connect(timeout=5)
    no_ca = MqttTransport(url, "no-ca")  # the system CAs do not know the test CA
    with pytest.raises(BrokerUnavailable, match="TLS handshake .* failed.*ca_file"):
        no_ca.connect(timeout=5)
    plain = MqttTransport(url.replace("mqtts://", "mqtt://"), "plain")
    with pytest.raises(BrokerUnavailable, match="not a TLS listener"):
        plain.connect(timeout=5)
