"""What a fleet is (federation, topic prefix, broker, devices), its names and limits, and the provisioning error."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from coordinator.errors import CoordinatorError
from edge_client.broker_url import BrokerUrl
from edge_client.topics import Topics, check_name

MANIFEST = "litefed-fleet.json"
MANIFEST_VERSION = 1
DEFAULT_PORT = 8883
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 3650
RENEW_DAYS = 30  # a re-run renews certificates that expire sooner than this (keeping their keys)
BACKDATE = dt.timedelta(days=1)  # tolerates a board whose clock is a little behind
BOARD_ETC = "/etc/litefed"  # where install.sh puts a board's folder
STATE_ROOT = "/var/lib/litefed"  # the unit's StateDirectory; a board keeps its state in STATE_ROOT/<id>
UNIT = "litefed-client.service"
SIGNING_KEY = "signing.key"  # under coordinator/: signs what boards download (Ed25519, 0600)
TRUST_KEY = "coordinator.pub"  # in each board's bundle: its public half, client.toml's trust_key
SERVICE_USER = "litefed"
PASSWORD_BYTES = 24  # of randomness in a board's password (32 URL-safe characters)
MOSQUITTO_PASSWD = ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd")
SUMMARY_BOARDS = 10  # boards listed by name in the summary
MAX_CN = 64  # X.509's upper bound on a common name
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-/]{1,200}$")
SUBDIRS = ("ca", "mosquitto", "coordinator", "boards")


class ProvisionError(CoordinatorError):
    """Provisioning cannot go ahead: bad names, or an output folder that does not match the request."""


def coordinator_identity(federation: str) -> str:
    """The coordinator's certificate CN: its MQTT client id (see ``BrokerSettings.for_federation``)."""
    return f"coordinator-{federation}"


def check_host(host: str) -> str:
    """A broker host name for the server certificate: an IP address or a DNS name (no wildcards)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _DNS_NAME.match(host):
        raise ProvisionError(f"broker host {host!r} is neither an IP address nor a DNS name; pass e.g. 192.168.1.10")
    return host


@dataclass(frozen=True)
class FleetSpec:
    """What a fleet is: its federation, topic prefix, broker (names and port) and devices, in order."""

    federation: str = "default"
    topic_prefix: str = "litefed"
    broker_hosts: tuple[str, ...] = DEFAULT_HOSTS
    port: int = DEFAULT_PORT
    devices: tuple[str, ...] = ()
    password_port: int | None = None  # boards log in with passwords on this port, not certificates

    def __post_init__(self) -> None:
        try:
            Topics(self.federation, self.topic_prefix)
        except ValueError as exc:
            raise ProvisionError(str(exc)) from None
        if not _PREFIX.match(self.topic_prefix):
            # The prefix goes into the ACL file, TOML and shell scripts: no spaces, quotes or escapes.
            raise ProvisionError(f"topic prefix {self.topic_prefix!r} must be letters, digits and '_', '.', '-', '/'")
        if len(self.coordinator) > MAX_CN:
            limit = MAX_CN - len(coordinator_identity(""))
            raise ProvisionError(
                f"federation {self.federation!r} is too long for a certificate; use at most {limit} characters"
            )
        if not self.broker_hosts:
            raise ProvisionError("no broker host: pass --broker-host NAME (the name or address boards connect to)")
        for host in self.broker_hosts:
            check_host(host)
        for port in (self.port, self.password_port):
            if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
                raise ProvisionError(f"broker port {port} is out of range; use 1..65535 (8883 is MQTT over TLS)")
        if self.password_port == self.port:
            raise ProvisionError(f"--password-port must differ from --port {self.port}: they are two listeners")
        for device in self.devices:
            check_device_id(device, self.federation)
        if len(set(self.devices)) != len(self.devices):
            raise ProvisionError(f"device ids must be unique, got {list(self.devices)}")

    @property
    def topics(self) -> Topics:
        return Topics(self.federation, self.topic_prefix)

    @property
    def coordinator(self) -> str:
        return coordinator_identity(self.federation)

    @property
    def passwords(self) -> bool:
        return self.password_port is not None

    @property
    def broker_url(self) -> str:
        """``mqtts://HOST:PORT`` with the first broker host: the coordinator's, and boards' with certificates."""
        return BrokerUrl(self.broker_hosts[0], self.port, tls=True).geturl()

    def board_url(self, device: str, password: str | None) -> str:
        """A board's ``broker_url``: :attr:`broker_url`, or with a password its user name and the password port."""
        if password is None:
            return self.broker_url
        assert self.password_port is not None
        url = BrokerUrl(self.broker_hosts[0], self.password_port, tls=True, username=device, password=password)
        return url.geturl(redact=False)

    def to_json(self) -> bytes:
        table = {"version": MANIFEST_VERSION, **asdict(self)}
        return (json.dumps(table, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> FleetSpec:
        try:
            table = json.loads(data)
            if table.pop("version") != MANIFEST_VERSION:
                raise ValueError("unknown version")
            table["broker_hosts"] = tuple(table["broker_hosts"])
            table["devices"] = tuple(table["devices"])
            table.setdefault("password_port", None)
            return cls(**table)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProvisionError(f"{where} is not a litefed-provision manifest ({exc}); use another --out") from None


def check_device_id(device: str, federation: str) -> str:
    """A device id is a client id (see :func:`~edge_client.topics.check_name`) other than the coordinator's."""
    try:
        check_name("device id", device)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if device == coordinator_identity(federation):
        raise ProvisionError(f"device id {device!r} is the coordinator's identity; pick another id")
    return device


def read_devices_file(path: Path) -> list[str]:
    """Device ids from a file: one a line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProvisionError(f"cannot read devices file {path}: {exc.strerror or exc}") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]
