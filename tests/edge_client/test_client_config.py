"""Client configuration (TOML + overrides) and the ``litefed-client`` command line."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client import cli
from edge_client import config as config_module
from edge_client.broker_url import BrokerUrl, redact_url
from edge_client.chunks import DEFAULT_MAX_CHUNK
from edge_client.config import ClientConfig, DataSourceConfig, load_config, parse_data_spec, tomllib
from edge_client.errors import BrokerUnavailable, BrokerUrlError, ConfigError
from edge_client.messages import Presence
from edge_client.topics import Topics
from edge_client.transport import InMemoryBroker, InMemoryTransport


def write(tmp_path: Path, text: str, name: str = "client.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


MINIMAL = """
client_id = "pi-17"
[data]
kind = "npz"
path = "part.npz"
"""


# -- parsing -------------------------------------------------------------------------


def test_minimal_file_gets_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.client_id == "pi-17"
    assert config.broker_url == "mqtt://127.0.0.1:1883"
    assert (config.federation, config.topic_prefix) == ("default", "litefed")
    assert config.state_dir == tmp_path / "xdg" / "litefed" / "default" / "pi-17"
    assert config.data == DataSourceConfig("npz", tmp_path / "part.npz")  # relative to the file
    assert (config.num_threads, config.seed) == (None, None)
    assert (config.ack_timeout, config.max_resends, config.max_chunk) == (30.0, 5, DEFAULT_MAX_CHUNK)
    assert config.topics == Topics("default", "litefed")


def test_every_field(tmp_path):
    path = write(
        tmp_path,
        """
        client_id = "pi-17"
        broker_url = "mqtts://pi-17:secret@broker.example.com:8883"
        federation = "farm.north"
        topic_prefix = "acme/fl"
        state_dir = "state"
        num_threads = 2
        ack_timeout = 2.5
        max_resends = 0
        max_chunk = 4096
        seed = 17
        ca_file = "/etc/litefed/ca.pem"
        cert_file = "pi.crt"
        key_file = "pi.key"

        [data]
        kind = "csv"
        path = "/data/readings.csv"
        label_column = "label"
        has_header = true
        delimiter = ";"
        """,
    )
    config = load_config(path, {})
    assert config.broker_url.startswith("mqtts://") and config.federation == "farm.north"
    assert config.state_dir == tmp_path / "state"
    assert (config.num_threads, config.ack_timeout, config.max_resends, config.max_chunk, config.seed) == (
        2,
        2.5,
        0,
        4096,
        17,
    )
    assert config.ca_file == Path("/etc/litefed/ca.pem") and config.cert_file == tmp_path / "pi.crt"
    assert config.data == DataSourceConfig(
        "csv", Path("/data/readings.csv"), label_column="label", has_header=True, delimiter=";"
    )


def test_image_labels(tmp_path):
    config = load_config(
        write(tmp_path, 'client_id = "cam-1"\n[data]\nkind = "images"\npath = "photos"\nlabels = ["cat", "dog"]\n'), {}
    )
    assert config.data.kind == "images" and config.data.labels == ("cat", "dog")


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, MINIMAL + 'x_key = "features"\n')
    config = load_config(
        path,
        {"broker_url": "mqtt://10.0.0.2", "client_id": "pi-18", "state_dir": Path("s"), "federation": None},
    )
    assert (config.broker_url, config.client_id, config.state_dir, config.federation) == (
        "mqtt://10.0.0.2",
        "pi-18",
        Path("s"),
        "default",
    )
    # Same kind: the file's other [data] options stay; another kind: they go.
    same = load_config(path, {"data": "npz:other.npz"})
    assert same.data == DataSourceConfig("npz", Path("other.npz"), x_key="features")
    other = load_config(path, {"data": parse_data_spec("csv:r.csv")})
    assert other.data == DataSourceConfig("csv", Path("r.csv"))


def test_array_name_flags(tmp_path):
    """--x-key/--y-key name the npz arrays, with --data or on top of the file's [data]."""
    parser = cli.build_parser()
    args = parser.parse_args(["--client-id", "pi-1", "--data", "npz:m.npz", "--x-key", "x_test", "--y-key", "y_test"])
    config = load_config(None, cli.overrides_from_args(args))
    assert config.data == DataSourceConfig("npz", Path("m.npz"), x_key="x_test", y_key="y_test")
    path = write(tmp_path, MINIMAL)
    config = load_config(path, cli.overrides_from_args(parser.parse_args(["--x-key", "images"])))
    assert (config.data.path, config.data.x_key, config.data.y_key) == (tmp_path / "part.npz", "images", "y")
    csv_with_key = parser.parse_args(["--client-id", "a", "--data", "csv:r.csv", "--x-key", "x"])
    with pytest.raises(ConfigError, match="x_key.*npz"):
        load_config(None, cli.overrides_from_args(csv_with_key))


def test_no_file_only_overrides(tmp_path):
    config = load_config(None, {"client_id": "pi-1", "data": "images:/photos", "state_dir": tmp_path})
    assert config.data == DataSourceConfig("images", Path("/photos")) and config.state_dir == tmp_path
    assert load_config(None, {"client_id": "pi-1"}, require_data=False).data is None


def test_the_documented_examples_are_valid(tmp_path):
    """The example in the module docstring and the one in --help both load."""
    doc = config_module.__doc__
    block = doc.split("::\n", 1)[1].split("\nThe other kinds", 1)[0]
    config = load_config(write(tmp_path, textwrap.dedent(block), "doc.toml"), {})
    assert config.client_id == "pi-17" and config.data.kind == "npz"
    for other in doc.split("::\n", 2)[2].split("    [data]")[1:]:
        table = tomllib.loads("[data]" + textwrap.dedent(other.split("\nRelative paths", 1)[0]))["data"]
        assert load_config(None, {"client_id": "x", "data": table}).data.kind == table["kind"]

    epilog = cli.EPILOG.split("\n\n", 1)[1].split("\nexamples:", 1)[0]
    lines = [line[2:] for line in epilog.splitlines()]
    config = load_config(write(tmp_path, "\n".join(lines), "epilog.toml"), {})
    assert config.client_id == "pi-17" and config.max_resends == 5


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "field", "hint"),
    [
        ('[data]\nkind = "npz"\npath = "p"', "client_id", "required"),
        ('client_id = "a/b"', "client_id", "1-64 characters"),
        ('client_id = ""', "client_id", "1-64 characters"),
        ('client_id = "x"\nbrokr_url = "mqtt://h"', "brokr_url", "did you mean 'broker_url'"),
        ('client_id = "x"\nbroker_url = "http://h"', "broker_url", "scheme 'http'"),
        ('client_id = "x"\nbroker_url = "mqtt://"', "broker_url", "no host"),
        ('client_id = "x"\nbroker_url = "mqtt://h:99999"', "broker_url", "invalid port"),
        ('client_id = "x"\nbroker_url = "h:1883"', "broker_url", "not a URL"),
        ('client_id = "x"\nbroker_url = "mqtt://h/path"', "broker_url", "path"),
        ('client_id = "x"\nfederation = "a b"', "federation", "1-64 characters"),
        ('client_id = "x"\ntopic_prefix = "a/+"', "topic_prefix", "'+'"),
        ('client_id = "x"\nack_timeout = "soon"', "ack_timeout", "number of seconds"),
        ('client_id = "x"\nack_timeout = 0', "ack_timeout", "positive"),
        ('client_id = "x"\nack_timeout = true', "ack_timeout", "number of seconds"),
        ('client_id = "x"\nmax_resends = -1', "max_resends", "at least 0"),
        ('client_id = "x"\nmax_resends = 1.5', "max_resends", "integer"),
        ('client_id = "x"\nmax_chunk = 41', "max_chunk", "at least 42"),
        ('client_id = "x"\nnum_threads = 0', "num_threads", "at least 1"),
        ('client_id = "x"\nseed = true', "seed", "integer"),
        ('client_id = "x"\nca_file = "ca.pem"', "ca_file", "mqtts://"),
        ('client_id = "x"\nbroker_url = "mqtts://h"\ncert_file = "c.pem"', "key_file", "both"),
        ('client_id = "x"\ndata = "npz:p"', "data", "must be a table"),
    ],
)
def test_invalid_top_level_fields(tmp_path, toml, field, hint):
    needs_data = "[data]" not in toml and "data =" not in toml
    text = toml + ('\n[data]\nkind = "npz"\npath = "p"\n' if needs_data else "\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert field in str(info.value) and hint in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ("", "data", "required"),
        ('[data]\npath = "p"', "data.kind", "required"),
        ('[data]\nkind = "npz"', "data.path", "required"),
        ('[data]\nkind = "parquet"\npath = "p"', "data.kind", "npz, images, csv"),
        ('[data]\nkind = "csv"\npath = "p"\nx_key = "x"', "data.x_key", "'npz' only"),
        ('[data]\nkind = "npz"\npath = "p"\nlabels = ["a"]', "data.labels", "'images' only"),
        ('[data]\nkind = "images"\npath = "p"\nlabels = "cat"', "data.labels", "list of folder names"),
        ('[data]\nkind = "images"\npath = "p"\nlabels = ["a", "a"]', "data.labels", "unique"),
        ('[data]\nkind = "csv"\npath = "p"\nhas_header = "yes"', "data.has_header", "true or false"),
        ('[data]\nkind = "csv"\npath = "p"\ndelimiter = ";;"', "data.delimiter", "single character"),
        ('[data]\nkind = "csv"\npath = "p"\nlabel_column = 1.5', "data.label_column", "integer"),
        ('[data]\nkind = "npz"\npath = "p"\nsize = 3', "size", "allowed keys"),
    ],
)
def test_invalid_data_tables(tmp_path, data, field, hint):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, 'client_id = "x"\n' + data + "\n"), {})
    assert field in str(info.value) and hint in str(info.value), str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", {})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "client_id = \n"), {})
    with pytest.raises(ConfigError, match="unknown key 'color'"):
        load_config(None, {"client_id": "x", "color": "red"})
    with pytest.raises(ConfigError, match="KIND:PATH"):
        parse_data_spec("parquet:x")
    with pytest.raises(ConfigError, match="KIND:PATH"):
        parse_data_spec("npz")


def test_client_config_validates_direct_construction(tmp_path):
    with pytest.raises(ConfigError, match="client_id"):
        ClientConfig(client_id="a+b", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="max_chunk"):
        ClientConfig(client_id="a", state_dir=tmp_path, max_chunk=10)


def test_redact_url():
    assert redact_url("mqtts://pi:secret@h:8883") == "mqtts://pi:***@h:8883"
    assert redact_url("mqtt://h:1883") == "mqtt://h:1883"


def test_the_broker_is_the_url_with_its_tls_files(tmp_path):
    ca = tmp_path / "ca.pem"
    overrides = {"client_id": "pi-1", "broker_url": "mqtts://pi:pw@b.example", "ca_file": ca, "state_dir": tmp_path}
    config = load_config(None, overrides, require_data=False)  # the file need not exist to read the config
    with pytest.raises(BrokerUrlError, match="ca_file .*ca.pem not found"):
        config.broker()  # ... but to connect
    ca.write_text("x")
    assert config.broker() == BrokerUrl("b.example", 8883, tls=True, username="pi", password="pw", ca_file=ca)


def test_a_missing_tls_file_exits_2(tmp_path, caplog):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.float32))
    path = write(
        tmp_path,
        'client_id = "pi-1"\nbroker_url = "mqtts://b"\nca_file = "ca.pem"\nstate_dir = "s"\n'
        '[data]\nkind = "npz"\npath = "d.npz"\n',
    )
    with caplog.at_level("ERROR", logger="edge_client.cli"):
        assert cli.main(["--config", str(path)]) == 2
    assert "ca.pem not found" in caplog.text


# -- the command line ----------------------------------------------------------------


def test_help_shows_an_example_config(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "litefed-client" in out and "[data]" in out and 'client_id = "pi-17"' in out


def test_usage_and_config_errors_exit_2(tmp_path, capsys):
    assert cli.main(["--no-such-flag"]) == 2
    assert cli.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "configuration error" in capsys.readouterr().err
    assert cli.main(["--client-id", "x", "--data", "parquet:p"]) == 2
    assert cli.main(["--data", "npz:p"]) == 2  # no client id


def test_missing_data_file_exits_2(tmp_path):
    broker = InMemoryBroker()

    def factory(config, will):
        return InMemoryTransport(broker, config.client_id, will=will)

    argv = ["--client-id", "pi-1", "--data", f"npz:{tmp_path / 'nope.npz'}", "--state-dir", str(tmp_path / "s")]
    assert cli.main(argv, transport_factory=factory) == 2


def test_a_broker_refusal_that_retrying_cannot_fix_exits_1(tmp_path):
    """A BrokerUnavailable that is not BrokerDown (a refused id, a TLS or protocol mismatch) is final: exit 1."""
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.float32))

    class Unreachable(InMemoryTransport):
        def connect(self) -> None:
            raise BrokerUnavailable("cannot reach the MQTT broker at mqtt://nowhere:1883")

    def factory(config, will):
        return Unreachable(InMemoryBroker(), config.client_id, will=will)

    argv = ["--client-id", "pi-1", "--data", f"npz:{tmp_path / 'd.npz'}", "--state-dir", str(tmp_path / "s")]
    assert cli.main(argv, transport_factory=factory) == 1


def test_make_transport_builds_an_mqtt_transport(tmp_path):
    from edge_client.client import last_will
    from edge_client.mqtt import MqttTransport

    overrides = {"client_id": "pi-1", "broker_url": "mqtt://u:p@127.0.0.1:1", "state_dir": tmp_path}
    config = load_config(None, overrides, require_data=False)
    transport = cli.make_transport(config, last_will(config))
    assert isinstance(transport, MqttTransport)
    assert transport.will == last_will(config) and transport.client_id == "pi-1"
    transport.close()


def test_sigterm_stops_gracefully(tmp_path):
    """The client runs until SIGTERM, then says offline and exits 0."""
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.float32))
    path = write(tmp_path, 'client_id = "pi-9"\nstate_dir = "state"\n[data]\nkind = "npz"\npath = "d.npz"\n')
    broker = InMemoryBroker()
    presence = Topics().presence("pi-9")

    def factory(config, will):
        return InMemoryTransport(broker, config.client_id, will=will)

    def stop_when_online():
        deadline = time.monotonic() + 10
        while presence not in broker.retained and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=stop_when_online, daemon=True)
    killer.start()
    assert cli.main(["--config", str(path)], transport_factory=factory) == 0
    killer.join(5)
    assert Presence.from_bytes(broker.retained[presence].payload) == Presence("offline", 4, "0.1.0")
    assert (tmp_path / "state").is_dir()
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "edge_client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0 and "KIND:PATH" in proc.stdout
