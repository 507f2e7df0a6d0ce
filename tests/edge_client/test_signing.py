"""Signed envelopes: only the coordinator's key opens them, for the kind they were sealed as."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.errors import ProtocolError
from edge_client.reasons import BAD_SIGNATURE, UNKNOWN_KEY, UNSIGNED
from edge_client.signing import HEADER_SIZE, KINDS, KeyFileError, SigningKey, TrustKey
from tests.helpers import reason_of

KEY = SigningKey.generate()
BODY = b'{"round": 3, "run": "0123456789abcdef"}'


@pytest.mark.parametrize("kind", KINDS)
def test_a_sealed_body_opens_with_the_trust_key_for_its_kind(kind):
    envelope = KEY.seal(kind, BODY)
    assert len(envelope) == HEADER_SIZE + len(BODY)
    assert KEY.trust_key.open(kind, envelope).body == BODY


def test_an_envelope_cannot_be_replayed_as_another_kind():
    envelope = KEY.seal("round", BODY)
    assert reason_of(lambda: KEY.trust_key.open("model_meta", envelope)) == BAD_SIGNATURE
    assert reason_of(lambda: KEY.trust_key.open("global", envelope)) == BAD_SIGNATURE


@pytest.mark.parametrize("position", [0, 5, 13, 14, 20, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + len(BODY) - 1])
def test_any_flipped_byte_is_refused(position):
    envelope = bytearray(KEY.seal("global", BODY))
    envelope[position] ^= 0x01
    assert reason_of(lambda: KEY.trust_key.open("global", bytes(envelope))) in {UNSIGNED, UNKNOWN_KEY, BAD_SIGNATURE}


def test_another_key_is_named_unknown_and_a_forged_signature_bad():
    other = SigningKey.generate()
    assert reason_of(lambda: KEY.trust_key.open("round", other.seal("round", BODY))) == UNKNOWN_KEY
    forged = bytearray(KEY.seal("round", BODY))
    forged[HEADER_SIZE - 64 : HEADER_SIZE] = other.seal("round", BODY)[HEADER_SIZE - 64 : HEADER_SIZE]
    assert reason_of(lambda: KEY.trust_key.open("round", bytes(forged))) == BAD_SIGNATURE


@pytest.mark.parametrize("data", [b"", BODY, b"LFSG", b"LFSG\x01" + b"\0" * 40, b"LFSG\x02" + bytes(HEADER_SIZE)])
def test_unsigned_short_or_unknown_version_envelopes_are_unsigned(data):
    assert reason_of(lambda: KEY.trust_key.open("round", data)) == UNSIGNED


def test_keys_round_trip_through_pem_files(tmp_path):
    KEY.save(tmp_path / "coordinator.key")
    KEY.trust_key.save(tmp_path / "coordinator.pub")
    assert stat.S_IMODE((tmp_path / "coordinator.key").stat().st_mode) == 0o600
    loaded, trust = SigningKey.load(tmp_path / "coordinator.key"), TrustKey.load(tmp_path / "coordinator.pub")
    assert trust.key_id == KEY.trust_key.key_id
    assert trust.open("global", loaded.seal("global", BODY)).body == BODY


def test_bad_key_files_are_one_line_errors(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read the trust key"):
        TrustKey.load(tmp_path / "missing.pub")
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        TrustKey.load(tmp_path / "junk.pem")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        SigningKey.load(tmp_path / "junk.pem")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pub").write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match="Ed25519 keys only"):
        TrustKey.load(tmp_path / "ec.pub")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(KINDS))
def test_arbitrary_bytes_raise_only_the_protocol_error(data, kind):
    with pytest.raises(ProtocolError):
        KEY.trust_key.open(kind, data)
