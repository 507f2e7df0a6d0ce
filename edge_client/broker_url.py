"""Broker URLs and reconnection delays, without paho.

:class:`BrokerUrl` is the one parser and validator of ``mqtt://`` and
``mqtts://`` URLs: the client's configuration, the command lines and
:class:`~edge_client.mqtt.MqttTransport` all use it, so a URL is refused with
the same message wherever it is given. :class:`Backoff` says how long a
transport waits between reconnection attempts. Importing this module imports
no MQTT library, so configurations can be checked (and ``--help`` shown)
without one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from edge_client.errors import BrokerUrlError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
TLS_FILES = ("ca_file", "cert_file", "key_file")
_HINT = "expected mqtt://[user:pass@]host[:port] or mqtts://... for TLS"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and messages, even when it does not parse."""
    head, sep, rest = url.partition("://")
    if not sep:  # "user:secret@host" lacks a scheme but may still hold a password
        head, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{head}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


@dataclass(frozen=True)
class BrokerUrl:
    """Where and how to reach a broker: ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://``.

    ``mqtts`` uses TLS (default port 8883) and checks the broker's certificate
    against ``ca_file`` (the system CAs when None). ``cert_file`` and
    ``key_file`` authenticate the client (mutual TLS, as AWS IoT Core uses);
    TLS files belong to ``mqtts`` URLs only, and must exist. ``str()`` hides
    the password, so a URL can go into logs and messages; :meth:`geturl`
    with ``redact=False`` gives it back whole, for a client's configuration.
    """

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise BrokerUrlError("the broker URL has no host; expected mqtt://host:1883 or mqtts://host:8883")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise BrokerUrlError(f"broker port {self.port} is out of range; use 1..65535 (1883 plain, 8883 TLS)")
        if self.password is not None and self.username is None:
            raise BrokerUrlError(f"{self}: a password needs a user name, as in mqtt://user:pass@host")
        for name in TLS_FILES:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        problem = self.tls_files_problem(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)
        if problem is not None:
            raise BrokerUrlError(f"{self}: {problem[1]}")
        for name in TLS_FILES:
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise BrokerUrlError(f"{self}: {name} {path} not found")

    @classmethod
    def parse(
        cls,
        url: str,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> BrokerUrl:
        """Parse ``url``; raise :class:`BrokerUrlError` saying what is wrong (never showing a password)."""
        if not isinstance(url, str) or "://" not in url:
            raise BrokerUrlError(f"broker URL {redact_url(str(url))!r} is not a URL; {_HINT}")
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise BrokerUrlError(
                f"broker URL {redact_url(url)!r} has scheme {parts.scheme!r}; "
                "use mqtt:// (plain TCP, port 1883) or mqtts:// (TLS, port 8883)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise BrokerUrlError(
                f"broker URL {redact_url(url)!r} must not have a path, query or fragment; "
                "pass TLS files as ca_file=, cert_file=, key_file="
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise BrokerUrlError(f"broker URL {redact_url(url)!r} has an invalid port ({exc}); {_HINT}") from exc
        if not parts.hostname:
            raise BrokerUrlError(f"broker URL {redact_url(url)!r} has no host; {_HINT}")
        return cls(
            host=parts.hostname,
            port=DEFAULT_PORTS[scheme] if port is None else port,
            tls=scheme == "mqtts",
            username=unquote(parts.username) if parts.username else None,
            password=None if parts.password is None else unquote(parts.password),
            ca_file=None if ca_file is None else Path(ca_file),
            cert_file=None if cert_file is None else Path(cert_file),
            key_file=None if key_file is None else Path(key_file),
        )

    def tls_files_problem(
        self, *, ca_file: object = None, cert_file: object = None, key_file: object = None
    ) -> tuple[str, str] | None:
        """``(field, message)`` if these TLS files cannot go with this URL, else None.

        TLS files need an ``mqtts`` URL, and a client certificate needs its
        key (and the other way round). Whether the files exist is not asked:
        a configuration may be checked on another machine than the board's.
        """
        given = [name for name, path in zip(TLS_FILES, (ca_file, cert_file, key_file), strict=True) if path is not None]
        if given and not self.tls:
            return given[0], f"TLS files ({', '.join(given)}) need an mqtts:// broker URL"
        if (cert_file is None) != (key_file is None):
            return ("cert_file" if cert_file is None else "key_file"), "mutual TLS needs both cert_file and key_file"
        return None

    @property
    def scheme(self) -> str:
        return "mqtts" if self.tls else "mqtt"

    def geturl(self, *, redact: bool = True) -> str:
        """``scheme://[user[:pass]@]host:port``; the password is ``***`` unless ``redact`` is False."""
        user = ""
        if self.username is not None:
            secret = "***" if redact else quote(self.password or "", safe="")
            user = quote(self.username, safe="") + (f":{secret}" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"

    def __str__(self) -> str:
        return self.geturl()


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnection attempts: exponential, capped, with "equal jitter".

    Attempt ``n`` (from 0) waits a uniform random time in ``[d * (1 - jitter), d]``
    where ``d = min(maximum, initial * factor**n)``. With the defaults that is
    0.5-1 s, 1-2 s, 2-4 s, ... up to 30-60 s. The jitter spreads a fleet of
    boards that lost a restarting broker at the same moment, so they do not
    reconnect in lockstep; the lower bound keeps one board from hammering a
    broker that is down. A successful connection resets ``n`` to 0.
    """

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial} and {self.maximum}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, rand: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt``; ``rand`` in [0, 1) replaces the random draw."""
        draw = random.random() if rand is None else rand
        # Clamp the exponent: factor**attempt would overflow a float after ~1000 attempts.
        ceiling = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return ceiling * (1.0 - self.jitter * draw)
