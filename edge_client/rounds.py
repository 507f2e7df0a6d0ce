"""The rounds a board takes part in: the run it follows, the announcement, training, the update.

:class:`Rounds` is the client's side of docs/protocol.md, steps 3 and 4:
it follows the latest run, decides whether an announcement asks this board
for an update it can give (selected, not yet trained, before the deadline,
with the announced model and the global weights of that round and run),
trains, encodes the update and hands it to its
:class:`~edge_client.uploads.Uploader`, which resends it until it is
acknowledged. Progress is saved durably at every step, so a board that
loses power resumes where it stopped; an acknowledged update stays on disk
until its round is known to be closed (an announcement or global frame of a
later round, or another run), so a coordinator that restarts in that round
gets it again even from a board that restarted too.
:class:`~edge_client.client.EdgeClient` feeds it messages and the transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from edge_client.codecs import get_codec
from edge_client.config import ClientConfig
from edge_client.error_feedback import ErrorFeedback
from edge_client.errors import EdgeClientError, ProtocolError, StateError
from edge_client.frames import Frame
from edge_client.manifest import Manifest
from edge_client.messages import RoundAnnouncement
from edge_client.model_file import sha256_hex
from edge_client.model_sync import ModelSync
from edge_client.reasons import STALE_ROUND, STALE_RUN
from edge_client.state import PendingUpdate, Progress, StateStore
from edge_client.training import TrainingDiverged, encode_update, train_local, uses_error_feedback
from edge_client.uploads import Ignore, Outcome, Upload, Uploader

log = logging.getLogger(__name__)

MAX_IGNORED_KEYS = 4096  # "logged once" memory; forgetting it only means logging an old reason again

Dataset = tuple[np.ndarray, np.ndarray]


def why_ignored(
    ann: RoundAnnouncement, followed: str, current: RoundAnnouncement | None, held: Frame | None, now: float
) -> tuple[str, str] | None:
    """Why a board acts on ``ann`` not at all: (reason, the rest of the log sentence), or None.

    ``followed`` is the run the board follows, ``current`` the announcement it
    holds, ``held`` its global frame, ``now`` its clock.
    """
    if ann.run != followed:
        if now < ann.deadline:
            return None  # an open round of another run: the board joins it
        # A closed round of another run: an old retained message, never a reason to leave this run.
        return (
            STALE_RUN,
            f" of run {ann.run}: its deadline has passed and this board follows run {followed or '(none yet)'}",
        )
    if current is not None and current.run == ann.run and ann.round < current.round:
        return STALE_ROUND, f": round {current.round} is current"
    if held is not None and held.run == ann.run and ann.round < held.round:
        # The global frame of round r is published once round r-1 has closed: this one is over
        # (a retained announcement replayed after a restart); resending its update is wasted.
        return STALE_ROUND, f": it has closed (global weights of round {held.round} held)"
    return None


class Rounds:
    """The run this client follows, the round announced, local training and the update in flight.

    Owns :attr:`progress` (durable, in the state directory), the error-feedback
    residuals and the :class:`~edge_client.uploads.Uploader` that sends each
    update with ``publish``; reads the model and global weights from ``sync``.
    :attr:`settled` holds the (run, round) trained in this process whose
    outcome is known.
    """

    def __init__(
        self,
        config: ClientConfig,
        clock: Callable[[], float],
        store: StateStore,
        sync: ModelSync,
        publish: Callable[[Sequence[bytes]], None],
        ignore: Ignore,
    ):
        self.client_id = config.client_id
        self.clock = clock
        self.store = store
        self.sync = sync
        self.ignore = ignore
        self.uploads = Uploader(
            config.client_id,
            clock,
            publish,
            self._upload_settled,
            max_resends=config.max_resends,
            ack_timeout=config.ack_timeout,
            chunk_size=config.max_chunk,
            ignore=ignore,
        )
        self.announcement: RoundAnnouncement | None = None
        self.progress = Progress()
        self.settled: set[tuple[str, int]] = set()
        self.feedback = ErrorFeedback()  # residuals of lossy update codecs, per tensor
        self._rng = np.random.default_rng(config.seed)
        # (run, round, deadline) of the announcement whose training gave no update: a retry
        # (same round, new deadline) trains again; the same announcement does not.
        self._no_update: tuple[str, int, float] | None = None
        self._waiting: str | None = None  # why the current round is not being trained (logged once)

    def restore(self, manifest: Manifest) -> None:
        """Load the progress of the restored model and resume its pending (or acknowledged) update."""
        progress = self.store.load_progress()
        if progress.model_sha256 != manifest.model_sha256:
            if progress.model_sha256:
                log.info("the stored progress belongs to another model; starting afresh")
            return
        pending_bytes = self.store.load_pending(progress, manifest)
        if progress.pending is not None and pending_bytes is None:
            progress = replace(progress, pending=None)
        answered_bytes = self.store.load_answered(progress, manifest)
        if progress.answered is not None and answered_bytes is None:
            progress = replace(progress, answered=None)
        self.progress = progress
        if pending_bytes is not None and progress.pending is not None:
            pending = progress.pending
            self.uploads.restore(pending.round, progress.run, pending.model_sha256, pending_bytes)
            log.info("restored the update of round %d awaiting an ack", pending.round)
        if answered_bytes is not None and progress.answered is not None:
            answered = progress.answered
            self.uploads.restore_answered(
                answered.round, progress.run, answered.model_sha256, answered_bytes, answered.deadline
            )
            log.info("restored the acknowledged update of round %d, in case it is asked for again", answered.round)

    # -- the model and global weights ------------------------------------------------
    def model_installed(self, digest: str, previous: str | None, persist: bool) -> None:
        self.uploads.model_changed(digest)
        if self.progress.model_sha256 != digest:
            self.progress = Progress(model_sha256=digest, run=self.progress.run)
            if persist:
                self._save_progress()
        if previous != digest:
            self.feedback.reset()  # residuals of another model mean nothing for this one
            self._restore_residuals(digest)
        self._waiting = None

    def global_arrived(self, frame: Frame) -> None:
        if frame.run != self.progress.run:
            # The coordinator publishes a run's global frame before announcing its rounds, and
            # replaces the retained one of the previous run: it is the sign of a new run.
            self._join_run(frame.run, f"global weights of round {frame.round} arrived")

    def global_kept(self, frame: Frame) -> None:
        self._waiting = None
        if frame.run == self.progress.run:
            self._round_closed_before(frame.round)

    # -- announcements ---------------------------------------------------------------
    def on_round(self, ann: RoundAnnouncement) -> None:
        get_codec(ann.codec)  # ProtocolError("unknown_codec") for a codec this client cannot encode
        current = self.announcement
        ignored = why_ignored(ann, self.progress.run, current, self.sync.global_frame, self.clock())
        if ignored is not None:
            reason, why = ignored
            key = (reason, "round", ann.run, ann.round)
            self.ignore(key, f"ignoring the announcement of round {ann.round}{why}", logging.INFO)
            return
        if ann.run != self.progress.run:
            self._join_run(ann.run, f"round {ann.round} was announced")
            current = self.announcement
        if ann == current:
            return
        self.announcement = ann
        self._waiting = None
        self._round_closed_before(ann.round)
        selected = self.client_id in ann.selected
        remaining = ann.deadline - self.clock()
        log.info(
            "round %d announced: %d client(s) selected, %s; deadline in %.0f s",
            ann.round,
            len(ann.selected),
            "including this one" if selected else "not this one",
            remaining,
        )
        if selected and remaining <= 0:
            log.warning(
                "round %d: its deadline passed %.0f s before it arrived; if this repeats, "
                "check this board's clock (NTP)",
                ann.round,
                -remaining,
            )
        self.uploads.announced(ann)

    def _join_run(self, run: str, why: str) -> None:
        """Follow ``run`` from now on: nothing of the previous run is kept (durably)."""
        old = self.progress.run
        if old:
            log.info(
                "joining run %s (%s): leaving run %s, with its pending update, error-feedback residuals "
                "and trained rounds",
                run,
                why,
                old,
            )
        else:
            log.info("joining run %s (%s)", run, why)
        self.uploads.leave_run(run)
        self._no_update, self._waiting = None, None
        if self.announcement is not None and self.announcement.run != run:
            self.announcement = None
        self.feedback.reset()
        try:  # residuals first: a crash before progress.json names the new run only repeats this
            self.store.clear_residuals()
        except OSError as exc:
            log.error("cannot remove the old run's residuals (%s); they will not be loaded for this run", exc)
        self.progress = Progress(model_sha256=self.progress.model_sha256, run=run)
        self._save_progress()

    # -- training --------------------------------------------------------------------
    def maybe_train(self, data: Dataset | None, stop: threading.Event | None) -> None:
        """Train on ``data`` and hand the update to the uploader if the current round asks for it now."""
        ann = self.announcement
        if ann is None or ann.run != self.progress.run:
            return  # on_round joins the run of every announcement it keeps; checked for safety
        r, selected = ann.round, self.client_id in ann.selected
        trained = self.progress.trained_round
        if trained is not None and r <= trained:
            if selected and self.uploads.current is None and self.uploads.answered is None:
                self.ignore(
                    ("already_trained", ann.run, r),
                    f"round {r}: selected, but this board already trained it in this run and no longer holds "
                    "the update; not training it again",
                    logging.INFO,
                )
            return
        if self._no_update == (ann.run, r, ann.deadline):
            return  # this announcement's training gave no update; a retry of the round trains again
        reason = self._why_not_train(ann, selected, data)
        if reason is not None:
            self._wait(*reason)
            return
        assert data is not None
        self._train(ann, data, stop)

    def _why_not_train(self, ann: RoundAnnouncement, selected: bool, data: Dataset | None) -> tuple[str, int] | None:
        """Why this client cannot train ``ann`` now, with the log level to say it at; None if it can."""
        r, held = ann.round, self.sync.global_frame
        if not selected:
            return f"round {r}: not selected", logging.DEBUG
        if self.clock() >= ann.deadline:
            return f"round {r}: the deadline passed before this client could train", logging.INFO
        if self.sync.model is None or self.sync.model_sha256 != ann.model_sha256:
            return f"round {r}: waiting for model {ann.model_sha256[:12]}", logging.INFO
        if held is None or held.round != r or held.run != ann.run:
            have = "none" if held is None else f"round {held.round}"
            have += "" if held is None or held.run == ann.run else " of another run"
            return f"round {r}: waiting for the global weights of round {r} (holding {have})", logging.INFO
        if data is None:
            return f"round {r}: selected, but this client has no training data that fits the model", logging.ERROR
        return None

    def _wait(self, reason: str, level: int = logging.INFO) -> None:
        """Log why the announced round is not being trained, once per reason."""
        if reason != self._waiting:
            self._waiting = reason
            log.log(level, "%s", reason)

    def _train(self, ann: RoundAnnouncement, data: Dataset, stop: threading.Event | None) -> None:
        assert self.sync.model is not None and self.sync.global_frame is not None
        r, (x, y) = ann.round, data
        log.info("round %d: training on %d examples, %d epoch(s), lr %g, mu %g", r, len(x), ann.epochs, ann.lr, ann.mu)

        def interrupted() -> bool:
            return stop is not None and stop.is_set()

        try:
            training = train_local(
                self.sync.model,
                self.sync.global_frame.tensors,
                x,
                y,
                epochs=ann.epochs,
                lr=ann.lr,
                mu=ann.mu,
                rng=self._rng,
                keep_going=lambda: not interrupted() and self.clock() < ann.deadline,
            )
        except TrainingDiverged as exc:
            log.error("round %d: %s; not sending (a retry of the round trains again)", r, exc)
            self._no_update_for(ann)
            return
        except Exception:
            log.exception("round %d: training failed", r)
            self._no_update_for(ann)
            return
        if interrupted():
            log.info("round %d: training interrupted by shutdown", r)
            return  # not marked trained: after a restart it may train again if the round is open
        if training is None or self.clock() >= ann.deadline:
            log.warning("too slow for round %d: training ended after the deadline; not sending", r)
            self._no_update_for(ann)
            return
        try:
            payload = encode_update(
                training,
                round=r,
                run=ann.run,
                model_sha256=ann.model_sha256,
                client_id=self.client_id,
                codec=ann.codec,
                feedback=self.feedback,
            )
        except ProtocolError as exc:
            log.error("round %d: cannot encode the update with codec %r: %s; not sending", r, ann.codec, exc)
            self._no_update_for(ann)
            return
        if uses_error_feedback(ann.codec):
            self._save_residuals()
        digest = sha256_hex(payload)
        pending = PendingUpdate(r, ann.model_sha256, digest, len(payload))
        self.progress = replace(self.progress, trained_round=r, pending=pending)
        self._save_progress(payload)
        self.uploads.begin(r, ann.run, ann.model_sha256, payload, digest)
        log.info(
            "round %d: trained in %.1f s (%s); update of %d bytes (%s)",
            r,
            training.metrics["train_seconds"],
            ", ".join(f"{k} {v:.4f}" for k, v in training.metrics.items()),
            len(payload),
            ann.codec,
        )

    def _no_update_for(self, ann: RoundAnnouncement) -> None:
        """Training for ``ann`` gave nothing to send: settled, but not trained (a retry trains again)."""
        self._no_update = (ann.run, ann.round, ann.deadline)
        self.settled.add((ann.run, ann.round))

    # -- state -----------------------------------------------------------------------
    def _upload_settled(self, up: Upload, outcome: Outcome) -> None:
        """Record durably how an upload ended.

        An unanswered update stays pending (resent if its round is announced
        again); an acknowledged one is kept as ``answered`` until its round is
        known closed; a rejected or abandoned one is dropped.
        """
        self.settled.add((up.run, up.round))
        if outcome is Outcome.UNANSWERED:
            return
        if outcome.acknowledged:
            self.progress = replace(self.progress, acked_round=up.round, pending=None, answered=self._answered(up))
        else:
            answered = self.progress.answered
            if answered is not None and answered.round == up.round:
                answered = None  # the resent acknowledged update was refused or abandoned: done with it
            dropped = replace(self.progress, pending=None, answered=answered)
            if dropped == self.progress:
                return
            self.progress = dropped
        self._save_progress()

    def _answered(self, up: Upload) -> PendingUpdate | None:
        """The durable record of ``up``, just acknowledged: pending.bin becomes answered.bin (None: not on disk)."""
        pending, answered = self.progress.pending, self.progress.answered
        if pending is not None and pending.round == up.round:
            try:
                self.store.keep_pending_as_answered()
            except StateError as exc:
                log.error("%s; the acknowledged update is kept in memory only", exc)
                return None
            return replace(pending, deadline=up.deadline)
        if answered is not None and answered.round == up.round:
            return replace(answered, deadline=up.deadline)  # asked again, acknowledged again: in answered.bin
        return None  # its write had failed: kept in memory only (Uploader.answered)

    def _round_closed_before(self, round: int) -> None:
        """A message of ``round`` of the run followed: an acknowledged update of an earlier round is not needed."""
        answered = self.progress.answered
        if answered is None or answered.round >= round:
            return
        log.debug("round %d: dropping the acknowledged update of round %d, which has closed", round, answered.round)
        self.uploads.forget_answered_before(round)
        self.progress = replace(self.progress, answered=None)
        self._save_progress()

    def _save_progress(self, pending_bytes: bytes | None = None) -> None:
        try:
            self.store.save_progress(self.progress, pending_bytes)
        except StateError as exc:
            log.error("%s; progress is kept in memory only", exc)

    def _save_residuals(self) -> None:
        assert self.sync.model_sha256 is not None
        try:
            self.store.save_residuals(self.sync.model_sha256, self.feedback.state_dict())
        except StateError as exc:
            log.error("%s; error-feedback residuals stay in memory only", exc)

    def _restore_residuals(self, digest: str) -> None:
        stored = self.store.load_residuals(digest)
        if stored:
            try:
                self.feedback.load_state_dict(stored)
                log.info("restored error-feedback residuals for %d tensors", len(stored))
            except EdgeClientError as exc:
                log.warning("ignoring the stored error-feedback residuals: %s", exc)


class LogOnce:
    """Logs why a well-formed message is ignored, once per key (reason first, then run/round)."""

    def __init__(self, limit: int = MAX_IGNORED_KEYS):
        self.limit = limit
        self.seen: set[tuple[Any, ...]] = set()

    def __call__(self, key: tuple[Any, ...], message: str, level: int = logging.INFO) -> None:
        if key in self.seen:
            return
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(key)
        log.log(level, "%s (%s)", message, key[0])
