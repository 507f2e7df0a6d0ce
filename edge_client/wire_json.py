"""JSON from the network, parsed within bounds: the one JSON decoder of the protocol.

``json.loads`` on hostile bytes can raise ``RecursionError`` (deep nesting),
``ValueError`` (an integer of thousands of digits) or build ``inf`` from
``1e999``. Here the nesting depth, integer length and float range are bounded
before or while parsing, and every failure is the caller's ``ProtocolError``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from edge_client.errors import ProtocolError

MAX_DEPTH = 32  # litefed's own messages nest 3 deep
MAX_INT_DIGITS = 24  # round numbers, sizes and Unix times fit in 20
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def loads_bounded(data: bytes, what: str, reason: str) -> Any:
    """``data`` as JSON, or ``ProtocolError(reason)`` saying what is wrong with it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(reason, f"{what} is not UTF-8: {exc}") from None
    if _depth(text) > MAX_DEPTH:
        raise ProtocolError(reason, f"{what} nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(reason, f"{what} is not valid JSON: {str(exc)[:120]}") from None


def finite_float(value: object, what: str, reason: str) -> float:
    """``value``, a decoded JSON number (int or float, never bool), as a finite float.

    Anything else is ``ProtocolError(reason)``: a non-number, an integer too
    large for a float (never an ``OverflowError``), or a non-finite value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(reason, f"{what} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ProtocolError(reason, f"{what} is out of the float range") from None
    if not math.isfinite(number):
        raise ProtocolError(reason, f"{what} must be finite, got {number}")
    return number


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (a cheap scan before the recursive parser runs)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:30]} is out of float range")
    return value


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")
