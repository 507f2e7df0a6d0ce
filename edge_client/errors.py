"""Exceptions raised by the edge client.

Every message says what went wrong and what the user can do about it.
"""

from __future__ import annotations


class EdgeClientError(Exception):
    """Base class for every error raised by :mod:`edge_client`."""


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
