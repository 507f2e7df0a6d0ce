"""Exceptions raised by the coordinator.

Every message says what went wrong and what the user can do about it.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class for every error raised by :mod:`coordinator`."""


class AggregationError(CoordinatorError):
    """Client updates cannot be aggregated (mismatched tensors, bad values or counts).

    ``reason`` is the short code an update refused for this error is counted
    and acknowledged under, as :class:`~edge_client.errors.ProtocolError`'s.
    """

    def __init__(self, message: str, reason: str = "bad_tensors"):
        super().__init__(message)
        self.reason = reason


class PartitionError(CoordinatorError, ValueError):
    """A dataset cannot be split among clients as asked, or a partition spec is malformed.

    Also a :class:`ValueError`, so ``argparse`` reports it as a bad option value.
    """


class MissingExtraError(CoordinatorError, ImportError):
    """A feature needs a package of an extra that is not installed (e.g. ``edge``-only on a board).

    Also an :class:`ImportError`, which is what it replaces. The message is one
    line naming the ``pip install`` that fixes it.
    """

    def __init__(self, subject: str, package: str, extra: str, alternative: str = ""):
        message = f"{subject} needs {package}: pip install 'litefed[{extra}]'"
        super().__init__(message + (f", or {alternative}" if alternative else ""))
        self.package = package
        self.extra = extra
