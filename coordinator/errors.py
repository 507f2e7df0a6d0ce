"""Exceptions raised by the coordinator.

Every message says what went wrong and what the user can do about it.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class for every error raised by :mod:`coordinator`."""


class AggregationError(CoordinatorError):
    """Client updates cannot be aggregated (mismatched tensors, bad values or counts)."""


class PartitionError(CoordinatorError, ValueError):
    """A dataset cannot be split among clients as asked, or a partition spec is malformed.

    Also a :class:`ValueError`, so ``argparse`` reports it as a bad option value.
    """
