"""Who is online: presence messages taken within bounds, so that none can stop the coordinator or grow it.

See :class:`Presences`; docs/protocol.md, "Hostile input".
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable

from edge_client.errors import ProtocolError
from edge_client.messages import Presence
from edge_client.reasons import TOO_LARGE

log = logging.getLogger(__name__)

# Why a presence message was ignored (RoundMetrics.presence_ignored); a malformed one counts under its reason.
NOT_LISTED = "not_listed"
OVER_MAX_CLIENTS = "over_max_clients"
RATE_LIMITED = "rate_limited"
MAX_PRESENCE_BYTES = 4096  # a board's presence is under 100 bytes
PRESENCE_WINDOW = 60.0  # seconds: the rate limit's window, and the least time between two warnings of one kind
_WHAT_TO_DO = {
    NOT_LISTED: "it is not in --clients-file; add it there to let it join",
    OVER_MAX_CLIENTS: "{max_clients} clients are online already; raise --max-clients for a larger fleet",
    RATE_LIMITED: "it changed more than {rate} times in a minute; ignored for the rest of the minute (--presence-rate)",
}


class Presences:
    """Who is online, with the examples each reported, from presence messages within bounds.

    No presence can stop the coordinator or grow it without bound. A
    malformed one (at most :data:`MAX_PRESENCE_BYTES`) is ignored and counted
    under its reason; with ``allowed`` ids, any other id is ignored
    (``not_listed``); at most ``max_clients`` clients are online, a new one
    beyond that is ignored (``over_max_clients``); and a client whose presence
    changes more than ``rate`` times within a minute is ignored for the rest
    of that minute (``rate_limited``), after which its latest state applies.
    Ignored messages are logged once a minute per kind, with how many there
    were, never once per message.

    Each online client remembers the connection ``epoch`` (the transport's
    reconnection count) its presence was taken in: after a reconnection
    :meth:`forget_before` drops those not heard from since, since a board that
    died while the broker was down left no Last Will (a broker restarted
    without persistence has not even its retained presence). Every live board
    says ``online`` again on its own reconnection, and the broker redelivers
    the retained presences it still holds, so the live ones come back.
    """

    def __init__(self, max_clients: int, rate: int, allowed: frozenset[str] | None, clock: Callable[[], float]):
        self.max_clients, self.rate, self.allowed = max_clients, rate, allowed
        self.online: dict[str, int] = {}  # client id -> examples it reported
        self._epochs: dict[str, int] = {}  # client id -> connection epoch of its online presence
        self._clock = clock
        # client -> [window start, presence changes in it]; ordered by window start (a new window is re-inserted)
        self._windows: dict[str, list[float]] = {}
        self._deferred: dict[str, Presence] = {}  # the latest state of a rate-limited client
        self._unreported: Counter[str] = Counter()  # ignored since the last warning of their kind
        self._warned: dict[str, float] = {}
        self._epoch = 0  # of the message being taken

    def update(self, client: str, payload: bytes, epoch: int = 0) -> str | None:
        """Take one presence message of ``client`` (empty: retained presence cleared); why it was ignored, or None.

        ``epoch``: the transport's reconnection count when the message is taken.
        """
        self._epoch = epoch
        why, detail = self._take(client, payload)
        if why is not None:
            self._warn(why, client, detail)
        return why

    def settle(self) -> None:
        """Apply the latest state of the clients whose rate-limit window has ended."""
        now = self._clock()
        while self._windows:
            client, (start, _) = next(iter(self._windows.items()))
            if now - start < PRESENCE_WINDOW:
                return
            del self._windows[client]
            if (presence := self._deferred.pop(client, None)) is not None:
                self._apply(client, presence)

    def _take(self, client: str, payload: bytes) -> tuple[str | None, str]:
        if self.allowed is not None and client not in self.allowed:
            return NOT_LISTED, ""
        if len(payload) > MAX_PRESENCE_BYTES:
            return TOO_LARGE, f"{len(payload)} bytes, more than {MAX_PRESENCE_BYTES}"
        try:
            presence = Presence.from_bytes(payload) if payload else Presence("offline")
        except ProtocolError as exc:
            return exc.reason, str(exc)
        self.settle()
        if client not in self._windows and len(self._windows) >= 2 * self.max_clients:
            return OVER_MAX_CLIENTS, ""  # that many clients changed presence within a minute: not tracking more
        window = self._windows.setdefault(client, [self._clock(), 0])
        window[1] += 1
        if window[1] > self.rate:
            self._deferred[client] = presence
            return RATE_LIMITED, ""
        return self._apply(client, presence), ""

    def forget_before(self, epoch: int) -> list[str]:
        """Take offline the clients whose presence predates connection ``epoch``; their ids, sorted."""
        gone = sorted(c for c in self.online if self._epochs.get(c, 0) < epoch)
        for client in gone:
            del self.online[client]
            self._epochs.pop(client, None)
        return gone

    def _apply(self, client: str, presence: Presence) -> str | None:
        if presence.status != "online":
            self.online.pop(client, None)
            self._epochs.pop(client, None)
        elif client in self.online or len(self.online) < self.max_clients:
            self.online[client] = presence.num_examples
            self._epochs[client] = self._epoch
        else:
            return OVER_MAX_CLIENTS
        return None

    def _warn(self, why: str, client: str, detail: str) -> None:
        self._unreported[why] += 1
        now = self._clock()
        if now - self._warned.get(why, -math.inf) < PRESENCE_WINDOW:
            return
        count, self._warned[why] = self._unreported.pop(why), now
        hint = _WHAT_TO_DO.get(why, "malformed: {detail}").format(
            max_clients=self.max_clients, rate=self.rate, detail=detail
        )
        more = f" (and {count - 1} more ignored since the last such warning)" if count > 1 else ""
        log.warning("presence of %s ignored (%s): %s%s", client, why, hint, more)
