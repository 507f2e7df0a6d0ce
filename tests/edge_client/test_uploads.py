"""The upload state machine alone: a fake clock and a recording publish, no broker, no LiteRT."""

from __future__ import annotations

import logging

import pytest

from edge_client.chunks import Reassembler
from edge_client.errors import PublishFailed
from edge_client.messages import Ack, RoundAnnouncement
from edge_client.uploads import Outcome, Upload, Uploader

CLIENT = "pi-1"
RUN = "1111111111111111"
OTHER_RUN = "2222222222222222"
SHA = "ab" * 32
ACK_TIMEOUT = 10.0
PAYLOAD = bytes(range(256)) * 20  # several chunks of 1 KiB
LATER = 2_000_000_000.0  # a deadline well after the fake clock's now


class Recorder:
    """What the uploader did: the sends it published, the endings it reported, the acks it ignored."""

    def __init__(self) -> None:
        self.sends: list[list[bytes]] = []
        self.settled: list[tuple[int, str, Outcome]] = []
        self.ignored: list[tuple] = []
        self.failures = 0  # the next publishes that raise

    def publish(self, chunks) -> None:
        if self.failures:
            self.failures -= 1
            raise PublishFailed("the broker did not acknowledge the publish")
        self.sends.append(list(chunks))

    def settle(self, upload: Upload, outcome: Outcome) -> None:
        self.settled.append((upload.round, upload.run, outcome))

    def ignore(self, key, message: str, level: int = logging.INFO) -> None:
        self.ignored.append(key)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def uploader(clock, rec: Recorder, max_resends: int = 2) -> Uploader:
    return Uploader(
        CLIENT,
        clock,
        rec.publish,
        rec.settle,
        max_resends=max_resends,
        ack_timeout=ACK_TIMEOUT,
        chunk_size=1024,
        ignore=rec.ignore,
    )


def announce(round: int = 3, deadline: float = LATER, selected=(CLIENT,), run: str = RUN) -> RoundAnnouncement:
    return RoundAnnouncement(round, tuple(selected), deadline, SHA, run=run)


def started(clock, rec: Recorder, max_resends: int = 2, round: int = 3, ann=None) -> Uploader:
    """An uploader that has sent the update of ``round`` once."""
    up = uploader(clock, rec, max_resends)
    up.begin(round, RUN, SHA, PAYLOAD)
    up.tick(ann or announce(round))
    assert len(rec.sends) == 1
    return up


def test_the_first_send_is_the_whole_update_in_chunks(clock, rec):
    up = uploader(clock, rec)
    up.begin(3, RUN, SHA, PAYLOAD)
    assert up.until_due() is None, "nothing is due before the round is announced"
    up.tick(announce(3))
    (chunks,) = rec.sends
    assert len(chunks) > 1 and all(len(c) <= 1024 for c in chunks)
    reassembler = Reassembler()
    assert [reassembler.add(c) for c in chunks][-1] == PAYLOAD
    assert up.sent == 1 and rec.settled == [] and up.until_due() == ACK_TIMEOUT


@pytest.mark.parametrize(
    "ann",
    [None, announce(3, selected=("pi-2",)), announce(2)],
    ids=["no_announcement", "not_selected", "older_round"],
)
def test_nothing_is_sent_unless_its_round_is_announced_with_this_client(clock, rec, ann):
    up = uploader(clock, rec)
    up.begin(3, RUN, SHA, PAYLOAD)
    up.tick(ann)
    assert rec.sends == [] and rec.settled == [] and up.current is not None


def test_resent_identically_after_ack_timeout(clock, rec):
    up = started(clock, rec)
    clock.now += ACK_TIMEOUT - 0.1
    up.tick(announce(3))
    assert len(rec.sends) == 1, "resent before ack_timeout"
    clock.now += 0.1
    up.tick(announce(3))
    assert len(rec.sends) == 2 and rec.sends[1] == rec.sends[0]


def test_resends_exhausted_settles_unanswered_once(clock, rec):
    up = started(clock, rec, max_resends=2)
    for _ in range(6):
        clock.now += ACK_TIMEOUT
        up.tick(announce(3))
    assert len(rec.sends) == 3  # the first send and two resends
    assert rec.settled == [(3, RUN, Outcome.UNANSWERED)]
    assert up.current is not None and up.current.exhausted and up.until_due() is None


def test_no_send_at_or_after_the_deadline(clock, rec):
    ann = announce(3, deadline=clock.now + 25)
    up = started(clock, rec, max_resends=100, ann=ann)
    for _ in range(5):
        clock.now += ACK_TIMEOUT
        up.tick(ann)
    assert len(rec.sends) == 3  # at now, now+10, now+20; the deadline now+25 ends it
    assert rec.settled == [(3, RUN, Outcome.UNANSWERED)]


def test_a_re_announcement_with_a_new_deadline_gives_a_fresh_allowance(clock, rec):
    first, retry = announce(3, deadline=clock.now + 100), announce(3, deadline=clock.now + 500)
    up = started(clock, rec, max_resends=0, ann=first)
    clock.now += ACK_TIMEOUT
    up.tick(first)
    assert len(rec.sends) == 1 and rec.settled == [(3, RUN, Outcome.UNANSWERED)]
    up.tick(retry)  # the coordinator retries the round
    assert len(rec.sends) == 2 and rec.sends[1] == rec.sends[0]
    clock.now += ACK_TIMEOUT
    up.tick(retry)
    assert len(rec.sends) == 2 and rec.settled[-1] == (3, RUN, Outcome.UNANSWERED)


@pytest.mark.parametrize("status", ["accepted", "duplicate"])
def test_an_ack_ends_the_upload_and_keeps_it_as_answered(clock, rec, status):
    up = started(clock, rec)
    up.on_ack(Ack(3, status, run=RUN))
    assert rec.settled == [(3, RUN, Outcome(status))] and Outcome(status).acknowledged
    assert up.current is None and up.answered is not None and up.answered.round == 3
    clock.now += 5 * ACK_TIMEOUT
    up.tick(announce(3))
    assert len(rec.sends) == 1
    up.on_ack(Ack(3, "duplicate", run=RUN))  # a second ack: nothing awaits it
    assert len(rec.settled) == 1 and rec.ignored == [("no_update_awaits", RUN, 3, "duplicate")]


def test_a_rejection_ends_the_upload(clock, rec, caplog):
    up = started(clock, rec)
    with caplog.at_level(logging.WARNING, logger="edge_client.uploads"):
        up.on_ack(Ack(3, "rejected", "bad_tensors", RUN))
    assert rec.settled == [(3, RUN, Outcome.REJECTED)] and not Outcome.REJECTED.acknowledged
    assert up.current is None and up.answered is None
    assert "rejected the update: bad_tensors" in caplog.text


def test_a_late_rejection_under_a_newer_round_ends_the_upload(clock, rec, caplog):
    up = started(clock, rec)
    with caplog.at_level(logging.WARNING, logger="edge_client.uploads"):
        up.on_ack(Ack(4, "rejected", "stale_round", RUN))
    assert rec.settled == [(3, RUN, Outcome.REJECTED)]
    assert "(at round 4)" in caplog.text


@pytest.mark.parametrize("ack", [Ack(4, "accepted", run=RUN), Ack(2, "rejected", run=RUN)], ids=["newer", "older"])
def test_other_acks_of_other_rounds_are_ignored(clock, rec, ack):
    up = started(clock, rec)
    up.on_ack(ack)
    assert rec.settled == [] and up.current is not None
    assert rec.ignored == [("no_update_awaits", RUN, ack.round, ack.status)]


def test_an_ack_of_another_run_is_ignored(clock, rec):
    up = started(clock, rec)
    up.on_ack(Ack(3, "accepted", run=OTHER_RUN))
    assert rec.settled == [] and up.current is not None
    assert rec.ignored == [("stale_run", "ack", OTHER_RUN, 3)]
    clock.now += ACK_TIMEOUT
    up.tick(announce(3))
    assert len(rec.sends) == 2, "still resent: the ack was not for it"


def test_a_publish_failure_is_retried_after_ack_timeout(clock, rec):
    up = uploader(clock, rec, max_resends=1)
    up.begin(3, RUN, SHA, PAYLOAD)
    rec.failures = 1
    up.tick(announce(3))
    assert rec.sends == [] and up.sent == 0 and up.until_due() == ACK_TIMEOUT
    up.tick(announce(3))
    assert rec.sends == [], "retried before ack_timeout"
    clock.now += ACK_TIMEOUT
    up.tick(announce(3))
    assert len(rec.sends) == 1 and up.sent == 1
    clock.now += ACK_TIMEOUT
    up.tick(announce(3))
    assert len(rec.sends) == 1 and rec.settled == [(3, RUN, Outcome.UNANSWERED)], "a failure counts as a send"


@pytest.mark.parametrize("ann", [announce(4), announce(3, run=OTHER_RUN)], ids=["newer_round", "other_run"])
def test_a_newer_round_or_another_run_abandons_the_upload(clock, rec, ann):
    up = started(clock, rec)
    up.tick(ann)
    assert rec.settled == [(3, RUN, Outcome.ABANDONED)] and up.current is None
    assert len(rec.sends) == 1


def test_announcing_a_newer_round_abandons_and_an_older_one_does_not(clock, rec):
    up = started(clock, rec)
    up.announced(announce(2))
    assert rec.settled == [] and up.current is not None
    up.announced(announce(4))
    assert rec.settled == [(3, RUN, Outcome.ABANDONED)] and up.current is None


def test_asked_again_after_an_ack_the_answered_update_is_resent(clock, rec):
    up = started(clock, rec, max_resends=0)
    up.on_ack(Ack(3, "accepted", run=RUN))
    again = announce(3, deadline=LATER + 1000)
    up.announced(announce(3, selected=("pi-2",), deadline=LATER + 1000))
    assert up.current is None, "not selected: not asked"
    up.announced(again)
    assert up.current is not None and up.answered is None
    up.tick(again)
    assert len(rec.sends) == 2 and rec.sends[1] == rec.sends[0]


def test_leaving_the_run_abandons_the_upload_and_forgets_the_answered_one(clock, rec):
    up = started(clock, rec)
    up.leave_run(OTHER_RUN)
    assert rec.settled == [(3, RUN, Outcome.ABANDONED)]
    up.begin(1, RUN, SHA, PAYLOAD)
    up.tick(announce(1))
    up.on_ack(Ack(1, "accepted", run=RUN))
    up.leave_run(OTHER_RUN)
    up.announced(announce(1))
    assert up.current is None and up.answered is None


def test_a_new_model_abandons_an_update_of_another(clock, rec):
    up = started(clock, rec)
    up.model_changed(SHA)
    assert rec.settled == [] and up.current is not None
    up.model_changed("cd" * 32)
    assert rec.settled == [(3, RUN, Outcome.ABANDONED)]


def test_a_restored_update_is_sent_as_the_original_chunks(clock, rec):
    first = started(clock, rec)
    second = uploader(clock, rec)
    second.restore(3, RUN, SHA, PAYLOAD)
    second.tick(announce(3))
    assert rec.sends[1] == rec.sends[0], "same bytes, same transfer id"
    assert first.current is not None and first.current.chunks == rec.sends[0]


def test_a_restored_answered_update_is_resent_only_for_a_new_announcement_of_its_round(clock, rec):
    first = started(clock, rec)
    first.on_ack(Ack(3, "accepted", run=RUN))
    answered = first.answered
    assert answered is not None and answered.deadline == LATER  # what the owner keeps on disk
    second = uploader(clock, rec)
    second.restore_answered(3, RUN, SHA, PAYLOAD, deadline=LATER)
    second.announced(announce(3))  # the announcement it answered, replayed after a restart
    assert second.current is None and second.answered is not None
    again = announce(3, deadline=LATER + 1000)  # a restarted coordinator asks again
    second.announced(again)
    second.tick(again)
    assert len(rec.sends) == 2 and rec.sends[1] == rec.sends[0], "the same update, not another"


def test_a_later_round_forgets_the_answered_update(clock, rec):
    up = started(clock, rec)
    up.on_ack(Ack(3, "duplicate", run=RUN))
    up.forget_answered_before(3)
    assert up.answered is not None, "its own round is still open"
    up.announced(announce(4, selected=("pi-2",)))
    assert up.answered is None
    up.announced(announce(3, deadline=LATER + 1000))
    assert up.current is None and len(rec.sends) == 1
