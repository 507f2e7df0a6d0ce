"""litefed-provision's files and their contents, without a broker (tests/integration/test_provision.py runs them).

Certificates are checked with ``cryptography``, ``client.toml`` with the
board's own :func:`~edge_client.config.load_config`, the ACL against every
topic :class:`~edge_client.topics.Topics` names, ``coordinator.sh`` against
litefed-coordinator's parser, and re-runs for what they keep.
"""

from __future__ import annotations

import configparser
import datetime as dt
import shlex
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.cli import provision as cli
from coordinator.cli.coordinate import build_parser as coordinator_parser
from coordinator.cli.settings import BrokerSettings, read_clients_file
from coordinator.provision import (
    DEFAULT_PORT,
    MANIFEST,
    RENEW_DAYS,
    FleetSpec,
    ProvisionError,
    coordinator_identity,
    plan,
    provision,
    read_devices_file,
)
from edge_client.broker_url import BrokerUrl
from edge_client.config import load_config
from edge_client.signing import SigningKey, TrustKey
from edge_client.topics import Topics
from tests.helpers import modules_loaded_by

FEDERATION = "greenhouse"


def _provision(out: Path, *devices: str, **changes) -> None:
    force = changes.pop("force", False)
    days = changes.pop("days", 3650)
    provision(out, plan(out, devices=devices, force=force, **changes), days=days, force=force)


@pytest.fixture
def fleet(tmp_path) -> Path:
    out = tmp_path / "fleet"
    _provision(out, "pi-1", "pi-2", federation=FEDERATION)
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- files and certificates ---------------------------------------------------------------


def test_every_private_key_is_0600_and_every_file_is_where_the_summary_says(fleet):
    keys = sorted(fleet.rglob("*.key"))
    assert [str(k.relative_to(fleet)) for k in keys] == [
        "boards/pi-1/client.key",
        "boards/pi-2/client.key",
        "ca/ca.key",
        "coordinator/coordinator.key",
        "coordinator/signing.key",
        "mosquitto/server.key",
    ]
    assert all(_mode(k) == 0o600 for k in keys)
    assert all(_mode(fleet / "boards" / f"{d}.tar.gz") == 0o600 for d in ("pi-1", "pi-2"))  # it holds a key
    assert _mode(fleet / "ca") == 0o700
    for board in ("pi-1", "pi-2"):
        names = sorted(p.name for p in (fleet / "boards" / board).iterdir())
        assert names == [
            "ca.pem",
            "client.crt",
            "client.key",
            "client.toml",
            "coordinator.pub",
            "install.sh",
            "litefed-client.service",
        ]
    assert _mode(fleet / "boards/pi-1/install.sh") == _mode(fleet / "coordinator/coordinator.sh") == 0o755


def test_boards_trust_the_coordinator_s_signing_key_which_a_re_run_keeps(fleet):
    key = SigningKey.load(fleet / "coordinator" / "signing.key")
    for board in ("pi-1", "pi-2"):
        trust = TrustKey.load(fleet / "boards" / board / "coordinator.pub")
        assert trust.open("round", key.seal("round", b"{}")).body == b"{}"
        config = load_config(fleet / "boards" / board / "client.toml")
        assert config.trust_key == fleet / "boards" / board / "coordinator.pub"
    assert '--signing-key "$here/signing.key"' in (fleet / "coordinator" / "coordinator.sh").read_text()
    _provision(fleet, "pi-3", federation=FEDERATION)
    assert SigningKey.load(fleet / "coordinator" / "signing.key").trust_key.key_id == key.trust_key.key_id
    assert TrustKey.load(fleet / "boards" / "pi-3" / "coordinator.pub").key_id == key.trust_key.key_id


def test_a_lost_signing_key_is_not_silently_replaced(fleet):
    (fleet / "coordinator" / "signing.key").unlink()
    with pytest.raises(ProvisionError, match="signing.key is missing but boards trust it"):
        _provision(fleet, "pi-3", federation=FEDERATION)


def test_a_fleet_provisioned_before_signing_gets_a_signing_key_on_a_re_run(fleet):
    (fleet / "coordinator" / "signing.key").unlink()  # as a fleet provisioned before boards trusted a key
    for board in ("pi-1", "pi-2"):
        (fleet / "boards" / board / "coordinator.pub").unlink()
    _provision(fleet, federation=FEDERATION)
    key = SigningKey.load(fleet / "coordinator" / "signing.key")
    for board in ("pi-1", "pi-2"):
        assert TrustKey.load(fleet / "boards" / board / "coordinator.pub").key_id == key.trust_key.key_id


def test_device_certificates_name_the_device_and_are_signed_by_the_fleet_ca(fleet):
    ca = _cert(fleet / "ca/ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for board in ("pi-1", "pi-2"):
        cert = _cert(fleet / "boards" / board / "client.crt")
        cert.verify_directly_issued_by(ca)
        assert _cn(cert) == board
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert (fleet / "boards" / board / "ca.pem").read_bytes() == (fleet / "ca/ca.pem").read_bytes()
    coordinator = _cert(fleet / "coordinator/coordinator.crt")
    coordinator.verify_directly_issued_by(ca)
    assert _cn(coordinator) == coordinator_identity(FEDERATION) == "coordinator-greenhouse"


def test_the_coordinator_identity_is_the_client_id_the_coordinator_connects_with():
    url = BrokerUrl.parse("mqtts://broker:8883")
    assert BrokerSettings.for_federation(url, FEDERATION).client_id == coordinator_identity(FEDERATION)


def test_the_server_certificate_covers_the_broker_hosts(tmp_path, fleet):
    san = _cert(fleet / "mosquitto/server.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    out = tmp_path / "lan"
    _provision(out, "pi-1", broker_hosts=["broker.lan", "192.168.1.10", "::1"], port=9883)
    cert = _cert(out / "mosquitto/server.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.168.1.10", "::1"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert load_config(out / "boards/pi-1/client.toml").broker_url == "mqtts://broker.lan:9883"


# -- what a board gets --------------------------------------------------------------------


def test_client_toml_loads_with_the_boards_own_loader(fleet):
    path = fleet / "boards/pi-1/client.toml"
    config = load_config(path)
    assert (config.client_id, config.federation, config.topic_prefix) == ("pi-1", FEDERATION, "litefed")
    assert config.broker_url == f"mqtts://127.0.0.1:{DEFAULT_PORT}"
    assert config.state_dir == Path("/var/lib/litefed/pi-1")
    folder = path.parent.resolve()
    assert (config.ca_file, config.cert_file, config.key_file) == (
        folder / "ca.pem",
        folder / "client.crt",
        folder / "client.key",
    )
    broker = config.broker()  # the TLS files exist, and go with the mqtts URL
    assert broker.tls and broker.cert_file == folder / "client.crt"
    assert config.data is not None and config.data.kind == "npz"
    assert "EDIT" in path.read_text()  # the placeholder says it is one


def test_the_systemd_unit_runs_the_client_unprivileged_and_restarts_it(fleet):
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((fleet / "boards/pi-2/litefed-client.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"] == "litefed-client --config /etc/litefed/pi-2/client.toml"
    assert service["Restart"] == "on-failure"
    assert service["User"] == "litefed" and service["User"] != "root"
    assert service["StateDirectory"] == "litefed"
    assert service["RestartPreventExitStatus"] == "2"  # a bad configuration is not retried forever
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert load_config(fleet / "boards/pi-2/client.toml").state_dir.parent == Path("/var/lib") / "litefed"
    script = (fleet / "boards/pi-2/install.sh").read_text()
    assert "dest=/etc/litefed/pi-2" in script and "litefed-client.service" in script


@pytest.mark.parametrize("script", ["boards/pi-1/install.sh", "coordinator/coordinator.sh"])
def test_the_generated_scripts_are_valid_sh(fleet, script):
    done = subprocess.run(["sh", "-n", str(fleet / script)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert (fleet / script).read_text().startswith("#!/bin/sh\n")


def test_the_board_archive_is_its_folder_with_the_key_still_0600(fleet):
    folder = fleet / "boards/pi-1"
    with tarfile.open(fleet / "boards/pi-1.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == sorted(f"pi-1/{p.name}" for p in folder.iterdir())
        for name, member in members.items():
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == (fleet / "boards" / name).read_bytes()
            assert member.uid == 0 and member.mode == _mode(fleet / "boards" / name)
        assert members["pi-1/client.key"].mode == 0o600


# -- what the broker and the coordinator get ---------------------------------------------


def _conf(path: Path) -> dict[str, str]:
    lines = [line.split(None, 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: value for key, value in lines}


def test_mosquitto_conf_requires_a_certificate_and_points_at_its_files(fleet):
    conf = _conf(fleet / "mosquitto/mosquitto.conf")
    assert conf["listener"] == str(DEFAULT_PORT)
    for key in ("require_certificate", "use_identity_as_username", "use_username_as_clientid"):
        assert conf[key] == "true"
    assert conf["allow_anonymous"] == "false"
    folder = (fleet / "mosquitto").resolve()
    for key, name in (("cafile", "ca.pem"), ("certfile", "server.crt"), ("keyfile", "server.key"), ("acl_file", "acl")):
        assert Path(conf[key]) == folder / name and Path(conf[key]).is_file()
    out = fleet.parent / "elsewhere"
    provision(out, plan(out, devices=["pi-1"]), broker_dir="/etc/mosquitto/litefed")
    assert _conf(out / "mosquitto/mosquitto.conf")["cafile"] == "/etc/mosquitto/litefed/ca.pem"


def _matches(pattern: str, topic: str) -> bool:
    """MQTT topic matching, as the broker applies an ACL line to a topic."""
    levels, wanted = topic.split("/"), pattern.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(levels) == len(wanted)


def _acl(path: Path) -> dict[str, dict[str, list[str]]]:
    """user -> {"read": patterns, "write": patterns}."""
    grants: dict[str, dict[str, list[str]]] = {}
    user = None
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            grants[user] = {"read": [], "write": []}
        else:
            assert words[0] == "topic" and user is not None, f"an ACL line outside a user block: {line!r}"
            grants[user][words[1]].append(words[2])
    return grants


def _may(grants, user: str, access: str, topic: str) -> bool:
    return any(_matches(p, topic) for p in grants.get(user, {}).get(access, []))


def test_the_acl_gives_each_identity_exactly_its_topics(fleet):
    grants = _acl(fleet / "mosquitto/acl")
    t = Topics(FEDERATION)
    coordinator = coordinator_identity(FEDERATION)
    assert sorted(grants) == sorted([coordinator, "pi-1", "pi-2"])
    coordinator_writes = [t.model_meta, t.model_chunk(0), t.model_chunk(41), t.global_chunk(3), t.round]
    for device, other in (("pi-1", "pi-2"), ("pi-2", "pi-1")):
        assert _may(grants, device, "write", t.update(device)) and _may(grants, device, "write", t.presence(device))
        for topic in (t.update(other), t.presence(other), t.ack(device), *coordinator_writes):
            assert not _may(grants, device, "write", topic), (device, topic)
        for topic in (t.model_meta, t.model_chunk(7), t.global_chunk(7), t.round, t.ack(device)):
            assert _may(grants, device, "read", topic), (device, topic)
        for topic in (t.update(other), t.presence(other), t.ack(other), t.update(device), "$SYS/broker/clients"):
            assert not _may(grants, device, "read", topic), (device, topic)
    for topic in (*coordinator_writes, t.ack("pi-1"), t.ack("someone-new")):
        assert _may(grants, coordinator, "write", topic)
    for topic in (t.update("pi-1"), t.presence("pi-2")):
        assert _may(grants, coordinator, "read", topic) and not _may(grants, coordinator, "write", topic)
    # Every line lives in this federation's branch: a second federation on the broker is untouched.
    assert all(p.startswith(t.base + "/") for g in grants.values() for ps in g.values() for p in ps)


def test_coordinator_sh_runs_litefed_coordinator_with_its_identity_and_no_password(fleet):
    script = (fleet / "coordinator/coordinator.sh").read_text()
    command = script.split("exec ", 1)[1].replace("\\\n", " ").replace('"$here', f'"{fleet / "coordinator"}')
    argv = shlex.split(command)
    assert argv[0] == "litefed-coordinator" and argv[-1] == "$@"
    args = coordinator_parser().parse_args([*argv[1:-1], "--model", "m.tflite"])
    broker = BrokerSettings.from_args(args)  # every file exists, and goes with the mqtts URL
    assert (broker.url.host, broker.url.port, broker.url.tls) == ("127.0.0.1", DEFAULT_PORT, True)
    assert broker.url.password is None and broker.client_id == coordinator_identity(FEDERATION)
    assert broker.url.cert_file == fleet / "coordinator/coordinator.crt"
    assert args.federation == FEDERATION
    # Presence is taken from the provisioned boards only: the list is the coordinator's --clients-file.
    assert read_clients_file(args.clients_file) == {"pi-1", "pi-2"}
    _provision(fleet, "pi-3")
    assert read_clients_file(args.clients_file) == {"pi-1", "pi-2", "pi-3"}
    assert read_devices_file(args.clients_file) == ["pi-1", "pi-2", "pi-3"]


# -- re-runs ------------------------------------------------------------------------------


def _secrets(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in (out / "ca").iterdir()} | {
        str(p.relative_to(out)): p.read_bytes() for p in out.glob("*/*/client.*") if p.suffix in (".key", ".crt")
    }


def test_adding_a_device_keeps_the_ca_and_every_existing_key(fleet):
    before = _secrets(fleet)
    coordinator_key = (fleet / "coordinator/coordinator.key").read_bytes()
    _provision(fleet, "pi-3")  # the federation comes from the manifest
    after = _secrets(fleet)
    assert {k: after[k] for k in before} == before
    assert (fleet / "coordinator/coordinator.key").read_bytes() == coordinator_key
    assert "boards/pi-3/client.key" in after and (fleet / "boards/pi-3.tar.gz").is_file()
    _cert(fleet / "boards/pi-3/client.crt").verify_directly_issued_by(_cert(fleet / "ca/ca.pem"))
    assert "user pi-3" in (fleet / "mosquitto/acl").read_text()
    assert FleetSpec.from_json((fleet / MANIFEST).read_bytes(), fleet).devices == ("pi-1", "pi-2", "pi-3")


def test_a_new_broker_host_reissues_the_broker_certificate_and_says_which_boards_changed(fleet):
    keys = {p: p.read_bytes() for p in fleet.rglob("*.key")}
    same = provision(fleet, plan(fleet, devices=["pi-3"]))
    assert (same.renewed, same.updated, same.new_devices) == ([], [], ["pi-3"])
    moved = provision(fleet, plan(fleet, broker_hosts=["broker.lan"]))
    assert moved.renewed == ["the broker"] and moved.updated == ["pi-1", "pi-2", "pi-3"]
    assert "ship their archives again" in moved.summary()
    assert all(p.read_bytes() == data for p, data in keys.items())  # new certificate, same keys
    san = _cert(fleet / "mosquitto/server.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["broker.lan"]
    with tarfile.open(fleet / "boards/pi-1.tar.gz") as tar:
        packed = tar.extractfile("pi-1/client.toml")
        assert packed is not None and b"mqtts://broker.lan:8883" in packed.read()


def test_force_re_keys_the_fleet(fleet):
    before = _secrets(fleet)
    _provision(fleet, "pi-1", federation="orchard", force=True)
    after = _secrets(fleet)
    assert after["ca/ca.key"] != before["ca/ca.key"]
    assert after["boards/pi-1/client.key"] != before["boards/pi-1/client.key"]
    assert not (fleet / "boards/pi-2").exists() and not (fleet / "boards/pi-2.tar.gz").exists()
    assert load_config(fleet / "boards/pi-1/client.toml").federation == "orchard"


def test_a_certificate_close_to_expiry_is_renewed_with_the_same_key(tmp_path):
    out = tmp_path / "fleet"
    _provision(out, "pi-1", days=RENEW_DAYS - 1)
    key, cert = (out / "boards/pi-1/client.key").read_bytes(), _cert(out / "boards/pi-1/client.crt")
    _provision(out, "pi-1")
    renewed = _cert(out / "boards/pi-1/client.crt")
    assert (out / "boards/pi-1/client.key").read_bytes() == key
    assert renewed.serial_number != cert.serial_number
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=RENEW_DAYS)


def test_removing_a_device_drops_its_acl_entry_and_bundle(fleet):
    _provision(fleet, remove=["pi-2"])
    assert "pi-2" not in (fleet / "mosquitto/acl").read_text()
    assert not (fleet / "boards/pi-2").exists() and not (fleet / "boards/pi-2.tar.gz").exists()
    assert (fleet / "boards/pi-1.tar.gz").is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"federation": "orchard"}, "provisioned with --federation greenhouse"),
        ({"topic_prefix": "acme"}, "provisioned with --topic-prefix litefed"),
        ({"remove": ["pi-9"]}, "cannot remove pi-9"),
        ({"devices": ["coordinator-greenhouse"]}, "is the coordinator's identity"),
        ({"devices": ["pi/1"]}, "device id 'pi/1' must be"),
        ({"broker_hosts": ["bad host"]}, "neither an IP address nor a DNS name"),
        ({"remove": ["pi-1", "pi-2"]}, "no devices"),
    ],
)
def test_a_request_that_cannot_work_is_refused_before_anything_is_written(fleet, changes, message):
    before = {p: p.read_bytes() for p in fleet.rglob("*") if p.is_file()}
    with pytest.raises(ProvisionError, match=message):
        plan(fleet, **changes)
    assert {p: p.read_bytes() for p in fleet.rglob("*") if p.is_file()} == before


def test_a_missing_ca_key_is_refused_rather_than_silently_re_keying(fleet):
    (fleet / "ca/ca.key").unlink()
    with pytest.raises(ProvisionError, match="ca.key is missing but boards were provisioned"):
        _provision(fleet, "pi-3")


def test_topic_prefixes_that_would_break_the_generated_files_are_refused():
    for prefix in ("has space", 'quo"te', "a+b"):
        with pytest.raises(ProvisionError):
            FleetSpec(topic_prefix=prefix, devices=("pi-1",))
    with pytest.raises(ProvisionError, match="too long for a certificate"):
        FleetSpec(federation="f" * 60)


def test_devices_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# greenhouse boards\npi-1\n\n  pi-2   # the one by the door\n")
    assert read_devices_file(path) == ["pi-1", "pi-2"]
    with pytest.raises(ProvisionError, match="cannot read devices file"):
        read_devices_file(tmp_path / "missing.txt")


# -- passwords instead of board certificates ---------------------------------------------


def _listeners(conf: Path) -> dict[str, dict[str, str]]:
    """port -> that listener's settings (per_listener_settings true)."""
    listeners: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in conf.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.split(None, 1)
        if key == "listener":
            current = listeners[value] = {}
        elif current is not None:
            current[key] = value
    return listeners


def test_passwords_give_boards_a_login_on_a_second_listener(tmp_path):
    out = tmp_path / "fleet"
    _provision(out, "pi-1", "pi-2", federation=FEDERATION, passwords=True)
    assert "per_listener_settings true" in (out / "mosquitto/mosquitto.conf").read_text()
    listeners = _listeners(out / "mosquitto/mosquitto.conf")
    assert sorted(listeners) == ["8883", "8884"]
    certificates, passwords = listeners["8883"], listeners["8884"]
    assert certificates["require_certificate"] == "true" and "password_file" not in certificates
    assert "require_certificate" not in passwords and Path(passwords["password_file"]).is_file()
    for listener in (certificates, passwords):
        assert (
            listener["allow_anonymous"] == "false" and Path(listener["acl_file"]) == (out / "mosquitto/acl").resolve()
        )
        assert listener["use_username_as_clientid"] == "true"
    hashed = dict(line.split(":", 1) for line in (out / "mosquitto/passwd").read_text().splitlines())
    assert sorted(hashed) == ["pi-1", "pi-2"]  # the coordinator logs in with its certificate only
    assert _mode(out / "mosquitto/passwd") == 0o600
    for board in ("pi-1", "pi-2"):
        path = out / "boards" / board / "client.toml"
        config = load_config(path)
        url = config.broker()
        assert (url.username, url.port, url.tls, config.cert_file) == (board, 8884, True, None)
        assert url.password is not None and len(url.password) >= 32
        assert url.password not in hashed[board] and hashed[board].startswith("$7$")  # hashed, not stored
        assert _mode(path) == 0o600
        assert not (out / "boards" / board / "client.key").exists()
        with tarfile.open(out / "boards" / f"{board}.tar.gz") as tar:
            assert tar.getmember(f"{board}/client.toml").mode == 0o600
        assert 'install -m 0640 -o root -g litefed "$here/client.toml"' in (path.parent / "install.sh").read_text()
    assert load_config(out / "boards/pi-1/client.toml").broker().password != (
        load_config(out / "boards/pi-2/client.toml").broker().password
    )
    assert (out / "coordinator/coordinator.key").is_file()


def test_a_re_run_keeps_every_boards_password(tmp_path):
    out = tmp_path / "fleet"
    _provision(out, "pi-1", password_port=9999)
    before = load_config(out / "boards/pi-1/client.toml").broker()
    _provision(out, "pi-2")  # the manifest keeps the fleet on passwords, on its port
    after = load_config(out / "boards/pi-1/client.toml").broker()
    assert (after.password, after.port) == (before.password, 9999)
    users = [line.split(":", 1)[0] for line in (out / "mosquitto/passwd").read_text().splitlines()]
    assert users == ["pi-1", "pi-2"]


def test_switching_a_certificate_fleet_to_passwords_needs_force(fleet):
    with pytest.raises(ProvisionError, match="gives boards client certificates; pass --force"):
        plan(fleet, passwords=True)
    with pytest.raises(ProvisionError, match="must differ from --port"):
        FleetSpec(devices=("pi-1",), password_port=DEFAULT_PORT)


# -- the command --------------------------------------------------------------------------


def test_the_command_provisions_and_says_what_to_do_next(tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("pi-2\n")
    out = tmp_path / "fleet"
    argv = ["--out", str(out), "--federation", FEDERATION, "--device", "pi-1", "--devices-file", str(ids)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "2 board(s), 2 new" in text
    assert str(out / "boards/pi-1.tar.gz") in text and str(out / "boards/pi-2.tar.gz") in text
    assert f"mosquitto -c {out / 'mosquitto/mosquitto.conf'}" in text
    assert f"{out / 'coordinator/coordinator.sh'} --model" in text
    assert cli.main(["--out", str(out), "--device", "pi-3"]) == 0
    assert "3 board(s), 1 new, 2 kept" in capsys.readouterr().out


def test_the_command_reports_a_bad_request_in_one_line(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path / "fleet")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "litefed-provision: error: no devices: pass --device ID (repeatable) or --devices-file FILE (one id a line)"
    ]
    assert not (tmp_path / "fleet" / MANIFEST).exists()
    assert cli.main(["--port", "99999", "--device", "pi-1"]) == 2


def test_the_console_script_is_installed_and_its_help_explains_the_options():
    exe = shutil.which("litefed-provision")
    assert exe, "litefed-provision is not installed; run scripts/setup.sh"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for word in ("--device", "--devices-file", "--broker-host", "--port", "--out", "--force", "examples:"):
        assert word in out, f"litefed-provision --help does not mention {word}"


def test_help_loads_no_cryptography():
    code = "from coordinator.cli.provision import main; main(['--help'])"
    assert modules_loaded_by(code, ("cryptography", "coordinator.provision")) == []
