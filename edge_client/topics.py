"""The MQTT topic tree of one federation.

Everything lives under ``<prefix>/<federation>/`` so that several
federations share a broker and an ACL can grant a board exactly its own
branch. See docs/protocol.md for who publishes what, retained or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Federation and client ids: 1-64 of ``A-Z a-z 0-9 _ . -`` (no MQTT wildcards or levels)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters from A-Z, a-z, 0-9, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for ``prefix/federation``."""

    federation: str = "default"
    prefix: str = "litefed"

    def __post_init__(self) -> None:
        check_name("federation", self.federation)
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.startswith("/"):
            raise ValueError(f"topic prefix {self.prefix!r} must be non-empty, without '+', '#' or a leading '/'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.federation}"

    # coordinator -> clients, retained
    @property
    def model_meta(self) -> str:
        return f"{self.base}/model/meta"

    def model_chunk(self, index: int) -> str:
        return f"{self.base}/model/chunk/{index}"

    @property
    def model_chunks(self) -> str:
        return f"{self.base}/model/chunk/+"

    def global_chunk(self, index: int) -> str:
        return f"{self.base}/global/chunk/{index}"

    @property
    def global_chunks(self) -> str:
        return f"{self.base}/global/chunk/+"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    # clients -> coordinator
    def update(self, client_id: str) -> str:
        return f"{self.base}/update/{check_name('client id', client_id)}"

    @property
    def updates(self) -> str:
        return f"{self.base}/update/+"

    def presence(self, client_id: str) -> str:
        return f"{self.base}/presence/{check_name('client id', client_id)}"

    @property
    def presences(self) -> str:
        return f"{self.base}/presence/+"

    # coordinator -> one client
    def ack(self, client_id: str) -> str:
        return f"{self.base}/ack/{check_name('client id', client_id)}"

    def client_of(self, topic: str) -> str | None:
        """The client id in an ``update/<id>`` or ``presence/<id>`` topic, else None."""
        head, _, client = topic.rpartition("/")
        if head in (f"{self.base}/update", f"{self.base}/presence") and _NAME.match(client):
            return client
        return None
