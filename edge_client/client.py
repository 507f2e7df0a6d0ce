"""The edge client: takes part in federated rounds over a :class:`~edge_client.transport.Transport`.

One :class:`EdgeClient` follows the protocol of docs/protocol.md:

1. :meth:`~EdgeClient.start` restores the state directory (model, global
   weights, progress), connects (retrying while the broker is down, when
   given a stop event), subscribes to ``model/meta``, ``model/chunk/+``,
   ``global/chunk/+``, ``round`` and ``ack/<id>``, and has its retained
   ``online`` presence published on every connection (the transport's birth
   message, kept current: ``num_examples`` changes when the data is fitted
   to a model). The transport must have been created with :func:`last_will`
   as its Last Will.
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
   round abandons the old update. An acknowledged update stays in the state
   directory until a later round (or another run) shows that its round has
   closed: a coordinator restarted meanwhile asks for it again.

Given ``config.trust_key`` (the coordinator's public key), the model meta,
the global frames and the announcements are accepted only in envelopes the
coordinator signed, and never older than the newest of their kind already
accepted (:class:`~edge_client.trust.Verifier`); acks need no signature, as
an ack only stops resends.

Everything from the wire is untrusted: a malformed message is logged with its
:class:`ProtocolError` reason, counted in :attr:`EdgeClient.rejected` and
otherwise ignored; nothing received makes :meth:`~EdgeClient.step` raise.
A well-formed message that is ignored (another run, a round already trained,
an older round) is logged once per reason and round, not on every retained
re-delivery.

Training runs on the calling thread, one epoch at a time, so a shutdown
request or a passed deadline stops it between epochs; messages arriving
meanwhile wait in the transport's queue.

The parts: :class:`~edge_client.model_sync.ModelSync` keeps the model and the
global weights (2), :class:`~edge_client.rounds.Rounds` the run followed, the announcement and
training (3), and its :class:`~edge_client.uploads.Uploader` the update
awaiting an ack (4); :class:`EdgeClient` connects them to the transport and
the state directory.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_client import __version__
from edge_client.broker_url import Backoff
from edge_client.config import ClientConfig
from edge_client.data import load_csv, load_image_folder, load_npz, prepare_for_model
from edge_client.errors import BrokerDown, DataError, EdgeClientError, ProtocolError, TransportError
from edge_client.frames import Frame
from edge_client.manifest import Manifest
from edge_client.messages import Ack, Presence, RoundAnnouncement
from edge_client.model_sync import ModelSync, SyncHooks
from edge_client.rounds import LogOnce, Rounds
from edge_client.runtime import TrainableModel
from edge_client.state import Progress, StateStore
from edge_client.transport import Message, Transport
from edge_client.trust import Verifier

log = logging.getLogger(__name__)

RECEIVE_POLL = 0.5  # seconds run() waits for a message before checking its stop event again
RETRY_LOG_INTERVAL = 60.0  # seconds between two "still cannot reach the broker" lines at start

Dataset = tuple[np.ndarray, np.ndarray]


def last_will(config: ClientConfig) -> Message:
    """The Last Will to give the transport: retained ``offline`` presence on ``presence/<id>``."""
    payload = Presence("offline", 0, __version__).to_bytes()
    return Message(config.topics.presence(config.client_id), payload, retain=True)


class EdgeClient:
    """One device in a federation.

    ``dataset`` is ``(x, y)`` as loaded (it is fitted to each model's
    manifest with :func:`edge_client.data.prepare_for_model`); when None the
    data comes from ``config.data``. ``clock`` returns Unix time (deadlines are
    Unix time); tests pass a fake one. ``backoff`` paces the connection
    attempts of a :meth:`start` that waits for the broker.

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
        *,
        backoff: Backoff | None = None,
    ):
        self.config = config
        self.backoff = backoff or Backoff()
        self.transport = transport
        self.clock = clock
        self.client_id = config.client_id
        self.topics = config.topics
        self.store = StateStore(config.state_dir)
        self.rejected: Counter[str] = Counter()
        ignore = LogOnce()
        hooks = SyncHooks(self._model_installed, self._global_arrived, self._global_kept)
        load = functools.partial(TrainableModel, num_threads=config.num_threads)
        self.verifier = Verifier.from_path(config.trust_key, self.store)
        self.sync = ModelSync(self.store, load, hooks, rejected=self.rejected, ignore=ignore, verifier=self.verifier)
        self.rounds = Rounds(config, clock, self.store, self.sync, self._publish_update, ignore)
        self._raw_data: Dataset | None = dataset
        self._dataset_given = dataset is not None
        self._data: Dataset | None = None  # fitted to the current manifest
        self._stop: threading.Event | None = None
        self._restored = False
        self._started = False
        self._closed = False
        self._online = False  # connected, as last seen by the loop (for its log lines)
        self._presence_examples = -1  # num_examples in the "online" presence (the transport's birth)

    # -- lifecycle -------------------------------------------------------------------
    def start(self, stop: threading.Event | None = None) -> None:
        """Restore the state directory, connect, subscribe and announce presence.

        With ``stop``, a broker that cannot be reached yet (:class:`BrokerDown`)
        is retried with :attr:`backoff`, logging, until it answers or ``stop``
        is set (then the client is not started); boards run unattended and
        may boot before their broker. Without it one attempt is made.
        Raises :class:`DataError` if the configured data cannot be read, and
        whatever else the transport raises (bad credentials, say).
        """
        if self._started:
            return
        if self._closed:
            raise RuntimeError("this EdgeClient is closed; create a new one")
        if not self._restored:
            self._restore()
        self.transport.birth = self._presence("online")
        self._presence_examples = self.num_examples
        if not self._connect(stop):
            return
        for pattern in (
            self.topics.model_meta,
            self.topics.model_chunks,
            self.topics.global_chunks,
            self.topics.round,
            self.topics.ack(self.client_id),
        ):
            self.transport.subscribe(pattern)
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

    def _restore(self) -> None:
        """Read the state directory and the data: once, even if the first start() is stopped before connecting."""
        self.sync.restore()
        if self.manifest is not None:
            self.rounds.restore(self.manifest)
        if not self._dataset_given:
            self._raw_data = _read_data(self.config)
        if self.manifest is not None:
            self._prepare_data()
        self._fit_chunks_to_transport()
        self._restored = True

    def run(self, stop: threading.Event, max_rounds: int | None = None) -> int:
        """Process messages until ``stop`` is set (or ``max_rounds`` rounds are settled).

        Starts the client if needed (waiting for the broker until ``stop``);
        does not close it. Returns the number of rounds this client trained
        whose outcome is known.
        """
        self._stop = stop
        if not self._started:
            self.start(stop)
        while self._started and not stop.is_set():
            if max_rounds is not None and self.rounds_completed >= max_rounds:
                break
            self.step(RECEIVE_POLL)
        return self.rounds_completed

    def close(self) -> None:
        """Publish the ``offline`` presence and close the transport; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        self.transport.birth = None  # a reconnection racing this close must not say "online" again
        if self._started and self.transport.connected:
            try:
                offline = self._presence("offline")
                self.transport.publish(offline.topic, offline.payload, retain=True)
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
        wait, until_resend = timeout, self.rounds.uploads.until_due()
        if until_resend is not None:
            wait = until_resend if wait is None else min(wait, until_resend)
        message = self.transport.receive(wait)
        if message is not None:
            self._handle(message)
        try:
            self.rounds.maybe_train(self._data, self._stop)
            self.rounds.uploads.tick(self.rounds.announcement)
        except Exception:  # a bug or a disk failure must not stop the board
            log.exception("unexpected error while training or sending")
            self.rejected["internal_error"] += 1
        return message is not None

    # -- what there is to read -------------------------------------------------------
    @property
    def rounds_completed(self) -> int:
        """Rounds trained in this process whose outcome is known (acked, rejected, too late or abandoned)."""
        return len(self.rounds.settled)

    @property
    def num_examples(self) -> int:
        """Examples this client trains on (0 while its data does not fit the model)."""
        if self._data is not None:
            return len(self._data[0])
        if self.manifest is None and self._raw_data is not None:
            return len(self._raw_data[0])
        return 0

    @property
    def updates_sent(self) -> int:
        """Update transmissions, resends included."""
        return self.rounds.uploads.sent

    @property
    def progress(self) -> Progress:
        """How far this client got in the run it follows (as in progress.json)."""
        return self.rounds.progress

    @property
    def announcement(self) -> RoundAnnouncement | None:
        """The current round's announcement, of the run followed."""
        return self.rounds.announcement

    @property
    def model(self) -> TrainableModel | None:
        return self.sync.model

    @property
    def manifest(self) -> Manifest | None:
        return self.sync.manifest

    @property
    def model_sha256(self) -> str | None:
        return self.sync.model_sha256

    @property
    def global_frame(self) -> Frame | None:
        """The global weights held: the highest round received for the model in use."""
        return self.sync.global_frame

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
            self.sync.on_model_meta(payload)
        elif topic.startswith("model/chunk/"):
            self.sync.on_model_chunk(payload)
        elif topic.startswith("global/chunk/"):
            self.sync.on_global_chunk(payload)
        elif topic == "round":
            self.rounds.on_round(RoundAnnouncement.from_bytes(self.verifier.open("round", payload)))
        elif topic == f"ack/{self.client_id}":
            self.rounds.uploads.on_ack(Ack.from_bytes(payload))
        else:
            log.debug("ignoring a message on %s", message.topic)

    # -- what the model sync reports -------------------------------------------------
    def _model_installed(self, manifest: Manifest, previous: str | None, persist: bool) -> None:
        self.rounds.model_installed(manifest.model_sha256, previous, persist)
        if persist:  # at start() the data is prepared once the raw data is loaded
            self._prepare_data()

    def _global_arrived(self, frame: Frame) -> None:
        self.rounds.global_arrived(frame)

    def _global_kept(self, frame: Frame) -> None:
        self.rounds.global_kept(frame)

    def _publish_update(self, chunks: Sequence[bytes]) -> None:
        topic = self.topics.update(self.client_id)
        self.transport.publish_many([Message(topic, chunk) for chunk in chunks])

    # -- presence and connection -----------------------------------------------------
    def _fit_chunks_to_transport(self) -> None:
        max_payload = self.transport.max_payload
        if 0 < max_payload < self.rounds.uploads.chunk_size:
            log.warning(
                "max_chunk %d exceeds the transport's max_payload %d; sending chunks of %d bytes",
                self.rounds.uploads.chunk_size,
                max_payload,
                max_payload,
            )
            self.rounds.uploads.chunk_size = max_payload

    def _presence(self, status: str) -> Message:
        """This client's retained presence message, with its current ``num_examples``."""
        payload = Presence(status, self.num_examples, __version__).to_bytes()
        return Message(self.topics.presence(self.client_id), payload, retain=True)

    def _publish_presence(self) -> None:
        """Say ``online`` with the current ``num_examples``, now and on every later connection."""
        online = self._presence("online")
        self._presence_examples = self.num_examples
        self.transport.birth = online
        self.transport.publish(online.topic, online.payload, retain=True)

    def _connect(self, stop: threading.Event | None) -> bool:
        """Connect; with ``stop``, retry a broker that is down until it answers. False if stopped first."""
        if stop is None:
            self.transport.connect()
            return True
        attempt, logged_at = 0, -RETRY_LOG_INTERVAL
        while not stop.is_set():
            try:
                self.transport.connect()
                return True
            except BrokerDown as exc:
                delay = self.backoff.delay(attempt)
                attempt += 1
                if time.monotonic() - logged_at >= RETRY_LOG_INTERVAL:  # once, then every minute
                    logged_at = time.monotonic()
                    log.warning("%s; retrying (attempt %d, next in %.1f s) until it answers", exc, attempt, delay)
            stop.wait(delay)
        log.info("stopped before the broker could be reached")
        return False

    def _check_connection(self) -> None:
        """Log connection losses and returns; the transport says ``online`` again itself (its birth message)."""
        connected = self.transport.connected
        if connected and not self._online:
            self._online = True
            log.info("connection to the broker re-established")
        elif not connected and self._online:
            self._online = False
            log.warning("lost the connection to the broker; the transport is reconnecting")

    # -- data ------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        """Fit the data to the current manifest; on failure the client stays online but does not train."""
        assert self.manifest is not None
        self._data = None
        try:
            self._data = _fit_data(self._raw_data, None if self._dataset_given else self.config, self.manifest)
        except (DataError, EdgeClientError, ValueError) as exc:
            log.error("the training data does not fit model %s: %s", self.model_sha256 and self.model_sha256[:12], exc)
        if self._started and self.num_examples != self._presence_examples:
            try:
                self._publish_presence()
            except (TransportError, OSError) as exc:  # the birth message says it on the next connection
                log.warning("could not update presence now: %s", exc)


def _read_data(config: ClientConfig) -> Dataset | None:
    """Read npz and csv data at start, so that a wrong path fails at once (images need the model)."""
    source = config.data
    if source is None:
        log.warning("no training data configured: this client will never train")
        return None
    raw: Dataset | None = None
    if source.kind == "npz":
        raw = load_npz(source.path, source.x_key, source.y_key)
    elif source.kind == "csv":
        raw = load_csv(source.path, source.label_column, source.has_header, source.delimiter)
    if raw is not None:
        log.info("loaded %d examples from %s", len(raw[0]), source.describe())
    return raw


def _fit_data(raw: Dataset | None, config: ClientConfig | None, manifest: Manifest) -> Dataset | None:
    """``raw`` fitted to ``manifest``; an image folder of ``config.data`` is read now, at the model's input size."""
    source = None if config is None else config.data
    if source is not None and source.kind == "images":
        folder = load_image_folder(source.path, tuple(manifest.input.shape[1:]), source.labels)
        raw = (folder.x, folder.y)
        log.info("loaded %d images of %d labels from %s", len(folder.x), len(folder.class_names), source.path)
    return None if raw is None else prepare_for_model(raw[0], raw[1], manifest)
