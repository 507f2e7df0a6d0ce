"""Checks of strategy hyper-parameters: one place, one error type.

Every built-in strategy checks its constructor arguments with these
functions and so raises :class:`StrategyConfigError`, a
:class:`~coordinator.errors.CoordinatorError`; a third-party strategy can
use them too. The pure aggregation functions (e.g.
:func:`~coordinator.strategies.robust.trimmed_mean`) run the same checks on
their arguments with ``error=AggregationError``, the error they document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from coordinator.errors import CoordinatorError

__all__ = [
    "FRACTION",
    "NON_NEGATIVE",
    "OPEN_UNIT",
    "POSITIVE",
    "TRIM_FRACTION",
    "UNIT",
    "Interval",
    "StrategyConfigError",
    "check_client_counts",
    "check_count",
    "check_number",
    "check_range",
    "is_int",
    "is_real",
]


# What is_real and is_int accept.
Real = int | float | np.integer | np.floating
Int = int | np.integer


class StrategyConfigError(CoordinatorError):
    """A strategy was given a hyper-parameter outside its range; the message names it and the range."""


@dataclass(frozen=True)
class Interval:
    """A range of real numbers, each end open or closed; ``str`` gives e.g. ``(0, 1]``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: Real) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)  # NumPy compares to numpy.bool; ``in`` makes it a bool anyway

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


FRACTION = Interval(0.0, 1.0, low_open=True)  # (0, 1]: fraction_fit, lr_decay
UNIT = Interval(0.0, 1.0, high_open=True)  # [0, 1): momenta, betas
OPEN_UNIT = Interval(0.0, 1.0, low_open=True, high_open=True)  # (0, 1): the DP delta
TRIM_FRACTION = Interval(0.0, 0.5, high_open=True)  # [0, 0.5): the trimmed mean's beta
POSITIVE = Interval(0.0, math.inf, low_open=True, high_open=True)  # finite and > 0
NON_NEGATIVE = Interval(0.0, math.inf, high_open=True)  # finite and >= 0


def is_real(value: object) -> TypeGuard[Real]:
    """A Python or NumPy real number; ``bool`` is not one (``True`` is no learning rate)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_int(value: object) -> TypeGuard[Int]:
    """A Python or NumPy integer, not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_number(name: str, value: object, *, error: type[CoordinatorError] = StrategyConfigError) -> None:
    """``value`` is a finite real number; two messages, so that NaN reads differently from a string."""
    if not is_real(value):
        raise error(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value}")


def check_range(
    name: str,
    value: object,
    interval: Interval,
    *,
    rule: str | None = None,
    error: type[CoordinatorError] = StrategyConfigError,
) -> None:
    """``value`` is a real number in ``interval``; one message for a non-number, NaN or out of range.

    The message is ``"<name> must be <rule>, got <value>"``, with ``rule``
    defaulting to ``"in <interval>"``.
    """
    if not is_real(value) or math.isnan(value) or value not in interval:
        shown = value if is_real(value) else repr(value)
        raise error(f"{name} must be {rule or f'in {interval}'}, got {shown}")


def check_count(name: str, value: object, minimum: int, *, error: type[CoordinatorError] = StrategyConfigError) -> None:
    """``value`` is an integer of at least ``minimum``."""
    if not is_int(value) or value < minimum:
        raise error(f"{name} must be an int >= {minimum}, got {value!r}")


def check_client_counts(min_fit: object, min_available: object) -> None:
    """``1 <= min_fit <= min_available``, both integers: a round cannot need more updates than clients."""
    if not (is_int(min_fit) and is_int(min_available) and 1 <= min_fit <= min_available):
        raise StrategyConfigError(f"need 1 <= min_fit ({min_fit}) <= min_available ({min_available})")
