"""Signed envelopes: boards trust only what the coordinator signed (Ed25519, via ``cryptography``).

The coordinator holds a private :class:`SigningKey`; boards are provisioned
with its public half, a :class:`TrustKey`. What boards act on (the model meta,
each global frame, each round announcement) is published as an envelope::

    b"LFSG" | version (1 byte) | key id (8 bytes) | issued (u64 LE, ms) | Ed25519 signature (64 bytes) | body

The signature covers ``b"litefed-signed-v1\\0" + kind + b"\\0" + issued + body``:
the ``kind`` (``model_meta``, ``global``, ``round``) is the domain, so a signed
announcement cannot be replayed as a model meta or a global frame. ``issued``
is when the coordinator sealed it (Unix milliseconds, by the coordinator's
clock, never decreasing within one process): a board refuses a message of a
kind older than the newest of that kind it accepted (see
:mod:`edge_client.trust`), so an old signed message replayed from the broker,
of an earlier round or another run, is never acted on. The key id is the first
8 bytes of the SHA-256 of the raw public key; it names which key signed, so an
operator can rotate keys.

:meth:`TrustKey.open` checks the envelope before anything parses the body and
raises only :class:`~edge_client.errors.ProtocolError`, with the reasons
``unsigned``, ``unknown_key`` and ``bad_signature``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_client.durable import atomic_write
from edge_client.errors import KeyFileError, ProtocolError
from edge_client.reasons import BAD_SIGNATURE, UNKNOWN_KEY, UNSIGNED

MAGIC = b"LFSG"
VERSION = 1
KINDS = ("model_meta", "global", "round")
_HEADER = struct.Struct("<4sB8sQ64s")  # magic, version, key id, issued (ms), signature
HEADER_SIZE = _HEADER.size  # 85 bytes in front of the body
_ISSUED = struct.Struct("<Q")
_DOMAIN = b"litefed-signed-v1\0"


def _signed_message(kind: str, issued: int, body: bytes) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _DOMAIN + kind.encode() + b"\0" + _ISSUED.pack(issued) + body


def is_envelope(payload: bytes) -> bool:
    """Whether ``payload`` claims to be a signed envelope (it starts with the magic); nothing is checked."""
    return payload[:4] == MAGIC


@dataclass(frozen=True)
class Signed:
    """An opened envelope: the body, and when the coordinator sealed it (Unix milliseconds)."""

    body: bytes
    issued: int


def _key_id(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8]


@dataclass(frozen=True)
class TrustKey:
    """The coordinator's public key, as provisioned onto boards: opens envelopes it signed."""

    public: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return _key_id(self.public).hex()

    def open(self, kind: str, envelope: bytes) -> Signed:
        """The body of ``envelope`` and its issue time, if this key signed it as ``kind``; else ``ProtocolError``."""
        if len(envelope) < HEADER_SIZE or not is_envelope(envelope):
            raise ProtocolError(UNSIGNED, f"{kind} is not signed: boards accept only what the coordinator signed")
        magic, version, key_id, issued, signature = _HEADER.unpack_from(envelope)
        if version != VERSION:
            raise ProtocolError(UNSIGNED, f"{kind}: signature format version {version}, this board knows {VERSION}")
        if key_id != _key_id(self.public):
            raise ProtocolError(
                UNKNOWN_KEY,
                f"{kind} is signed by key {key_id.hex()}, this board trusts {self.key_id}; "
                "provision the board with the coordinator's current public key",
            )
        body = envelope[HEADER_SIZE:]
        try:
            self.public.verify(signature, _signed_message(kind, issued, body))
        except InvalidSignature:
            raise ProtocolError(BAD_SIGNATURE, f"{kind}: the signature does not match (tampered or forged)") from None
        return Signed(body, issued)

    def pem(self) -> bytes:
        """The key as a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo), as boards are provisioned with it."""
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def save(self, path: Path) -> None:
        atomic_write(Path(path), self.pem())

    @classmethod
    def load(cls, path: Path) -> TrustKey:
        """A trust key from a PEM public-key file (what ``litefed-provision`` writes onto boards)."""
        data = _read_key_file(path, "trust key")
        try:
            public = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise KeyFileError(f"{path}: a {type(public).__name__}, litefed trusts Ed25519 keys only")
        return cls(public)


class SigningKey:
    """The coordinator's private key: seals what it publishes into signed envelopes.

    Issue times never decrease within one key object (a clock stepped back by
    NTP does not make later messages look older than earlier ones).
    """

    def __init__(self, private: Ed25519PrivateKey):
        self.private = private
        self._last_issued = 0
        self._lock = threading.Lock()

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def trust_key(self) -> TrustKey:
        """The public half, for the boards."""
        return TrustKey(self.private.public_key())

    def seal(self, kind: str, body: bytes, issued: int | None = None) -> bytes:
        """``body`` in an envelope signed as ``kind``, issued now (or at ``issued``, Unix milliseconds)."""
        if issued is None:
            issued = self._now()
        signature = self.private.sign(_signed_message(kind, issued, body))
        return _HEADER.pack(MAGIC, VERSION, _key_id(self.private.public_key()), issued, signature) + body

    def _now(self) -> int:
        with self._lock:
            self._last_issued = max(int(time.time() * 1000), self._last_issued)
            return self._last_issued

    def save(self, path: Path) -> None:
        """Write the key as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600)."""
        pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(Path(path), pem)
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        data = _read_key_file(path, "signing key")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: a {type(private).__name__}, litefed signs with Ed25519 keys only")
        return cls(private)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
