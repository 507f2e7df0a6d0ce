"""Exceptions raised by the coordinator.

Every message says what went wrong and what the user can do about it.
"""

from __future__ import annotations

from edge_client import errors as _edge_errors
from edge_client.reasons import BAD_TENSORS


class CoordinatorError(_edge_errors.LitefedError):
    """Base class for every error raised by :mod:`coordinator`."""


class AggregationError(CoordinatorError):
    """Client updates cannot be aggregated (mismatched tensors, bad values or counts).

    ``reason`` is the short code an update refused for this error is counted
    and acknowledged under, as :class:`~edge_client.errors.ProtocolError`'s.
    """

    def __init__(self, message: str, reason: str = BAD_TENSORS):
        super().__init__(message)
        self.reason = reason


class PartitionError(CoordinatorError, ValueError):
    """A dataset cannot be split among clients as asked, or a partition spec is malformed.

    Also a :class:`ValueError`, so ``argparse`` reports it as a bad option value.
    """


class MissingExtraError(CoordinatorError, _edge_errors.MissingExtraError):
    """A feature needs a package of an extra that is not installed (e.g. ``edge``-only on a board).

    Also an :class:`ImportError`, which is what it replaces; the message is one
    line naming the ``pip install`` that fixes it, and ``alternative`` if given.
    """
