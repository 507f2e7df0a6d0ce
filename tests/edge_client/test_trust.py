"""What a board accepts from the coordinator: signed, by its key, never older than what it has."""

from __future__ import annotations

import logging

import pytest

from edge_client.errors import ProtocolError
from edge_client.reasons import BAD_SIGNATURE, REPLAYED, UNKNOWN_KEY, UNSIGNED
from edge_client.signing import SigningKey
from edge_client.state import StateStore
from edge_client.trust import Verifier
from tests.helpers import reason_of

KEY = SigningKey.generate()
BODY = b'{"round": 3}'


def test_an_unsigned_federation_passes_payloads_and_refuses_envelopes_saying_what_to_do():
    verifier = Verifier(None)
    assert verifier.open("round", BODY) == BODY
    with pytest.raises(ProtocolError, match="trust_key in client.toml, or --trust-key") as info:
        verifier.open("round", KEY.seal("round", BODY))
    assert info.value.reason == UNKNOWN_KEY


def test_a_signed_federation_opens_its_key_s_envelopes_only():
    verifier = Verifier(KEY.trust_key)
    assert verifier.open("round", KEY.seal("round", BODY)) == BODY
    assert reason_of(lambda: verifier.open("round", BODY)) == UNSIGNED
    assert reason_of(lambda: verifier.open("round", SigningKey.generate().seal("round", BODY))) == UNKNOWN_KEY
    assert reason_of(lambda: verifier.open("global", KEY.seal("round", BODY))) == BAD_SIGNATURE


def test_an_older_envelope_of_a_kind_is_a_replay_and_the_same_or_a_newer_one_passes():
    verifier = Verifier(KEY.trust_key)
    old, current, newer = (KEY.seal("round", BODY, issued=t) for t in (1_000, 2_000, 3_000))
    assert verifier.open("round", current) == BODY
    assert verifier.open("round", current) == BODY  # the broker redelivers retained messages
    assert reason_of(lambda: verifier.open("round", old)) == REPLAYED
    assert verifier.open("global", KEY.seal("global", BODY, issued=1_500)) == BODY  # kinds are separate
    assert verifier.open("round", newer) == BODY
    assert reason_of(lambda: verifier.open("round", current)) == REPLAYED


def test_a_refused_envelope_does_not_move_the_newest_time():
    verifier = Verifier(KEY.trust_key)
    verifier.open("round", KEY.seal("round", BODY, issued=2_000))
    forged = bytearray(KEY.seal("round", BODY, issued=9_000))
    forged[-1] ^= 1
    assert reason_of(lambda: verifier.open("round", bytes(forged))) == BAD_SIGNATURE
    assert verifier.open("round", KEY.seal("round", BODY, issued=3_000)) == BODY


def test_the_replay_rule_survives_a_reboot(tmp_path):
    store = StateStore(tmp_path)
    Verifier(KEY.trust_key, store).open("global", KEY.seal("global", BODY, issued=5_000))
    rebooted = Verifier(KEY.trust_key, StateStore(tmp_path))
    assert reason_of(lambda: rebooted.open("global", KEY.seal("global", BODY, issued=4_999))) == REPLAYED
    assert rebooted.open("global", KEY.seal("global", BODY, issued=5_000)) == BODY


def test_a_damaged_issued_file_is_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / "issued.json").write_text('{"round": "soon"}')
    with caplog.at_level(logging.WARNING):
        verifier = Verifier(KEY.trust_key, StateStore(tmp_path))
    assert verifier.issued == {}
    assert "issued.json: damaged" in caplog.text


def test_a_stored_envelope_is_checked_again_but_not_against_the_replay_rule():
    verifier = Verifier(KEY.trust_key)
    verifier.open("global", KEY.seal("global", BODY, issued=9_000))
    assert verifier.open_stored("global", KEY.seal("global", BODY, issued=1_000)) == BODY
    assert reason_of(lambda: verifier.open_stored("global", BODY)) == UNSIGNED


def test_sealing_never_goes_back_in_time(monkeypatch):
    key = SigningKey.generate()
    clock = iter([2_000.0, 1_000.0, 3_000.0])
    monkeypatch.setattr("edge_client.signing.time.time", lambda: next(clock))
    issued = [key.trust_key.open("round", key.seal("round", BODY)).issued for _ in range(3)]
    assert issued == [2_000_000, 2_000_000, 3_000_000]
