"""EmbeddedBroker and the litefed-broker command: real mosquitto and amqtt on 127.0.0.1."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.broker import EmbeddedBroker, EmbeddedBrokerError, PortInUseError, find_mosquitto, main
from edge_client.mqtt import MqttTransport
from edge_client.transport import Message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("mosquitto", "amqtt")


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, from /proc/net/tcp and tcp6 (hex, as the kernel shows them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                found.add(address)
    return found


def round_trip(url: str) -> Message | None:
    client = MqttTransport(url, "probe")
    try:
        client.connect(timeout=5)
        client.subscribe("probe/t")
        client.publish("probe/t", b"ok")
        return client.receive(5)
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["auto", *KINDS])
def test_start_serves_mqtt_and_stop_frees_the_port(kind):
    broker = EmbeddedBroker(kind)
    url = broker.start()
    try:
        assert url == f"mqtt://127.0.0.1:{broker.port}"
        assert broker.kind == (kind if kind != "auto" else "mosquitto" if find_mosquitto() else "amqtt")
        assert broker.running
        assert round_trip(url) == Message("probe/t", b"ok")
    finally:
        broker.stop()
    assert not broker.running
    assert not accepts_tcp(int(url.rsplit(":", 1)[1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the listening sockets from /proc/net")
@pytest.mark.parametrize("kind", KINDS)
def test_listens_on_127_0_0_1_only(kind):
    with EmbeddedBroker(kind) as broker:
        assert listening_addresses(broker.port) == {"0100007F"}  # 127.0.0.1, little-endian hex


def test_two_brokers_get_different_free_ports():
    with EmbeddedBroker("mosquitto") as a, EmbeddedBroker("mosquitto") as b, EmbeddedBroker("amqtt") as c:
        assert len({a.port, b.port, c.port}) == 3
        assert all(accepts_tcp(broker.port) for broker in (a, b, c))


@pytest.mark.parametrize("kind", KINDS)
def test_stop_is_idempotent_and_start_works_again(kind):
    broker = EmbeddedBroker(kind)
    broker.stop()  # before start: nothing to do
    broker.start()
    broker.stop()
    broker.stop()
    with pytest.raises(EmbeddedBrokerError, match="not running"):
        _ = broker.url
    url = broker.start()
    try:
        assert round_trip(url) == Message("probe/t", b"ok")
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_a_taken_port_is_a_clear_error(kind):
    with EmbeddedBroker("amqtt") as holder:
        broker = EmbeddedBroker(kind, port=holder.port)
        try:
            with pytest.raises(PortInUseError, match=f"^127.0.0.1:{holder.port} is already in use") as raised:
                broker.start(timeout=5)
            assert (raised.value.host, raised.value.port) == ("127.0.0.1", holder.port)
            assert "\n" not in str(raised.value)
            assert not broker.running and broker.tempdir is None
        finally:
            broker.stop()
        assert round_trip(holder.url) == Message("probe/t", b"ok")  # the holder is untouched


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        EmbeddedBroker("hivemq")
    with pytest.raises(ValueError, match="port"):
        EmbeddedBroker(port=70000)


def test_cli_reports_a_taken_port_with_exit_code_1(amqtt_broker, capsys):
    assert main(["--kind", "amqtt", "--port", str(amqtt_broker.port)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"litefed-broker: error: 127.0.0.1:{amqtt_broker.port} is in use")


def test_mosquitto_folder_exists_while_running_and_goes_with_stop():
    broker = EmbeddedBroker("mosquitto")
    broker.start()
    try:
        folder = broker.tempdir
        assert folder is not None and folder.name.startswith("litefed-mosquitto-")
        assert (folder / "mosquitto.conf").is_file()
    finally:
        broker.stop()
    assert broker.tempdir is None and not folder.exists()


def test_a_broker_started_in_a_worker_thread_outlives_the_thread():
    # The parent-death signal follows the thread that started mosquitto: none is set from a worker.
    import threading

    broker = EmbeddedBroker("mosquitto")
    worker = threading.Thread(target=broker.start)
    worker.start()
    worker.join(30)
    try:
        assert broker.running, "mosquitto did not start or died with its thread"
        assert round_trip(broker.url) == Message("probe/t", b"ok")
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_prints_the_url_and_stops_on_ctrl_c(kind):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    cli = subprocess.Popen(
        [sys.executable, "-m", "coordinator.broker", "--kind", kind, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
        text=True,
    )
    try:
        ready, _, _ = select.select([cli.stdout], [], [], 20)
        url = cli.stdout.readline().strip() if ready else ""
        assert url.startswith("mqtt://127.0.0.1:"), f"no URL printed: {url!r}"
        port = int(url.rsplit(":", 1)[1])
        assert round_trip(url) == Message("probe/t", b"ok")
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=15)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate(timeout=5)
    assert cli.returncode == 0, err
    assert "stopping" in err and "Traceback" not in err, err
    assert not accepts_tcp(port)  # mosquitto went with it
