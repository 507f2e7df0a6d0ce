"""Control messages and topics: round trips and rejection of untrusted JSON."""

from __future__ import annotations

import json

import pytest

from edge_client.errors import ProtocolError
from edge_client.messages import UNNAMED_RUN, Ack, ModelMeta, Presence, RoundAnnouncement, is_run_id, new_run_id
from edge_client.topics import Topics

RUN = "0123456789abcdef"
ROUND = RoundAnnouncement(7, ("pi-1", "pi-2"), 1_800_000_000.5, "ab" * 32, epochs=2, lr=0.05, mu=0.01, codec="float16",
                          run=RUN)  # fmt: skip


@pytest.mark.parametrize(
    "message",
    [ROUND, Ack(7, "accepted", run=RUN), Ack(7, "rejected", "stale_round", RUN), Presence("online", 600, "0.1.0"),
     ModelMeta("ab" * 32, 6_800_000, 71, {"format": "litefed-model"})],
    ids=["round", "ack", "ack_reason", "presence", "model_meta"],
)  # fmt: skip
def test_round_trip(message):
    assert type(message).from_bytes(message.to_bytes()) == message


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
                None, ["0123456789abcdef"], {"run": "0123456789abcdef"}, "f" * 100_000]  # fmt: skip


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
