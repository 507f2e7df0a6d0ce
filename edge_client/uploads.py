"""Sending an update until the coordinator acknowledges it: the edge client's upload state machine.

An :class:`Uploader` holds at most one :class:`Upload` in flight: the encoded
update of one round of one run. It touches neither the broker nor the disk: it
is given a clock and a ``publish`` function, and reports every ending to its
owner (see :class:`Outcome`), who records it durably.

The rules (docs/protocol.md, "Rounds"):

* nothing is sent until the round of the update is announced with this client
  selected; each announcement (a new ``deadline``) gives a fresh allowance of
  sends: the first, then a resend every ``ack_timeout`` seconds, at most
  ``max_resends`` resends, never at or after the deadline;
* a failed publish counts as a send and is retried ``ack_timeout`` later;
* an ack of the upload's run and round ends it: ``accepted`` and
  ``duplicate`` are kept as the answered update until a later round is
  announced (a coordinator restarted mid-round may ask for it again by
  selecting this client once more; the owner keeps it on disk too),
  ``rejected`` is logged; a rejection under a *later* round number is the
  coordinator's ``stale_round`` for a late update and ends it too;
* an announcement of a newer round or of another run abandons it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_client import reasons
from edge_client.chunks import split
from edge_client.errors import TransportError
from edge_client.messages import Ack, RoundAnnouncement

log = logging.getLogger(__name__)

# ignore(key, message, level): log why a well-formed message is ignored, once per key.
Ignore = Callable[[tuple[Any, ...], str, int], None]


def log_every_time(key: tuple[Any, ...], message: str, level: int = logging.INFO) -> None:
    """An :data:`Ignore` without memory: logs every time, with the reason (``key[0]``)."""
    log.log(level, "%s (%s)", message, key[0])


class Outcome(enum.Enum):
    """How an upload ended, as reported to the :class:`Uploader`'s owner."""

    ACCEPTED = "accepted"  # acked accepted
    DUPLICATE = reasons.DUPLICATE  # acked duplicate: the coordinator had it already
    REJECTED = "rejected"  # acked rejected (possibly under a later round: too late)
    UNANSWERED = "unanswered"  # no ack: resends used up or the deadline passed; kept for a re-announcement
    ABANDONED = "abandoned"  # a newer round, another run or another model made it useless

    @property
    def acknowledged(self) -> bool:
        """True if the coordinator holds the update."""
        return self in (Outcome.ACCEPTED, Outcome.DUPLICATE)


@dataclass
class Upload:
    """An encoded update awaiting its ack."""

    round: int
    run: str
    model_sha256: str
    payload: bytes
    chunks: list[bytes] = field(default_factory=list)
    sends: int = 0
    next_send: float = 0.0  # clock() time of the next (re)send
    deadline: float | None = None  # deadline of the announcement it answers (None: not yet announced)
    exhausted: bool = False  # resends used up or deadline passed: no more sends for this announcement


class Uploader:
    """Sends one update at a time until it is acknowledged, abandoned or out of time.

    ``publish(chunks)`` sends the chunks of one update in order and raises
    :class:`TransportError`, ``OSError`` or ``ValueError`` on failure.
    ``settled(upload, outcome)`` is called once per ending. ``ignore`` logs
    ignored acks (default: every time). :attr:`chunk_size` may be lowered
    before the first send.
    """

    def __init__(
        self,
        client_id: str,
        clock: Callable[[], float],
        publish: Callable[[Sequence[bytes]], None],
        settled: Callable[[Upload, Outcome], None],
        *,
        max_resends: int,
        ack_timeout: float,
        chunk_size: int,
        ignore: Ignore = log_every_time,
    ):
        self.client_id = client_id
        self.clock = clock
        self.publish = publish
        self.settled = settled
        self.max_resends = max_resends
        self.ack_timeout = ack_timeout
        self.chunk_size = chunk_size
        self.ignore = ignore
        self.current: Upload | None = None  # the update awaiting an ack
        # The last acknowledged update, kept until a newer round: a coordinator restarted
        # mid-round has lost it and asks for it again by selecting this client once more.
        self.answered: Upload | None = None
        self.sent = 0  # successful transmissions, resends included

    # -- what the owner hands over -------------------------------------------------------
    def begin(self, round: int, run: str, model_sha256: str, payload: bytes, digest: str | None = None) -> Upload:
        """Take a freshly trained update, to be sent on the next :meth:`tick` under its round's announcement.

        ``digest`` is the payload's SHA-256 if known: its prefix is the chunks'
        transfer id, so passing it saves hashing the payload again.
        """
        transfer_id = None if digest is None else bytes.fromhex(digest)[:16]
        chunks = split(payload, self.chunk_size, transfer_id=transfer_id)
        self.current = Upload(round, run, model_sha256, payload, chunks)
        return self.current

    def restore(self, round: int, run: str, model_sha256: str, payload: bytes) -> Upload:
        """Take an update read back from the state directory (chunked when first sent)."""
        self.current = Upload(round, run, model_sha256, payload)
        return self.current

    def restore_answered(
        self, round: int, run: str, model_sha256: str, payload: bytes, deadline: float | None = None
    ) -> Upload:
        """Take an acknowledged update read back from the state directory: sent again only if asked again.

        ``deadline`` is that of the announcement it was acknowledged under, which does not ask again.
        """
        self.answered = Upload(round, run, model_sha256, payload, deadline=deadline)
        return self.answered

    def until_due(self) -> float | None:
        """Seconds until the next (re)send is due; None if none is scheduled."""
        up = self.current
        if up is None or up.deadline is None or up.exhausted:
            return None
        return max(0.0, up.next_send - self.clock())

    # -- events ----------------------------------------------------------------------------
    def announced(self, ann: RoundAnnouncement) -> None:
        """A new announcement was kept: a newer round abandons the update; asked again, the answered one is resent."""
        up = self.current
        if up is not None and up.round < ann.round:
            self.abandon(f"round {ann.round} was announced")
        if self.answered is not None and self.answered.run == ann.run:
            self.forget_answered_before(ann.round)  # its round has closed: nobody will ask for it again
        answered = self.answered
        asked_again = (
            self.client_id in ann.selected
            and self.current is None
            and answered is not None
            and (answered.run, answered.round, answered.model_sha256) == (ann.run, ann.round, ann.model_sha256)
            and answered.deadline != ann.deadline  # the announcement it answered, replayed, asks nothing new
        )
        if asked_again:
            assert answered is not None
            log.info("round %d: asked again for the update already acknowledged; sending it again", ann.round)
            answered.deadline, answered.exhausted = None, False  # a fresh allowance of sends
            self.current, self.answered = answered, None

    def tick(self, ann: RoundAnnouncement | None) -> None:
        """Send or resend if due under the current announcement ``ann``; give up when out of sends or time."""
        up = self.current
        if up is None or ann is None:
            return
        if ann.run != up.run:
            self.abandon(f"run {ann.run} was announced")
            return
        if ann.round > up.round:
            self.abandon(f"round {ann.round} was announced")
            return
        if ann.round < up.round or self.client_id not in ann.selected:
            return  # wait until the round of this update is announced (again)
        now = self.clock()
        if up.deadline != ann.deadline:
            # First announcement seen for this update (after training or a restart), or the
            # round was announced again with a new deadline: a fresh allowance of resends.
            up.deadline, up.sends, up.exhausted = ann.deadline, 0, False
            up.next_send = min(up.next_send, now)
        if up.exhausted:
            return
        if now >= ann.deadline:
            log.warning("round %d: the deadline passed without an ack after %d send(s)", up.round, up.sends)
            self._exhaust(up)
            return
        if now < up.next_send:
            return
        if up.sends > self.max_resends:
            log.warning("round %d: no ack after %d send(s); giving up", up.round, up.sends)
            self._exhaust(up)
            return
        self._send(up)

    def on_ack(self, ack: Ack) -> None:
        """An ack on this client's topic: end the upload it answers, ignore any other."""
        up = self.current
        if up is not None and ack.run != up.run:
            self.ignore(
                (reasons.STALE_RUN, "ack", ack.run, ack.round),
                f"ignoring an ack of round {ack.round} of run {ack.run}: the update awaiting an ack is of run {up.run}",
                logging.INFO,
            )
            return
        # A coordinator that has moved on rejects a late update (stale_round) under the number of
        # its own current round; only the update in flight can have caused that.
        late_rejection = up is not None and ack.status == "rejected" and ack.round > up.round
        if up is None or (ack.round != up.round and not late_rejection):
            # Typically a second ack (duplicate) after the first ended the round: normal, so debug.
            self.ignore(
                ("no_update_awaits", ack.run, ack.round, ack.status),
                f"ignoring an ack ({ack.status}) of round {ack.round}: no update of that round awaits one",
                logging.DEBUG,
            )
            return
        outcome = Outcome(ack.status)
        if outcome.acknowledged:
            log.info("round %d: update %s by the coordinator", up.round, ack.status)
            self.answered = up
        else:
            log.warning(
                "round %d: the coordinator%s rejected the update: %s",
                up.round,
                f" (at round {ack.round})" if late_rejection else "",
                ack.reason or "no reason given",
            )
        self.current = None
        self.settled(up, outcome)

    def abandon(self, why: str) -> None:
        """Drop the update awaiting an ack (if any), saying ``why``."""
        up = self.current
        if up is None:
            return
        log.info("round %d: abandoning the update awaiting an ack: %s", up.round, why)
        self.current = None
        self.settled(up, Outcome.ABANDONED)

    def leave_run(self, run: str) -> None:
        """The owner joins ``run``: nothing of the previous run is sent again."""
        self.abandon(f"run {run} started")
        self.answered = None

    def forget_answered_before(self, round: int) -> None:
        """A later round of the run is under way: the answered update of an earlier one is never asked for again."""
        if self.answered is not None and self.answered.round < round:
            self.answered = None

    def model_changed(self, model_sha256: str) -> None:
        """A new model is in use: an update of another model is abandoned."""
        if self.current is not None and self.current.model_sha256 != model_sha256:
            self.abandon(f"the model changed to {model_sha256[:12]}")

    # -- sending -----------------------------------------------------------------------------
    def _exhaust(self, up: Upload) -> None:
        up.exhausted = True  # kept: a re-announcement of its round gives a fresh allowance
        self.settled(up, Outcome.UNANSWERED)

    def _send(self, up: Upload) -> None:
        if not up.chunks:
            up.chunks = split(up.payload, self.chunk_size)
        try:
            self.publish(up.chunks)
        except (TransportError, OSError, ValueError) as exc:
            log.warning("round %d: sending the update failed (%s); retrying in %.0f s", up.round, exc, self.ack_timeout)
        else:
            self.sent += 1
            log.info(
                "round %d: %s update (%d bytes, %d chunk(s))",
                up.round,
                "sent" if up.sends == 0 else f"resent (resend {up.sends} of {self.max_resends})",
                len(up.payload),
                len(up.chunks),
            )
        up.sends += 1
        up.next_send = self.clock() + self.ack_timeout
