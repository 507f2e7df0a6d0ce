"""Hostile JSON is only ever a ProtocolError (edge_client.wire_json), in messages and frame headers."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.errors import ProtocolError
from edge_client.frames import FRAME_VERSION, decode_frame
from edge_client.messages import Ack, Presence, RoundAnnouncement
from edge_client.wire_json import MAX_DEPTH, MAX_INT_DIGITS, loads_bounded

HOSTILE = {
    "deep lists": b"[" * 5000 + b"]" * 5000,
    "deep objects": b'{"a":' * 4000 + b"1" + b"}" * 4000,
    "huge integer": b'{"round": ' + b"9" * 5000 + b"}",
    "float overflow": b'{"round": 1e999}',
    "NaN": b'{"round": NaN}',
    "Infinity": b'{"round": -Infinity}',
    "not UTF-8": b'{"round": "\xff"}',
    "truncated": b'{"round": 1',
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_json_is_the_callers_protocol_error(data):
    with pytest.raises(ProtocolError) as info:
        loads_bounded(data, "message", "bad_json")
    assert info.value.reason == "bad_json"


@pytest.mark.parametrize("parse", [RoundAnnouncement.from_bytes, Presence.from_bytes, Ack.from_bytes])
@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_messages_raise_only_protocol_errors(parse, data):
    with pytest.raises(ProtocolError):
        parse(data)


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_frame_headers_raise_only_protocol_errors(data):
    body = struct.pack("<4sBI", b"LFWT", FRAME_VERSION, len(data)) + data
    with pytest.raises(ProtocolError) as info:
        decode_frame(body + struct.pack("<I", zlib.crc32(body)))
    assert info.value.reason == "bad_header"


def test_the_bounds_are_exact():
    assert loads_bounded(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, "m", "bad_json") is not None
    with pytest.raises(ProtocolError, match="deeper"):
        loads_bounded(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "m", "bad_json")
    assert loads_bounded(b"-" + b"9" * MAX_INT_DIGITS, "m", "bad_json") == -int("9" * MAX_INT_DIGITS)
    with pytest.raises(ProtocolError, match="digits"):
        loads_bounded(b"9" * (MAX_INT_DIGITS + 1), "m", "bad_json")


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = '{"name": "' + "[{" * 100 + '\\"]"}'
    assert loads_bounded(text.encode(), "m", "bad_json") == {"name": "[{" * 100 + '"]'}


@given(st.binary(max_size=200))
def test_any_bytes_are_json_or_a_protocol_error(data):
    with contextlib.suppress(ProtocolError):  # anything else escaping fails the test
        loads_bounded(data, "m", "bad_json")
