"""The edge client's settings: a TOML file, overridden by command-line flags.

Example ``client.toml`` (only ``client_id`` and ``[data]`` are required)::

    client_id = "pi-17"                  # 1-64 of A-Z a-z 0-9 _ . -, unique in the federation
    broker_url = "mqtts://pi-17:secret@broker.example.com:8883"   # default mqtt://127.0.0.1:1883
    federation = "default"
    topic_prefix = "litefed"
    state_dir = "/var/lib/litefed/pi-17" # default: $XDG_STATE_HOME/litefed/<federation>/<client_id>
    ack_timeout = 30                     # seconds to wait for the coordinator's ack before resending
    max_resends = 5                      # resends of one update before giving up
    max_chunk = 98304                    # bytes per MQTT message (chunk header included)
    num_threads = 2                      # LiteRT interpreter threads (default: LiteRT's choice)
    seed = 17                            # shuffling seed (default: random)
    # ca_file = "ca.pem"                 # TLS (mqtts:// only): CA bundle of the broker
    # cert_file = "pi-17.crt"            # mutual TLS: client certificate and key, both or neither
    # key_file = "pi-17.key"
    # trust_key = "coordinator.pub"      # the coordinator's public key: accept only what it signed

    [data]
    kind = "npz"                         # "npz", "images" or "csv"
    path = "data/part-3.npz"
    x_key = "x"                          # npz only (defaults "x" and "y")
    y_key = "y"

The other kinds of data source::

    [data]
    kind = "images"                      # path/<label>/*.png|jpg|...; resized to the model's input
    path = "photos"
    labels = ["cat", "dog"]              # optional: folder labels[i] is class i (default: sorted folders)

    [data]
    kind = "csv"                         # numeric features, one example per row
    path = "readings.csv"
    label_column = -1                    # index (negative from the end) or, with a header, a name
    has_header = true                    # default: guessed (a first row without numbers is a header)
    delimiter = ","

Relative paths in the file are relative to the file's directory; relative
paths given as overrides (command-line flags) are relative to the working
directory. Unknown keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_client.broker_url import TLS_FILES, BrokerUrl
from edge_client.chunks import DEFAULT_MAX_CHUNK, HEADER_SIZE
from edge_client.errors import BrokerUrlError, ConfigError
from edge_client.topics import Topics, check_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATA_KINDS = ("npz", "images", "csv")
# MQTT's hard limit on one message (the remaining-length field), minus room for the topic.
MAX_CHUNK_LIMIT = 256 * 1024 * 1024 - 64 * 1024
# Options of [data] that belong to one kind only.
_KIND_OPTIONS = {
    "npz": ("x_key", "y_key"),
    "images": ("labels",),
    "csv": ("label_column", "has_header", "delimiter"),
}


def _fail(field_name: str, message: str) -> ConfigError:
    return ConfigError(f"{field_name}: {message}")


def _check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(name, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _fail(name, f"must be at most {maximum}, got {value}")
    return value


def _check_str(name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise _fail(name, f"must be a non-empty string, got {value!r}")
    return value


def _check_path(name: str, value: Any) -> Path:
    if isinstance(value, Path):
        return value
    return Path(_check_str(name, value)).expanduser()


def _parse_broker_url(url: Any) -> BrokerUrl:
    """``broker_url`` checked by :class:`BrokerUrl` (its TLS files apart); :class:`ConfigError` names the field."""
    try:
        return BrokerUrl.parse(url)
    except BrokerUrlError as exc:
        raise _fail("broker_url", str(exc)) from None


@dataclass(frozen=True)
class DataSourceConfig:
    """Where the device's training data comes from.

    ``kind`` is ``npz`` (arrays ``x_key``/``y_key``), ``images`` (one folder
    per label; ``labels`` fixes the label order) or ``csv`` (``label_column``,
    ``has_header``, ``delimiter``). Options of the other kinds are ignored.
    """

    kind: str
    path: Path
    x_key: str = "x"
    y_key: str = "y"
    labels: tuple[str, ...] | None = None
    label_column: int | str = -1
    has_header: bool | None = None
    delimiter: str = ","

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise _fail("data.kind", f"must be one of {', '.join(DATA_KINDS)}; got {self.kind!r}")
        object.__setattr__(self, "path", _check_path("data.path", self.path))
        _check_str("data.x_key", self.x_key)
        _check_str("data.y_key", self.y_key)
        if self.labels is not None:
            if isinstance(self.labels, str) or not all(isinstance(v, str) and v for v in self.labels):
                raise _fail("data.labels", f"must be a list of folder names, got {self.labels!r}")
            labels = tuple(self.labels)
            if not labels or len(set(labels)) != len(labels):
                raise _fail("data.labels", f"must be a non-empty list of unique folder names, got {list(labels)}")
            object.__setattr__(self, "labels", labels)
        if isinstance(self.label_column, str):
            _check_str("data.label_column", self.label_column)
        else:
            _check_int("data.label_column", self.label_column)
        if self.has_header is not None and not isinstance(self.has_header, bool):
            raise _fail("data.has_header", f"must be true or false, got {self.has_header!r}")
        if not isinstance(self.delimiter, str) or len(self.delimiter) != 1:
            raise _fail("data.delimiter", f"must be a single character, got {self.delimiter!r}")

    def describe(self) -> str:
        return f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class ClientConfig:
    """Everything one edge client needs to know; validated on construction."""

    client_id: str
    state_dir: Path
    broker_url: str = "mqtt://127.0.0.1:1883"
    federation: str = "default"
    topic_prefix: str = "litefed"
    data: DataSourceConfig | None = None
    num_threads: int | None = None
    ack_timeout: float = 30.0
    max_resends: int = 5
    max_chunk: int = DEFAULT_MAX_CHUNK
    seed: int | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    trust_key: Path | None = None

    def __post_init__(self) -> None:
        try:
            check_name("client id", self.client_id)
        except ValueError as exc:
            raise _fail("client_id", str(exc)) from None
        object.__setattr__(self, "state_dir", _check_path("state_dir", self.state_dir))
        url = _parse_broker_url(self.broker_url)
        try:
            check_name("federation", self.federation)
        except ValueError as exc:
            raise _fail("federation", str(exc)) from None
        _check_str("topic_prefix", self.topic_prefix)
        try:
            Topics(self.federation, self.topic_prefix)
        except ValueError as exc:
            raise _fail("topic_prefix", str(exc)) from None
        if self.data is not None and not isinstance(self.data, DataSourceConfig):
            raise _fail("data", f"must be a DataSourceConfig, got {type(self.data).__name__}")
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, 1, 1024)
        timeout = self.ack_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise _fail("ack_timeout", f"must be a number of seconds, got {timeout!r}")
        if timeout <= 0:
            raise _fail("ack_timeout", f"must be positive, got {timeout}")
        object.__setattr__(self, "ack_timeout", float(timeout))
        _check_int("max_resends", self.max_resends, 0, 10_000)
        _check_int("max_chunk", self.max_chunk, HEADER_SIZE + 1, MAX_CHUNK_LIMIT)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        for name in TLS_FILES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_path(name, value))
        if self.trust_key is not None:
            object.__setattr__(self, "trust_key", _check_path("trust_key", self.trust_key))
        problem = url.tls_files_problem(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)
        if problem is not None:
            raise _fail(*problem)

    @property
    def topics(self) -> Topics:
        return Topics(self.federation, self.topic_prefix)

    def broker(self) -> BrokerUrl:
        """The broker to connect to: ``broker_url`` with the TLS files.

        Raises :class:`~edge_client.errors.BrokerUrlError` if a TLS file is
        missing; that is checked here, on the board, not when the
        configuration is read.
        """
        return BrokerUrl.parse(self.broker_url, ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)


def default_state_dir(federation: str, client_id: str) -> Path:
    """``$XDG_STATE_HOME/litefed/<federation>/<client_id>`` (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "litefed" / federation / client_id


def parse_data_spec(text: str) -> dict[str, str]:
    """``KIND:PATH`` (as given to ``--data``) -> ``{"kind": KIND, "path": PATH}``."""
    kind, sep, path = str(text).partition(":")
    if not sep or kind not in DATA_KINDS or not path:
        raise _fail("data", f"{text!r} must look like KIND:PATH with KIND one of {', '.join(DATA_KINDS)}")
    return {"kind": kind, "path": path}


_TOP_KEYS = tuple(f.name for f in fields(ClientConfig))
_PATH_KEYS = ("state_dir", "ca_file", "cert_file", "key_file", "trust_key")
_DATA_KEYS = tuple(f.name for f in fields(DataSourceConfig))


def _check_keys(where: str, table: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}")


def _resolve(path: Any, base: Path | None) -> Any:
    """A relative path from the config file is relative to the file's directory."""
    if base is None or not isinstance(path, str) or not path:
        return path
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def read_toml(path: Path) -> dict[str, Any]:
    """The raw table of a config file; :class:`ConfigError` if it is missing or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(
    path: Path | str | None, overrides: Mapping[str, Any] | None = None, *, require_data: bool = True
) -> ClientConfig:
    """Read the TOML file at ``path`` (if any), apply ``overrides`` and validate everything.

    ``overrides`` uses the file's key names; ``None`` values are skipped so a
    command line can pass every flag. ``overrides["data"]`` may be a table or
    a ``"KIND:PATH"`` string: it replaces the file's ``kind`` and ``path`` and
    keeps the file's other ``[data]`` options when the kind stays the same.
    Raises :class:`ConfigError` naming the offending field.
    """
    raw: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        path = Path(path)
        raw = read_toml(path)
        base = path.resolve().parent
        where = str(path)
    else:
        where = "config"
    _check_keys(where, raw, _TOP_KEYS)
    data_table = raw.pop("data", None)
    if data_table is not None:
        if not isinstance(data_table, dict):
            raise ConfigError(f"{where}: data must be a table ([data] with kind and path)")
        _check_keys(f"{where}: [data]", data_table, _DATA_KEYS)
        data_table = dict(data_table)
        data_table["path"] = _resolve(data_table.get("path"), base)
    for key in _PATH_KEYS:
        if key in raw:
            raw[key] = _resolve(raw[key], base)

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys("overrides", overrides, _TOP_KEYS)
    data_override = overrides.pop("data", None)
    raw.update(overrides)
    if data_override is not None:
        if isinstance(data_override, str):
            data_override = parse_data_spec(data_override)
        if not isinstance(data_override, Mapping):
            raise _fail("data", f"must be a table or KIND:PATH, got {data_override!r}")
        _check_keys("overrides: data", data_override, _DATA_KEYS)
        same_kind = data_table is not None and data_table.get("kind") == data_override.get("kind", data_table["kind"])
        data_table = {**(data_table if same_kind else {}), **data_override}

    data = _build_data(data_table) if data_table is not None else None
    if data is None and require_data:
        raise _fail("data", "required: add a [data] table with kind and path, or pass --data KIND:PATH")
    if "client_id" not in raw:
        raise _fail("client_id", 'required: set client_id = "..." in the config file or pass --client-id')
    client_id = raw["client_id"]
    if "state_dir" not in raw:
        federation = raw.get("federation", "default")
        try:
            check_name("client id", client_id)
            check_name("federation", federation)
        except ValueError:
            pass  # ClientConfig reports the bad name
        else:
            raw["state_dir"] = default_state_dir(federation, client_id)
    raw["state_dir"] = raw.get("state_dir", Path("."))
    return ClientConfig(**{**raw, "data": data})


def _build_data(table: dict[str, Any]) -> DataSourceConfig:
    for key in ("kind", "path"):
        if table.get(key) in (None, ""):
            raise _fail(f"data.{key}", f"required; data kinds are {', '.join(DATA_KINDS)}")
    kind = table["kind"]
    if kind not in DATA_KINDS:
        raise _fail("data.kind", f"must be one of {', '.join(DATA_KINDS)}; got {kind!r}")
    for other, options in _KIND_OPTIONS.items():
        if other != kind:
            for option in options:
                if option in table:
                    raise _fail(f"data.{option}", f"applies to data kind {other!r} only, not {kind!r}")
    table = dict(table)
    if "labels" in table and isinstance(table["labels"], list):
        table["labels"] = tuple(table["labels"])
    return DataSourceConfig(**table)
