"""What a board accepts from the coordinator: signed envelopes, never older than what it already has.

A :class:`Verifier` stands between the wire and the protocol for the three
kinds of message the coordinator signs (``model_meta``, ``global``, ``round``):

- given the coordinator's :class:`~edge_client.signing.TrustKey`, it opens
  each envelope (refusing anything unsigned, tampered, or signed by another
  key) and refuses one issued *before* the newest of its kind already
  accepted (``replayed``): someone who can write the broker's topics can
  replay old signed messages, of an earlier round or of another run, but
  never make a board act on them. Equal issue times pass, since the broker
  redelivers the current retained messages on every connection. The newest
  issue time per kind is kept in the state directory, so the rule survives
  a reboot.
- without one (an unsigned federation) payloads pass as they are, and an
  envelope is refused with a message saying how to provision the key.

Issue times are compared only with each other (the coordinator's clock),
never with the board's own clock, which on a board without an RTC may be
anything until NTP answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_client.errors import ProtocolError, StateError
from edge_client.reasons import REPLAYED, UNKNOWN_KEY
from edge_client.signing import KINDS, TrustKey, is_envelope
from edge_client.state import StateStore

log = logging.getLogger(__name__)


class Verifier:
    """Opens what the coordinator signed, for one board and its state directory."""

    def __init__(self, key: TrustKey | None, store: StateStore | None = None):
        self.key = key
        self.store = store
        self.issued: dict[str, int] = {} if store is None else store.load_issued()

    @classmethod
    def from_path(cls, path: Path | None, store: StateStore | None = None) -> Verifier:
        """A verifier trusting the PEM public key at ``path`` (None: an unsigned federation)."""
        return cls(None if path is None else TrustKey.load(path), store)

    @property
    def signed(self) -> bool:
        return self.key is not None

    def open(self, kind: str, payload: bytes) -> bytes:
        """The body of ``payload`` as ``kind``, or ``ProtocolError`` if this board must not act on it."""
        if self.key is None:
            if is_envelope(payload):
                raise ProtocolError(
                    UNKNOWN_KEY,
                    f"{kind} is signed but this board has no key to check it; give it the coordinator's "
                    "public key (trust_key in client.toml, or --trust-key)",
                )
            return payload
        signed = self.key.open(kind, payload)
        newest = self.issued.get(kind, 0)
        if signed.issued < newest:
            raise ProtocolError(
                REPLAYED,
                f"{kind} issued at {signed.issued} ms, before the newest accepted ({newest} ms): a replay",
            )
        if signed.issued > newest:
            self._remember(kind, signed.issued)
        return signed.body

    def open_stored(self, kind: str, payload: bytes) -> bytes:
        """The body of an envelope this board stored itself: checked again, but no replay rule."""
        if self.key is None:
            return payload
        return self.key.open(kind, payload).body

    def _remember(self, kind: str, issued: int) -> None:
        assert kind in KINDS
        self.issued[kind] = issued
        if self.store is None:
            return
        try:
            self.store.save_issued(self.issued)
        except StateError as exc:  # the rule then holds until the next reboot only
            log.error("%s; replay protection holds in memory only", exc)
