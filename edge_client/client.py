"""The edge client: takes part in federated rounds over a :class:`~edge_client.transport.Transport`.

One :class:`EdgeClient` follows the protocol of docs/protocol.md:

1. :meth:`~EdgeClient.start` restores the state directory (model, global
   weights, progress), connects, subscribes to ``model/meta``,
   ``model/chunk/+``, ``global/chunk/+``, ``round`` and ``ack/<id>``, and
   publishes its retained ``online`` presence. The transport must have been
   created with :func:`last_will` as its Last Will.
2. Model chunks are reassembled, checked against the retained ``ModelMeta``
   (SHA-256), stored and loaded into LiteRT; the local data is then fitted to
   the model's manifest. Global-weight chunks are reassembled, validated
   against the manifest and the one with the highest round is kept.
3. When a ``RoundAnnouncement`` selects this client, for a round it has not
   trained, before the deadline, with the announced model and the global
   weights *of that round and run* (the coordinator publishes the global frame
   of round ``r`` with ``"round": r`` before announcing round ``r``), it trains
   and sends ``local - global`` as an update frame, in chunks, on
   ``update/<id>``. A training that gives no update (diverged, failed, too
   slow) does not count as trained: a retry of the round trains again.
   Every progress record belongs to one run: a global frame or an open
   announcement of another run makes the client join that run, dropping the
   old run's pending update, residuals and trained rounds (docs/protocol.md,
   "Runs").
4. Without an ack it resends the same bytes every ``ack_timeout`` seconds, at
   most ``max_resends`` times and never after the deadline; ``accepted`` or
   ``duplicate`` end the round, ``rejected`` is logged and ends it too. A newer
   round abandons the old update.

Everything from the wire is untrusted: a malformed message is logged with its
:class:`ProtocolError` reason, counted in :attr:`EdgeClient.rejected` and
otherwise ignored; nothing received makes :meth:`~EdgeClient.step` raise.
A well-formed message that is ignored (another run, a round already trained,
an older round) is logged once per reason and round, not on every retained
re-delivery.

Training runs on the calling thread, one epoch at a time, so a shutdown
request or a passed deadline stops it between epochs; messages arriving
meanwhile wait in the transport's queue.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge_client import __version__
from edge_client.chunks import Reassembler, parse_chunk, split, transfer_id_for
from edge_client.codecs import get_codec
from edge_client.config import ClientConfig
from edge_client.data import load_csv, load_image_folder, load_npz, prepare_for_model
from edge_client.error_feedback import ErrorFeedback
from edge_client.errors import DataError, EdgeClientError, ManifestError, ProtocolError, StateError, TransportError
from edge_client.frames import Frame, decode_frame, validate_frame
from edge_client.manifest import Manifest
from edge_client.messages import Ack, ModelMeta, Presence, RoundAnnouncement
from edge_client.model_file import sha256_hex
from edge_client.runtime import TrainableModel
from edge_client.state import PendingUpdate, Progress, StateStore
from edge_client.training import TrainingDiverged, encode_update, train_local, uses_error_feedback
from edge_client.transport import Message, Transport

log = logging.getLogger(__name__)

RECEIVE_POLL = 0.5  # seconds run() waits for a message before checking its stop event again
MAX_IGNORED_KEYS = 4096  # "logged once" memory; forgetting it only means logging an old reason again
# Incomplete transfers a board holds at once: a few models' worth, not the Reassembler's server-sized 1 GiB.
MAX_PENDING_TRANSFER_BYTES = 256 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Dataset = tuple[np.ndarray, np.ndarray]


def last_will(config: ClientConfig) -> Message:
    """The Last Will to give the transport: retained ``offline`` presence on ``presence/<id>``."""
    payload = Presence("offline", 0, __version__).to_bytes()
    return Message(config.topics.presence(config.client_id), payload, retain=True)


def _check_sha(value: str, what: str) -> None:
    if not _SHA256.match(value):
        raise ProtocolError("bad_json", f"{what}: model_sha256 {value[:80]!r} is not 64 lowercase hex digits")


@dataclass
class _Upload:
    """An encoded update awaiting its ack."""

    round: int
    run: str
    model_sha256: str
    payload: bytes
    chunks: list[bytes] = field(default_factory=list)
    sends: int = 0
    next_send: float = 0.0  # clock() time of the next (re)send
    deadline: float | None = None  # deadline of the announcement it answers (None: not yet re-announced)
    exhausted: bool = False  # resends used up or deadline passed: no more sends for this announcement


class EdgeClient:
    """One device in a federation.

    ``dataset`` is ``(x, y)`` as loaded (it is fitted to each model's
    manifest with :func:`edge_client.data.prepare_for_model`); when None the
    data comes from ``config.data``. ``clock`` returns Unix time (deadlines are
    Unix time); tests pass a fake one.

    Attributes worth reading: :attr:`rejected` (malformed messages by reason),
    :attr:`rounds_completed`, :attr:`updates_sent`, :attr:`model_sha256`,
    :attr:`global_frame`, :attr:`announcement` and :attr:`progress`.
    """

    def __init__(
        self,
        config: ClientConfig,
        transport: Transport,
        dataset: Dataset | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.transport = transport
        self.clock = clock
        self.client_id = config.client_id
        self.topics = config.topics
        self.store = StateStore(config.state_dir)
        self.rejected: Counter[str] = Counter()
        self.updates_sent = 0  # update transmissions, resends included
        self._settled: set[tuple[str, int]] = set()  # (run, round) trained here whose outcome is known
        self._ignored: set[tuple[Any, ...]] = set()  # (reason, ...) already logged by _ignore
        # (run, round, deadline) of the announcement whose training gave no update: a retry
        # (same round, new deadline) trains again; the same announcement does not.
        self._no_update: tuple[str, int, float] | None = None
        # The last acknowledged update, kept until a newer round: a coordinator restarted
        # mid-round has lost it and asks for it again by selecting this client once more.
        self._answered: _Upload | None = None
        self._reassembler = Reassembler(max_pending=MAX_PENDING_TRANSFER_BYTES)
        self._rng = np.random.default_rng(config.seed)
        self._chunk_size = config.max_chunk
        self._raw_data: Dataset | None = dataset
        self._dataset_given = dataset is not None
        self._data: Dataset | None = None  # fitted to the current manifest
        # the model in use
        self.model: TrainableModel | None = None
        self.manifest: Manifest | None = None
        self.model_sha256: str | None = None
        self._meta: ModelMeta | None = None  # the latest model the coordinator announced
        self._orphan_model: tuple[str, bytes] | None = None  # a complete model not announced (yet)
        # global weights
        self.global_frame: Frame | None = None
        self._global_transfer: bytes | None = None
        self._orphan_global: tuple[bytes, Frame] | None = None  # for a model that has not arrived (yet)
        # rounds
        self.announcement: RoundAnnouncement | None = None
        self.progress = Progress()
        self._upload: _Upload | None = None
        self._feedback = ErrorFeedback()  # residuals of lossy update codecs, per tensor
        self._waiting: str | None = None  # why the current round is not being trained (logged once)
        self._stop: threading.Event | None = None
        self._started = False
        self._closed = False
        self._online = False  # "online" presence published on the current connection
        self._presence_examples = -1  # num_examples in the last "online" presence

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Restore the state directory, connect, subscribe and announce presence.

        Raises :class:`DataError` if the configured data cannot be read, and
        whatever the transport raises when the broker is unreachable.
        """
        if self._started:
            return
        if self._closed:
            raise RuntimeError("this EdgeClient is closed; create a new one")
        self._restore()
        self._load_raw_data()
        if self.manifest is not None:
            self._prepare_data()
        max_payload = getattr(self.transport, "max_payload", None)
        if isinstance(max_payload, int) and 0 < max_payload < self._chunk_size:
            log.warning(
                "max_chunk %d exceeds the transport's max_payload %d; sending chunks of %d bytes",
                self._chunk_size,
                max_payload,
                max_payload,
            )
            self._chunk_size = max_payload
        self.transport.connect()
        for pattern in (
            self.topics.model_meta,
            self.topics.model_chunks,
            self.topics.global_chunks,
            self.topics.round,
            self.topics.ack(self.client_id),
        ):
            self.transport.subscribe(pattern)
        self._publish_presence()
        self._online = True
        self._started = True
        log.info(
            "client %r started in federation %r (model %s, global round %s, %d examples)",
            self.client_id,
            self.config.federation,
            self.model_sha256[:12] if self.model_sha256 else "none yet",
            self.global_frame.round if self.global_frame is not None else "none",
            self.num_examples,
        )

    def run(self, stop: threading.Event, max_rounds: int | None = None) -> int:
        """Process messages until ``stop`` is set (or ``max_rounds`` rounds are settled).

        Starts the client if needed; does not close it. Returns the number of
        rounds this client trained whose outcome is known.
        """
        self._stop = stop
        if not self._started:
            self.start()
        while not stop.is_set():
            if max_rounds is not None and self.rounds_completed >= max_rounds:
                break
            self.step(RECEIVE_POLL)
        return self.rounds_completed

    def close(self) -> None:
        """Publish the ``offline`` presence and close the transport; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        if self._started and getattr(self.transport, "connected", True):
            try:
                payload = Presence("offline", self.num_examples, __version__).to_bytes()
                self.transport.publish(self.topics.presence(self.client_id), payload, retain=True)
            except Exception as exc:  # the broker will publish the Last Will instead
                log.warning("could not publish offline presence: %s", exc)
        try:
            self.transport.close()
        except Exception as exc:
            log.warning("closing the transport failed: %s", exc)
        log.info("client %r stopped", self.client_id)

    def __enter__(self) -> EdgeClient:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------
    def step(self, timeout: float | None = 0.0) -> bool:
        """Receive and process at most one message, then train or resend if due.

        Waits at most ``timeout`` seconds (None: until a message or a resend
        is due). Returns True if a message was processed. Only the transport
        can make this raise; messages never do.
        """
        if not self._started:
            raise RuntimeError("call start() before step()")
        self._check_connection()
        up = self._upload
        wait = timeout
        if up is not None and up.deadline is not None and not up.exhausted:
            until_resend = max(0.0, up.next_send - self.clock())
            wait = until_resend if wait is None else min(wait, until_resend)
        message = self.transport.receive(wait)
        if message is not None:
            self._handle(message)
        try:
            self._maybe_train()
            self._tick()
        except Exception:  # a bug or a disk failure must not stop the board
            log.exception("unexpected error while training or sending")
            self.rejected["internal_error"] += 1
        return message is not None

    @property
    def rounds_completed(self) -> int:
        """Rounds trained in this process whose outcome is known (acked, rejected, too late or abandoned)."""
        return len(self._settled)

    @property
    def num_examples(self) -> int:
        """Examples this client trains on (0 while its data does not fit the model)."""
        if self._data is not None:
            return len(self._data[0])
        if self.manifest is None and self._raw_data is not None:
            return len(self._raw_data[0])
        return 0

    # -- dispatch --------------------------------------------------------------------
    def _handle(self, message: Message) -> None:
        try:
            self._dispatch(message)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.warning("ignored a message on %s: %s", message.topic, exc)
        except Exception:
            self.rejected["internal_error"] += 1
            log.exception("unexpected error while handling a message on %s", message.topic)

    def _dispatch(self, message: Message) -> None:
        base = self.topics.base + "/"
        if not message.topic.startswith(base):
            log.debug("ignoring a message on %s (outside %s)", message.topic, base)
            return
        topic, payload = message.topic[len(base) :], bytes(message.payload)
        retained_topic = topic in ("model/meta", "round") or topic.startswith(("model/chunk/", "global/chunk/"))
        if retained_topic and not payload:
            log.debug("ignoring an empty message on %s (a cleared retained topic)", message.topic)
            return
        if topic == "model/meta":
            self._on_model_meta(payload)
        elif topic.startswith("model/chunk/"):
            self._on_model_chunk(payload)
        elif topic.startswith("global/chunk/"):
            self._on_global_chunk(payload)
        elif topic == "round":
            self._on_round(payload)
        elif topic == f"ack/{self.client_id}":
            self._on_ack(payload)
        else:
            log.debug("ignoring a message on %s", message.topic)

    # -- model -----------------------------------------------------------------------
    def _on_model_meta(self, payload: bytes) -> None:
        meta = ModelMeta.from_bytes(payload)
        _check_sha(meta.model_sha256, "model meta")
        if meta.model_sha256 == self.model_sha256:
            self._meta = meta
            return
        if meta.size > self._reassembler.max_payload:
            raise ProtocolError("too_large", f"model of {meta.size} bytes exceeds {self._reassembler.max_payload}")
        try:
            manifest = Manifest.from_json(meta.manifest)
        except ManifestError as exc:
            raise ProtocolError("bad_json", f"model meta: {exc}") from None
        if manifest.model_sha256 != meta.model_sha256:
            raise ProtocolError("bad_json", "model meta: the manifest belongs to another model")
        if self._meta is None or self._meta.model_sha256 != meta.model_sha256:
            log.info("model %s announced (%d bytes, %d chunk(s))", meta.model_sha256[:12], meta.size, meta.chunks)
        self._meta = meta
        if self._orphan_model is not None and self._orphan_model[0] == meta.model_sha256:
            model_bytes = self._orphan_model[1]
            self._orphan_model = None
            self._install_model(model_bytes, meta.manifest, manifest)

    def _on_model_chunk(self, payload: bytes) -> None:
        chunk = parse_chunk(payload)
        if self.model_sha256 is not None and chunk.transfer_id == bytes.fromhex(self.model_sha256)[:16]:
            return  # the model in use (retained chunks replayed after a restart or reconnection)
        model_bytes = self._reassembler.add(payload, "model")
        if model_bytes is None:
            return
        digest = sha256_hex(model_bytes)
        if digest == self.model_sha256:
            return
        meta = self._meta
        if meta is not None and digest == meta.model_sha256:
            if len(model_bytes) != meta.size:
                raise ProtocolError("bad_json", f"model meta says {meta.size} bytes, the model has {len(model_bytes)}")
            self._install_model(model_bytes, meta.manifest, Manifest.from_json(meta.manifest))
        else:
            # Chunks may overtake model/meta; keep the latest such model until meta names it.
            log.info("received model %s, which model/meta has not announced (yet)", digest[:12])
            self._orphan_model = (digest, model_bytes)

    def _install_model(
        self, model_bytes: bytes, manifest_json: dict[str, Any], manifest: Manifest, persist: bool = True
    ) -> None:
        digest = manifest.model_sha256
        try:
            model = TrainableModel(model_bytes, manifest, num_threads=self.config.num_threads)
        except Exception as exc:  # ManifestError, ModelFileError, or LiteRT's own errors on a broken graph
            raise ProtocolError("bad_model", f"model {digest[:12]} cannot be loaded: {exc}") from None
        if persist:
            try:
                self.store.save_model(model_bytes, manifest_json)
            except StateError as exc:
                log.error("%s; the model stays in memory only", exc)
        previous = self.model_sha256
        self.model, self.manifest, self.model_sha256 = model, manifest, digest
        log.info(
            "%s model %s (%s, %d parameters)%s",
            "restored" if not persist else "loaded",
            digest[:12],
            manifest.model_name,
            manifest.num_parameters,
            f", replacing {previous[:12]}" if previous else "",
        )
        if self.global_frame is not None and self.global_frame.model_sha256 != digest:
            self.global_frame, self._global_transfer = None, None
        if self._upload is not None and self._upload.model_sha256 != digest:
            self._abandon_upload(f"the model changed to {digest[:12]}")
        if self.progress.model_sha256 != digest:
            self.progress = Progress(model_sha256=digest, run=self.progress.run)
            if persist:
                self._save_progress()
        if previous != digest:
            self._feedback.reset()  # residuals of another model mean nothing for this one
            self._restore_residuals(digest)
        self._waiting = None
        if persist:  # at start() the data is prepared once the raw data is loaded
            self._prepare_data()
        orphan, self._orphan_global = self._orphan_global, None
        if orphan is not None and orphan[1].model_sha256 == digest:
            try:
                self._offer_global(*orphan)
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                log.warning("ignored the global weights received before the model: %s", exc)

    # -- global weights --------------------------------------------------------------
    def _on_global_chunk(self, payload: bytes) -> None:
        chunk = parse_chunk(payload)
        if chunk.transfer_id == self._global_transfer:
            return  # the global frame in use
        if self._orphan_global is not None and chunk.transfer_id == transfer_id_for(self._orphan_global[0]):
            return
        data = self._reassembler.add(payload, "global")
        if data is None:
            return
        frame = decode_frame(data)
        if frame.kind != "global":
            raise ProtocolError("wrong_kind", f"expected a 'global' frame on global/chunk, got {frame.kind!r}")
        self._offer_global(data, frame)

    def _offer_global(self, data: bytes, frame: Frame) -> None:
        if self.manifest is None or frame.model_sha256 != self.model_sha256:
            orphan = self._orphan_global
            held = None if orphan is None else orphan[1]
            # Keep the latest: another model or run replaces it, as does a later round of the same.
            same = held is not None and (held.model_sha256, held.run) == (frame.model_sha256, frame.run)
            if not same or frame.round > held.round:
                self._orphan_global = (data, frame)
                log.info(
                    "keeping global weights of round %d for model %s until that model arrives",
                    frame.round,
                    frame.model_sha256[:12],
                )
            return
        validate_frame(frame, self.manifest.weights, self.model_sha256, "global")
        if frame.run != self.progress.run:
            # The coordinator publishes a run's global frame before announcing its rounds, and
            # replaces the retained one of the previous run: it is the sign of a new run.
            self._join_run(frame.run, f"global weights of round {frame.round} arrived")
        current = self.global_frame
        if current is not None and current.run == frame.run and frame.round <= current.round:
            self._ignore(
                ("stale_round", "global", frame.run, frame.round),
                f"ignoring global weights of round {frame.round}: holding round {current.round} of this run",
            )
            return
        self.global_frame, self._global_transfer = frame, transfer_id_for(data)
        self._waiting = None
        log.info("global weights of round %d received (run %s)", frame.round, frame.run)
        try:
            self.store.save_global(data)
        except StateError as exc:
            log.error("%s; the global weights stay in memory only", exc)

    # -- rounds ----------------------------------------------------------------------
    def _on_round(self, payload: bytes) -> None:
        ann = RoundAnnouncement.from_bytes(payload)
        _check_sha(ann.model_sha256, "round announcement")
        if not np.isfinite(ann.deadline):
            raise ProtocolError("bad_json", "round announcement: deadline must be finite")
        get_codec(ann.codec)  # ProtocolError("unknown_codec") for a codec this client cannot encode
        if ann.run != self.progress.run:
            if self.clock() >= ann.deadline:
                # A closed round of another run: an old retained message, never a reason to leave this run.
                self._ignore(
                    ("stale_run", "round", ann.run, ann.round),
                    f"ignoring the announcement of round {ann.round} of run {ann.run}: its deadline has passed "
                    f"and this board follows run {self.progress.run or '(none yet)'}",
                )
                return
            self._join_run(ann.run, f"round {ann.round} was announced")
        current = self.announcement
        if current is not None and current.run == ann.run and ann.round < current.round:
            self._ignore(
                ("stale_round", "round", ann.run, ann.round),
                f"ignoring the announcement of round {ann.round}: round {current.round} is current",
            )
            return
        if ann == current:
            return
        self.announcement = ann
        self._waiting = None
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
        if self._upload is not None and self._upload.round < ann.round:
            self._abandon_upload(f"round {ann.round} was announced")
        answered = self._answered
        asked_again = (
            selected
            and self._upload is None
            and answered is not None
            and (answered.run, answered.round, answered.model_sha256) == (ann.run, ann.round, ann.model_sha256)
        )
        if asked_again:
            log.info("round %d: asked again for the update already acknowledged; sending it again", ann.round)
            answered.deadline, answered.exhausted = None, False  # a fresh allowance of sends
            self._upload, self._answered = answered, None

    def _ignore(self, key: tuple[Any, ...], message: str, level: int = logging.INFO) -> None:
        """Log why a well-formed message is ignored, once per ``key`` (reason first, then run/round)."""
        if key in self._ignored:
            return
        if len(self._ignored) >= MAX_IGNORED_KEYS:
            self._ignored.clear()
        self._ignored.add(key)
        log.log(level, "%s (%s)", message, key[0])

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
        self._abandon_upload(f"run {run} started")
        self._answered, self._no_update, self._waiting = None, None, None
        if self.announcement is not None and self.announcement.run != run:
            self.announcement = None
        self._feedback.reset()
        try:  # residuals first: a crash before progress.json names the new run only repeats this
            self.store.clear_residuals()
        except OSError as exc:
            log.error("cannot remove the old run's residuals (%s); they will not be loaded for this run", exc)
        self.progress = Progress(model_sha256=self.progress.model_sha256, run=run)
        self._save_progress()

    def _wait(self, reason: str, level: int = logging.INFO) -> None:
        """Log why the announced round is not being trained, once per reason."""
        if reason != self._waiting:
            self._waiting = reason
            log.log(level, "%s", reason)

    def _maybe_train(self) -> None:
        ann = self.announcement
        if ann is None:
            return
        r, selected = ann.round, self.client_id in ann.selected
        if ann.run != self.progress.run:
            return  # _on_round joins the run of every announcement it keeps; kept for safety
        trained = self.progress.trained_round
        if trained is not None and r <= trained:
            if selected and self._upload is None:
                self._ignore(
                    ("already_trained", ann.run, r),
                    f"round {r}: selected, but this board already trained it in this run and no longer holds "
                    "the update; not training it again",
                )
            return
        if self._no_update == (ann.run, r, ann.deadline):
            return  # this announcement's training gave no update; a retry of the round trains again
        if not selected:
            self._wait(f"round {r}: not selected", logging.DEBUG)
            return
        if self.clock() >= ann.deadline:
            self._wait(f"round {r}: the deadline passed before this client could train")
            return
        if self.model is None or self.model_sha256 != ann.model_sha256:
            self._wait(f"round {r}: waiting for model {ann.model_sha256[:12]}")
            return
        held = self.global_frame
        if held is None or held.round != r or held.run != ann.run:
            have = "none" if held is None else f"round {held.round}"
            have += "" if held is None or held.run == ann.run else " of another run"
            self._wait(f"round {r}: waiting for the global weights of round {r} (holding {have})")
            return
        if self._data is None:
            self._wait(f"round {r}: selected, but this client has no training data that fits the model", logging.ERROR)
            return
        self._train(ann)

    def _train(self, ann: RoundAnnouncement) -> None:
        assert self.model is not None and self.global_frame is not None and self._data is not None
        r, x, y = ann.round, *self._data
        log.info("round %d: training on %d examples, %d epoch(s), lr %g, mu %g", r, len(x), ann.epochs, ann.lr, ann.mu)
        stop = self._stop

        def interrupted() -> bool:
            return stop is not None and stop.is_set()

        try:
            training = train_local(
                self.model,
                self.global_frame.tensors,
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
                feedback=self._feedback,
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
        # The transfer id is this digest's prefix: pass it rather than hash 6 MB again.
        chunks = split(payload, self._chunk_size, transfer_id=bytes.fromhex(digest)[:16])
        self._upload = _Upload(r, ann.run, ann.model_sha256, payload, chunks)
        log.info(
            "round %d: trained in %.1f s (%s); update of %d bytes (%s)",
            r,
            training.metrics["train_seconds"],
            ", ".join(f"{k} {v:.4f}" for k, v in training.metrics.items()),
            len(payload),
            ann.codec,
        )

    def _save_residuals(self) -> None:
        assert self.model_sha256 is not None
        try:
            self.store.save_residuals(self.model_sha256, self._feedback.state_dict())
        except StateError as exc:
            log.error("%s; error-feedback residuals stay in memory only", exc)

    def _no_update_for(self, ann: RoundAnnouncement) -> None:
        """Training for ``ann`` gave nothing to send: settled, but not trained (a retry trains again)."""
        self._no_update = (ann.run, ann.round, ann.deadline)
        self._settled.add((ann.run, ann.round))

    # -- sending and acks ------------------------------------------------------------
    def _tick(self) -> None:
        up, ann = self._upload, self.announcement
        if up is None or ann is None:
            return
        if ann.run != up.run:
            self._abandon_upload(f"run {ann.run} was announced")
            return
        if ann.round > up.round:
            self._abandon_upload(f"round {ann.round} was announced")
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
            up.exhausted = True
            self._settled.add((up.run, up.round))
            return
        if now < up.next_send:
            return
        if up.sends > self.config.max_resends:
            log.warning("round %d: no ack after %d send(s); giving up", up.round, up.sends)
            up.exhausted = True
            self._settled.add((up.run, up.round))
            return
        self._send(up)

    def _send(self, up: _Upload) -> None:
        if not up.chunks:
            up.chunks = split(up.payload, self._chunk_size)
        topic = self.topics.update(self.client_id)
        try:
            self.transport.publish_many([Message(topic, chunk) for chunk in up.chunks])
        except (TransportError, OSError, ValueError) as exc:
            log.warning(
                "round %d: sending the update failed (%s); retrying in %.0f s", up.round, exc, self.config.ack_timeout
            )
        else:
            self.updates_sent += 1
            log.info(
                "round %d: %s update (%d bytes, %d chunk(s))",
                up.round,
                "sent" if up.sends == 0 else f"resent (resend {up.sends} of {self.config.max_resends})",
                len(up.payload),
                len(up.chunks),
            )
        up.sends += 1
        up.next_send = self.clock() + self.config.ack_timeout

    def _on_ack(self, payload: bytes) -> None:
        ack = Ack.from_bytes(payload)
        up = self._upload
        if up is not None and ack.run != up.run:
            self._ignore(
                ("stale_run", "ack", ack.run, ack.round),
                f"ignoring an ack of round {ack.round} of run {ack.run}: the update awaiting an ack is of run {up.run}",
            )
            return
        # A coordinator that has moved on rejects a late update (stale_round) under the number of
        # its own current round; only the update in flight can have caused that.
        late_rejection = up is not None and ack.status == "rejected" and ack.round > up.round
        if up is None or (ack.round != up.round and not late_rejection):
            # Typically a second ack (duplicate) after the first ended the round: normal, so debug.
            self._ignore(
                ("no_update_awaits", ack.run, ack.round, ack.status),
                f"ignoring an ack ({ack.status}) of round {ack.round}: no update of that round awaits one",
                logging.DEBUG,
            )
            return
        if ack.status in ("accepted", "duplicate"):
            log.info("round %d: update %s by the coordinator", up.round, ack.status)
            self.progress = replace(self.progress, acked_round=up.round, pending=None)
            self._answered = up
        else:
            log.warning(
                "round %d: the coordinator%s rejected the update: %s",
                up.round,
                f" (at round {ack.round})" if late_rejection else "",
                ack.reason or "no reason given",
            )
            self.progress = replace(self.progress, pending=None)
        self._upload = None
        self._save_progress()
        self._settled.add((up.run, up.round))

    def _abandon_upload(self, why: str) -> None:
        up = self._upload
        if up is None:
            return
        log.info("round %d: abandoning the update awaiting an ack: %s", up.round, why)
        self._upload = None
        self._settled.add((up.run, up.round))
        if self.progress.pending is not None:
            self.progress = replace(self.progress, pending=None)
            self._save_progress()

    def _save_progress(self, pending_bytes: bytes | None = None) -> None:
        try:
            self.store.save_progress(self.progress, pending_bytes)
        except StateError as exc:
            log.error("%s; progress is kept in memory only", exc)

    # -- presence and connection -----------------------------------------------------
    def _publish_presence(self) -> None:
        count = self.num_examples
        payload = Presence("online", count, __version__).to_bytes()
        self.transport.publish(self.topics.presence(self.client_id), payload, retain=True)
        self._presence_examples = count

    def _check_connection(self) -> None:
        """After a reconnection the broker has published our Last Will: say ``online`` again."""
        connected = bool(getattr(self.transport, "connected", True))
        if connected and not self._online:
            try:
                self._publish_presence()
            except (TransportError, OSError) as exc:
                log.warning("could not publish online presence: %s", exc)
                return
            self._online = True
            log.info("connection to the broker re-established")
        elif not connected and self._online:
            self._online = False
            log.warning("lost the connection to the broker; the transport is reconnecting")

    # -- state -----------------------------------------------------------------------
    def _restore(self) -> None:
        stored = self.store.load_model()
        if stored is not None:
            try:
                self._install_model(stored.model, stored.manifest_json, stored.manifest, persist=False)
            except ProtocolError as exc:
                log.warning("ignoring the stored model: %s", exc)
        if self.manifest is None:
            return
        progress = self.store.load_progress()
        if progress.model_sha256 == self.model_sha256:
            pending_bytes = self.store.load_pending(progress, self.manifest)
            if progress.pending is not None and pending_bytes is None:
                progress = replace(progress, pending=None)
            self.progress = progress
            if pending_bytes is not None and progress.pending is not None:
                pending = progress.pending
                self._upload = _Upload(pending.round, progress.run, pending.model_sha256, pending_bytes)
                log.info("restored the update of round %d awaiting an ack", progress.pending.round)
        elif progress.model_sha256:
            log.info("the stored progress belongs to another model; starting afresh")
        stored_global = self.store.load_global(self.manifest)
        if stored_global is not None:
            data, frame = stored_global
            self.global_frame, self._global_transfer = frame, transfer_id_for(data)

    def _restore_residuals(self, digest: str) -> None:
        stored = self.store.load_residuals(digest)
        if stored:
            try:
                self._feedback.load_state_dict(stored)
                log.info("restored error-feedback residuals for %d tensors", len(stored))
            except EdgeClientError as exc:
                log.warning("ignoring the stored error-feedback residuals: %s", exc)

    # -- data ------------------------------------------------------------------------
    def _load_raw_data(self) -> None:
        """Read npz and csv data at start, so that a wrong path fails at once (images need the model)."""
        source = self.config.data
        if self._dataset_given or source is None:
            if source is None and not self._dataset_given:
                log.warning("no training data configured: this client will never train")
            return
        if source.kind == "npz":
            self._raw_data = load_npz(source.path, source.x_key, source.y_key)
        elif source.kind == "csv":
            self._raw_data = load_csv(source.path, source.label_column, source.has_header, source.delimiter)
        if self._raw_data is not None:
            log.info("loaded %d examples from %s", len(self._raw_data[0]), source.describe())

    def _prepare_data(self) -> None:
        """Fit the data to the current manifest; on failure the client stays online but does not train."""
        assert self.manifest is not None
        self._data = None
        source = self.config.data
        try:
            raw = self._raw_data
            if not self._dataset_given and source is not None and source.kind == "images":
                folder = load_image_folder(source.path, tuple(self.manifest.input.shape[1:]), source.labels)
                raw = (folder.x, folder.y)
                log.info("loaded %d images of %d labels from %s", len(folder.x), len(folder.class_names), source.path)
            if raw is not None:
                self._data = prepare_for_model(raw[0], raw[1], self.manifest)
        except (DataError, EdgeClientError, ValueError) as exc:
            log.error("the training data does not fit model %s: %s", self.model_sha256 and self.model_sha256[:12], exc)
        if self._started and self._online and self.num_examples != self._presence_examples:
            try:
                self._publish_presence()
            except (TransportError, OSError) as exc:
                log.warning("could not update presence: %s", exc)
