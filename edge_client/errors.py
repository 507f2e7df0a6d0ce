"""Exceptions raised by the edge client.

Every message says what went wrong and what the user can do about it.
"""

from __future__ import annotations


class LitefedError(Exception):
    """The root of every error litefed raises on purpose, in all three packages.

    ``except LitefedError`` catches :class:`EdgeClientError`,
    ``coordinator.errors.CoordinatorError`` and
    ``converter.errors.ConverterError``; anything else escaping litefed is a bug.
    It lives here because ``edge_client`` is the package the other two build on.
    """


class EdgeClientError(LitefedError):
    """Base class for every error raised by :mod:`edge_client`."""


class MissingExtraError(LitefedError, ImportError):
    """A feature needs a package of an extra that is not installed (e.g. ``edge``-only on a board).

    Also an :class:`ImportError`, which is what it replaces. The message is one
    line naming the ``pip install`` that fixes it (and ``alternative``, if any).
    """

    def __init__(self, subject: str, package: str, extra: str, alternative: str = ""):
        message = f"{subject} needs {package}: pip install 'litefed[{extra}]'"
        super().__init__(message + (f", or {alternative}" if alternative else ""))
        self.package = package
        self.extra = extra


class ManifestError(EdgeClientError):
    """A model manifest is missing, malformed or does not match its model."""


class ModelFileError(EdgeClientError):
    """A ``.tflite`` file cannot be read or uses operators LiteRT cannot run."""


class WeightsError(EdgeClientError):
    """Weights do not match the model (names, shapes, dtypes or values)."""


class ProtocolError(EdgeClientError):
    """A message from the wire is malformed or does not fit the federation.

    ``reason`` is a short stable code (``bad_magic``, ``bad_checksum``, ...)
    that services count and log; the message says what was wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class DataError(EdgeClientError):
    """Local training data cannot be read or does not fit the model."""


class TransportError(EdgeClientError):
    """Messages cannot be exchanged with the MQTT broker."""


class BrokerUrlError(TransportError, ValueError):
    """A broker URL (``mqtt://user:pass@host:1883``, ``mqtts://host``) or its TLS files are invalid.

    Also a :class:`ValueError`, so ``argparse`` reports it as a bad option value.
    """


class BrokerUnavailable(TransportError):
    """The broker cannot be reached, or it refused the connection."""


class BrokerAuthError(BrokerUnavailable):
    """The broker refused the credentials or certificate; retrying will not help."""


class BrokerDown(BrokerUnavailable):
    """The broker cannot be reached right now (connection refused, no route, no handshake): retrying may help.

    Unlike other :class:`BrokerUnavailable` errors (a refused client id, a TLS
    or protocol mismatch, bad credentials), this one is expected while a broker
    restarts, so a board that boots meanwhile retries instead of exiting.
    """


class PublishFailed(TransportError):
    """A message was not acknowledged by the broker; the caller may resend it."""


class PayloadTooLarge(TransportError):
    """A payload exceeds the transport's ``max_payload``; split it into chunks first."""


class SubscribeFailed(TransportError):
    """The broker refused a subscription or did not acknowledge it in time."""


class ConfigError(EdgeClientError):
    """The edge client's configuration (TOML file or command-line flags) is invalid.

    The message names the field and says what is allowed.
    """


class StateError(EdgeClientError):
    """The client's state directory cannot be created or written."""


class KeyFileError(EdgeClientError):
    """A signing or trust key file is missing, unreadable or not an Ed25519 key in PEM."""
