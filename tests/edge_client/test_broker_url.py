"""Broker URLs (edge_client.broker_url): parsing, validation, redaction, TLS files; no paho needed."""

from __future__ import annotations

import pytest

from edge_client.broker_url import BrokerUrl, redact_url
from edge_client.errors import BrokerUrlError
from tests.helpers import modules_loaded_by


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", BrokerUrl("localhost", 1883)),
        ("mqtt://10.0.0.5:1884", BrokerUrl("10.0.0.5", 1884)),
        ("mqtts://broker.example.com", BrokerUrl("broker.example.com", 8883, tls=True)),
        ("MQTTS://Broker:9000/", BrokerUrl("broker", 9000, tls=True)),
        ("mqtt://user:pa%40ss@host:1883", BrokerUrl("host", 1883, username="user", password="pa@ss")),
        ("mqtt://user@host", BrokerUrl("host", 1883, username="user")),
        ("mqtt://[::1]:1883", BrokerUrl("::1", 1883)),
    ],
)
def test_broker_url_parses(url, expected):
    assert BrokerUrl.parse(url) == expected


def test_broker_url_never_shows_the_password():
    url = BrokerUrl.parse("mqtts://pi-17:s3cret@broker:8883")
    assert str(url) == "mqtts://pi-17:***@broker:8883"
    assert "s3cret" not in repr(url)
    assert str(BrokerUrl.parse("mqtt://[::1]")) == "mqtt://[::1]:1883"
    with pytest.raises(BrokerUrlError) as excinfo:
        BrokerUrl.parse("http://pi:s3cret@broker")
    assert "s3cret" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "not a URL"),
        ("localhost:1883", "not a URL"),
        ("http://host", "scheme 'http'.*mqtt://"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://host:0", "out of range"),
        ("mqtt://host:99999", "invalid port"),
        ("mqtt://host:abc", "invalid port"),
        ("mqtt://host/topic", "path"),
        ("mqtt://host?ca=x", "query"),
        ("mqtt://:secret@host", "needs a user name"),
    ],
)
def test_bad_broker_urls_say_what_is_wrong(url, match):
    with pytest.raises(BrokerUrlError, match=match):
        BrokerUrl.parse(url)


def test_broker_url_tls_files(tmp_path):
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "c.crt", "c.key"))
    for path in (ca, cert, key):
        path.write_text("x")
    url = BrokerUrl.parse("mqtts://iot.example.com", ca_file=ca, cert_file=str(cert), key_file=key)
    assert (url.ca_file, url.cert_file, url.key_file) == (ca, cert, key)
    with pytest.raises(BrokerUrlError, match="mqtts://"):
        BrokerUrl.parse("mqtt://host", ca_file=ca)
    with pytest.raises(BrokerUrlError, match="both cert_file and key_file"):
        BrokerUrl.parse("mqtts://host", cert_file=cert)
    with pytest.raises(BrokerUrlError, match="not found"):
        BrokerUrl.parse("mqtts://host", ca_file=tmp_path / "missing.pem")
    assert isinstance(BrokerUrlError("x"), ValueError)  # argparse reports it as a bad value


def test_the_mqtt_module_gives_the_same_classes():
    import edge_client.broker_url
    import edge_client.mqtt

    assert edge_client.mqtt.BrokerUrl is edge_client.broker_url.BrokerUrl
    assert edge_client.mqtt.Backoff is edge_client.broker_url.Backoff


def test_checking_urls_and_configs_imports_no_mqtt_library():
    code = (
        "from edge_client.broker_url import BrokerUrl\n"
        "from edge_client.config import load_config\n"
        "BrokerUrl.parse('mqtts://u:p@h')\n"
        "load_config(None, {'client_id': 'a', 'broker_url': 'mqtt://h'}, require_data=False)\n"
    )
    assert modules_loaded_by(code, ("paho",)) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtts://pi:secret@h:8883", "mqtts://pi:***@h:8883"),
        ("mqtt://h:1883", "mqtt://h:1883"),
        ("mqtt://pi@h", "mqtt://pi@h"),
        ("http://pi:secret@h", "http://pi:***@h"),
        ("pi:secret@h:1883", "pi:***@h:1883"),  # no scheme: still no password shown
        ("mqtt://pi:p@ss@h", "mqtt://pi:***@h"),
    ],
)
def test_redact_url_hides_any_password(text, expected):
    assert redact_url(text) == expected


def test_a_url_that_is_not_one_never_shows_its_password():
    with pytest.raises(BrokerUrlError) as excinfo:
        BrokerUrl.parse("pi:s3cret@broker:1883")
    assert "not a URL" in str(excinfo.value) and "s3cret" not in str(excinfo.value)


def test_geturl_gives_the_password_back_only_when_asked():
    url = BrokerUrl.parse("mqtts://pi%2F1:p%40ss%3Aw@[::1]")
    assert (url.username, url.password) == ("pi/1", "p@ss:w")
    assert str(url) == url.geturl() == "mqtts://pi%2F1:***@[::1]:8883"
    whole = url.geturl(redact=False)
    assert whole == "mqtts://pi%2F1:p%40ss%3Aw@[::1]:8883"
    assert BrokerUrl.parse(whole) == url  # round trip, as litefed-emulate writes it into client.toml


@pytest.mark.parametrize(
    ("url", "files", "expected"),
    [
        ("mqtt://h", {"ca_file": "ca.pem"}, ("ca_file", "TLS files (ca_file) need an mqtts:// broker URL")),
        ("mqtt://h", {"cert_file": "c", "key_file": "k"}, ("cert_file", "TLS files (cert_file, key_file) need")),
        ("mqtts://h", {"cert_file": "c"}, ("key_file", "mutual TLS needs both cert_file and key_file")),
        ("mqtts://h", {"key_file": "k"}, ("cert_file", "mutual TLS needs both cert_file and key_file")),
        ("mqtts://h", {"ca_file": "ca.pem", "cert_file": "c", "key_file": "k"}, None),
        ("mqtt://h", {}, None),
    ],
)
def test_tls_files_belong_to_mqtts_urls(url, files, expected):
    problem = BrokerUrl.parse(url).tls_files_problem(**files)  # the files need not exist for this check
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem[0] == expected[0] and problem[1].startswith(expected[1]), problem


@pytest.mark.parametrize("port", [0, 65536, True, "1883"])
def test_a_port_out_of_range_is_refused_on_construction(port):
    with pytest.raises(BrokerUrlError, match="out of range"):
        BrokerUrl("h", port)
