"""Control messages and topics: round trips and rejection of untrusted JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.errors import ProtocolError
from edge_client.messages import UNNAMED_RUN, Ack, ModelMeta, Presence, RoundAnnouncement, is_run_id, new_run_id
from edge_client.topics import Topics

RUN = "0123456789abcdef"
ROUND = RoundAnnouncement(7, ("pi-1", "pi-2"), 1_800_000_000.5, "ab" * 32, epochs=2, lr=0.05, mu=0.01, codec="float16",
                          run=RUN)  # fmt: skip


@pytest.mark.parametrize(
    "message",
    [ROUND, Ack(7, "accepted", run=RUN), Ack(7, "rejected", "stale_round", RUN), Presence("online", 600, "0.1.0")],
    ids=["round", "ack", "ack_reason", "presence"],
)  # fmt: skip
def test_round_trip(message):
    assert type(message).from_bytes(message.to_bytes()) == message


def test_model_meta_round_trip(tiny):
    """A model meta carries a real manifest: decoding checks that it is one, and the model's."""
    meta = ModelMeta(tiny.sha, 6_800_000, 71, tiny.manifest.to_json())
    decoded = ModelMeta.from_bytes(meta.to_bytes())
    assert decoded == meta and decoded.parse_manifest() == tiny.manifest


def _round_json(**changes) -> bytes:
    obj = json.loads(ROUND.to_bytes())
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        b"[]",
        b"not json",
        _round_json(round="7"),
        _round_json(round=True),
        _round_json(round=-1),
        _round_json(epochs=0),
        _round_json(lr=0),
        _round_json(mu=-0.1),
        _round_json(selected=["ok", "bad/id"]),
        _round_json(selected=["+"]),
        _round_json(selected="pi-1"),
        _round_json(deadline=None),
        b"{" + b" " * (1 << 20) + b"}",
    ],
    ids=["utf8", "array", "text", "str_round", "bool_round", "neg_round", "epochs", "lr", "mu", "slash_id",
         "wildcard_id", "selected_str", "deadline_null", "huge"],
)  # fmt: skip
def test_bad_round_announcements_are_protocol_errors(raw):
    with pytest.raises(ProtocolError):
        RoundAnnouncement.from_bytes(raw)


# Run ids that must never be taken for one: wrong length, case, charset, type; path and topic syntax.
HOSTILE_RUNS = ["", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "0123456789abcde/",
                "0123456789abcde+", "../../../../etc", "é" * 16, " 0123456789abcde", 1234567890123456, 1.5, True,
                None, ["0123456789abcdef"], {"run": "0123456789abcdef"}, "f" * 100_000,
                "0123456789abcdef\n"]  # fmt: skip


@pytest.mark.parametrize("run", HOSTILE_RUNS, ids=range(len(HOSTILE_RUNS)))
def test_hostile_run_ids_are_rejected_in_announcements_and_acks(run):
    with pytest.raises(ProtocolError) as info:
        RoundAnnouncement.from_bytes(_round_json(run=run))
    assert info.value.reason == "bad_json"
    ack = json.dumps({"round": 1, "status": "accepted", "reason": "", "run": run}).encode()
    with pytest.raises(ProtocolError) as info:
        Ack.from_bytes(ack)
    assert info.value.reason == "bad_json"


def test_messages_of_protocol_v1_without_a_run_are_refused_with_a_clear_reason():
    obj = json.loads(ROUND.to_bytes())
    del obj["run"]
    with pytest.raises(ProtocolError) as info:
        RoundAnnouncement.from_bytes(json.dumps(obj).encode())
    assert "protocol v1" in str(info.value) and "upgrade" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        Ack.from_bytes(b'{"round": 1, "status": "accepted", "reason": ""}')
    assert "protocol v1" in str(info.value)


def test_new_run_ids_are_valid_and_distinct():
    runs = {new_run_id() for _ in range(200)}
    assert len(runs) == 200 and all(is_run_id(r) for r in runs) and UNNAMED_RUN not in runs


def test_bad_ack_presence_and_meta():
    with pytest.raises(ProtocolError):
        Ack.from_bytes(b'{"round": 1, "status": "maybe", "reason": "", "run": "0123456789abcdef"}')
    with pytest.raises(ProtocolError):
        Presence.from_bytes(b'{"status": "asleep", "num_examples": 1, "version": ""}')
    with pytest.raises(ProtocolError):
        ModelMeta.from_bytes(b'{"model_sha256": "x", "size": 0, "chunks": 1, "manifest": {}}')


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b'{"status": "offline"}', Presence("offline")),  # the spec's Last Will
        (b'{"status": "online", "num_examples": 600}', Presence("online", 600)),  # the spec's presence
        (b'{"status": "online", "num_examples": 3, "version": "0.5.0", "extra": 1}', Presence("online", 3, "0.5.0")),
    ],
)
def test_presence_needs_only_its_status(raw, expected):
    assert Presence.from_bytes(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b'{"status": "online", "num_examples": -1}',
        b'{"status": "online", "num_examples": true}',
        b'{"status": "online", "num_examples": 1.5}',
        b'{"status": "online", "version": null}',
        b'{"status": "online", "num_examples": ' + b"9" * 5000 + b"}",  # a 5,000-digit integer
        b'{"status": "online", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nesting deeper than any parser
    ],
    ids=["no_status", "negative", "bool", "float", "null_version", "huge_int", "deep"],
)
def test_hostile_presence_is_bad_json(raw):
    with pytest.raises(ProtocolError) as info:
        Presence.from_bytes(raw)
    assert info.value.reason == "bad_json"


# -- validation that was the client's: a decoded message is valid by construction ------------


@pytest.mark.parametrize("sha", ["AB" * 32, "ab" * 31, "ab" * 33, "g" * 64, " " + "a" * 63, "", "ab" * 32 + "\n"])
def test_a_sha256_field_that_is_not_64_lowercase_hex_is_bad_sha256(tiny, sha):
    with pytest.raises(ProtocolError) as info:
        RoundAnnouncement.from_bytes(_round_json(model_sha256=sha))
    assert info.value.reason == "bad_sha256"
    with pytest.raises(ProtocolError) as info:
        ModelMeta.from_bytes(dataclasses.replace(tiny.meta(1024), model_sha256=sha).to_bytes())
    assert info.value.reason == "bad_sha256"


def test_a_sha256_field_of_the_wrong_type_is_bad_json():
    with pytest.raises(ProtocolError) as info:
        RoundAnnouncement.from_bytes(_round_json(model_sha256=12))
    assert info.value.reason == "bad_json"


def test_a_model_meta_with_another_models_manifest_is_manifest_mismatch(tiny, make_tiny):
    other = make_tiny(b"another graph", "other")
    meta = ModelMeta(tiny.sha, len(tiny.model), 1, other.manifest.to_json())
    with pytest.raises(ProtocolError) as info:
        ModelMeta.from_bytes(meta.to_bytes())
    assert info.value.reason == "manifest_mismatch"
    with pytest.raises(ProtocolError) as info:
        meta.parse_manifest()  # a meta built in code is checked when its manifest is parsed
    assert info.value.reason == "manifest_mismatch"


@pytest.mark.parametrize("manifest", [{}, {"format": "nope"}, {"format": "litefed-model", "format_version": 2}])
def test_a_model_meta_with_a_malformed_manifest_is_bad_json(tiny, manifest):
    with pytest.raises(ProtocolError) as info:
        ModelMeta.from_bytes(ModelMeta(tiny.sha, 10, 1, manifest).to_bytes())
    assert info.value.reason == "bad_json"


def test_model_bytes_must_have_the_size_model_meta_announced(tiny):
    meta = tiny.meta(1024)
    meta.check_model(tiny.model)
    for model in (tiny.model[:-1], tiny.model + b"\0"):
        with pytest.raises(ProtocolError) as info:
            meta.check_model(model)
        assert info.value.reason == "size_mismatch"


NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),  # beyond the float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)


FIELDS = st.sampled_from(["round", "deadline", "epochs", "lr", "mu"])


def _valid_or_protocol_error(parse) -> None:
    try:
        msg = parse()
    except ProtocolError:
        return
    assert all(isinstance(v, float) and math.isfinite(v) for v in (msg.deadline, msg.lr, msg.mu))
    assert isinstance(msg.round, int) and msg.round >= 0 and msg.epochs >= 1


@settings(max_examples=200)
@given(field=FIELDS, value=NUMBERS)
def test_any_number_in_an_announcement_is_a_valid_message_or_a_protocol_error(field, value):
    data = json.dumps({**json.loads(ROUND.to_bytes()), field: value}).encode()  # inf as Infinity, huge ints in full
    _valid_or_protocol_error(lambda: RoundAnnouncement.from_bytes(data))


@settings(max_examples=200)
@given(field=FIELDS, value=NUMBERS)
def test_fields_beyond_the_decoders_bounds_are_protocol_errors_too(field, value):
    """The fields are checked on their own: a huge int that reached them is no OverflowError."""
    obj = {**json.loads(ROUND.to_bytes()), field: value}
    with mock.patch("edge_client.messages.loads_bounded", return_value=obj):
        _valid_or_protocol_error(lambda: RoundAnnouncement.from_bytes(b"{}"))


@pytest.mark.parametrize("text", ["1e309", "-1e400", "9" * 400, "1" + "0" * 309 + ".5"])
@pytest.mark.parametrize("field", ["round", "deadline", "lr"])
def test_numbers_beyond_the_float_range_are_bad_json(field, text):
    raw = _round_json().replace(f'"{field}": '.encode(), f'"{field}": {text}, "_{field}": '.encode())
    with pytest.raises(ProtocolError) as info:
        RoundAnnouncement.from_bytes(raw)
    assert info.value.reason == "bad_json"


def test_topics_layout_and_client_extraction():
    t = Topics("mnist-demo")
    assert t.update("pi-3") == "litefed/mnist-demo/update/pi-3"
    assert t.updates == "litefed/mnist-demo/update/+"
    assert t.model_chunk(4) == "litefed/mnist-demo/model/chunk/4"
    assert t.client_of("litefed/mnist-demo/update/pi-3") == "pi-3"
    assert t.client_of("litefed/mnist-demo/presence/pi-3") == "pi-3"
    assert t.client_of("litefed/other/update/pi-3") is None
    assert t.client_of("litefed/mnist-demo/ack/pi-3") is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "sp ace"])
def test_ids_with_topic_syntax_are_refused(bad):
    with pytest.raises(ValueError):
        Topics(bad)
    with pytest.raises(ValueError):
        Topics("ok").update(bad)
