"""The coordinator service: publishes the model and runs federated rounds.

One round: wait until ``strategy.min_available`` clients are online, let the
strategy pick clients and hyper-parameters, publish the global weights and
the round announcement (both retained), then fold in updates as they arrive
until every selected client answered or the deadline passed. With fewer
than ``strategy.min_fit`` accepted updates the round is retried: announced
again with a new deadline to the selected clients that have not answered
plus those the strategy samples among the other eligible ones (accepted
updates are kept). Then aggregate, evaluate, checkpoint, log the metrics
and go on.

Every run has a random id (:attr:`Coordinator.run_id`) that travels in
global frames, announcements and acks, and that updates must echo; a run
resumed from its checkpoint keeps it (docs/protocol.md, "Runs").

The service knows MQTT only through a :class:`~edge_client.transport.Transport`,
so tests drive it over an in-memory broker exactly as it runs over Mosquitto.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.errors import AggregationError, CoordinatorError
from coordinator.metrics import RoundMetrics, append_jsonl
from coordinator.strategies import Aggregation, ClientUpdate, Strategy
from coordinator.strategies.aggregate import finish_or_keep
from edge_client.chunks import DEFAULT_MAX_CHUNK, Reassembler, split
from edge_client.errors import ProtocolError
from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
from edge_client.manifest import Manifest, load_manifest, manifest_path_for
from edge_client.messages import Ack, ModelMeta, Presence, RoundAnnouncement, new_run_id
from edge_client.model_file import sha256_hex
from edge_client.runtime import TrainableModel
from edge_client.topics import Topics
from edge_client.transport import Message, Transport
from edge_client.weights import Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator needs besides its transport and strategy."""

    model_path: Path
    rounds: int = 10
    round_timeout: float = 120.0
    federation: str = "default"
    topic_prefix: str = "litefed"
    checkpoint_dir: Path | None = None
    metrics_path: Path | None = None
    seed: int = 0
    max_chunk: int = DEFAULT_MAX_CHUNK
    max_attempts: int = 3
    wait_for_clients: float | None = None
    poll_interval: float = 0.2

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.round_timeout <= 0 or self.max_attempts < 1:
            raise CoordinatorError("rounds and max_attempts must be >= 1 and round_timeout > 0")


@dataclass
class _OpenRound:
    number: int
    selected: set[str]
    deadline: float
    aggregation: Aggregation
    metrics: RoundMetrics
    accepted: set[str] = field(default_factory=set)


class Coordinator:
    """Runs ``config.rounds`` rounds of ``strategy`` over ``transport``."""

    def __init__(
        self,
        config: CoordinatorConfig,
        transport: Transport,
        strategy: Strategy,
        clock: Callable[[], float] = time.time,
        on_round: Callable[[RoundMetrics], None] | None = None,
    ):
        self.config, self.transport, self.strategy = config, transport, strategy
        self._clock, self.on_round = clock, on_round
        self.model = Path(config.model_path).read_bytes()
        self.manifest: Manifest = load_manifest(manifest_path_for(config.model_path))
        self.model_sha256 = sha256_hex(self.model)
        self.topics = Topics(config.federation, config.topic_prefix)
        self.online: dict[str, int] = {}  # client id -> examples it reported
        self.history: list[RoundMetrics] = []
        self.global_weights: Weights = TrainableModel(self.model, self.manifest).get_weights()
        self.completed_round = 0
        self.run_id = new_run_id()  # replaced by the checkpoint's when resuming
        self._rng = np.random.default_rng(config.seed)
        self._reassembler = Reassembler()
        self._open: _OpenRound | None = None
        self._published_chunks: dict[str, int] = {}
        self._bytes_in = self._bytes_out = 0

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Connect, restore the last checkpoint (or start a new run) and publish the model."""
        resumed = self._restore()
        if not resumed and self.config.checkpoint_dir is not None:
            # Checkpointed at once, so a restart during round 1 keeps the run id.
            save_checkpoint(self.config.checkpoint_dir, self._checkpoint())
        self.transport.connect()
        # Clear the retained announcement first: until this run announces its own round, a board
        # must not find a round of another run (or a closed one of this run) there.
        self._publish(self.topics.round, b"", retain=True)
        self.transport.subscribe(self.topics.presences)
        self.transport.subscribe(self.topics.updates)
        count = self._publish_chunked("model", self.topics.model_chunk, self.model)
        meta = ModelMeta(self.model_sha256, len(self.model), count, self.manifest.to_json())
        self._publish(self.topics.model_meta, meta.to_bytes(), retain=True)
        log.info("published model %s (%d bytes, %d chunks)", self.model_sha256[:12], len(self.model), count)
        log.info("%s run %s", "resuming" if resumed else "starting", self.run_id)

    def run(self, stop: threading.Event | None = None) -> list[RoundMetrics]:
        """Run the remaining rounds; return the metrics of the rounds run now."""
        stop = stop or threading.Event()
        ran = []
        for number in range(self.completed_round + 1, self.config.rounds + 1):
            metrics = self.run_round(number, stop)
            if metrics is None:  # stopped
                break
            ran.append(metrics)
        else:
            self._publish_global(self.config.rounds + 1)  # boards keep the final model
        return ran

    def close(self) -> None:
        self.transport.close()

    # -- one round ------------------------------------------------------------
    def run_round(self, number: int, stop: threading.Event) -> RoundMetrics | None:
        started = time.perf_counter()
        bytes_in, bytes_out = self._bytes_in, self._bytes_out
        metrics = RoundMetrics(round=number)
        self._open = _OpenRound(
            number, set(), 0.0, self.strategy.begin_aggregation(number, self.global_weights), metrics
        )
        self._publish_global(number)
        for attempt in range(1, self.config.max_attempts + 1):
            metrics.attempts = attempt
            if not self._wait_for_clients(stop):
                return None
            self._announce(attempt)
            if not self._collect(stop):
                return None
            if len(self._open.accepted) >= self.strategy.min_fit:
                break
            if attempt < self.config.max_attempts:
                log.warning(
                    "round %d: %d accepted update(s) by the deadline, min_fit is %d; announcing the round again "
                    "(attempt %d of %d)",
                    number,
                    len(self._open.accepted),
                    self.strategy.min_fit,
                    attempt + 1,
                    self.config.max_attempts,
                )
        else:
            raise CoordinatorError(
                f"round {number} got {len(self._open.accepted)} updates in {self.config.max_attempts} attempts, "
                f"fewer than min_fit={self.strategy.min_fit}; check that enough clients are online and fast enough "
                "for --round-timeout"
            )
        self._finish_round(started, bytes_in, bytes_out)
        return metrics

    def _announce(self, attempt: int) -> None:
        self._drain()  # select from the freshest presence state
        open_ = self._open
        available = sorted(c for c in self._eligible() if c not in open_.accepted)
        chosen, round_config = self.strategy.configure_round(open_.number, available, self._rng)
        waiting = open_.selected - open_.accepted  # selected by earlier attempts, no update yet
        open_.selected |= set(chosen)
        open_.deadline = self._clock() + self.config.round_timeout
        open_.metrics.clients_selected = len(open_.selected)
        open_.metrics.client_lr = round_config.lr
        # "selected" asks for an update: clients already accepted this round are not asked again,
        # while a restarted coordinator asks everyone (clients resend what it lost).
        announcement = RoundAnnouncement(
            open_.number,
            tuple(sorted(open_.selected - open_.accepted)),
            open_.deadline,
            self.model_sha256,
            round_config.epochs,
            round_config.lr,
            round_config.mu,
            round_config.codec,
            self.run_id,
        )
        self._publish(self.topics.round, announcement.to_bytes(), retain=True)
        if attempt == 1:
            log.info("round %d: selected %d of %d online clients", open_.number, len(chosen), len(self.online))
        else:
            # The strategy samples again among the eligible clients without an accepted update
            # (fewer than in attempt 1); those still silent are asked again as well.
            log.info(
                "round %d (attempt %d): asking %d client(s) for an update: %d selected earlier without an "
                "update yet, %d newly sampled from the %d eligible online clients without an accepted update "
                "(%d accepted so far)",
                open_.number,
                attempt,
                len(announcement.selected),
                len(waiting),
                len(set(chosen) - waiting),
                len(available),
                len(open_.accepted),
            )

    def _collect(self, stop: threading.Event) -> bool:
        """Handle messages until every selected client answered or the deadline passed."""
        open_ = self._open
        while not stop.is_set():
            remaining = open_.deadline - self._clock()
            if remaining <= 0 or open_.selected <= open_.accepted:
                return True
            self._poll(min(remaining, self.config.poll_interval))
        return False

    def _finish_round(self, started: float, bytes_in: int, bytes_out: int) -> None:
        open_, metrics = self._open, self._open.metrics
        t0 = time.perf_counter()
        self.global_weights, metrics.aggregation_error = finish_or_keep(
            open_.aggregation, self.global_weights, open_.number
        )
        metrics.aggregate_seconds = time.perf_counter() - t0
        metrics.dp_epsilon = self.strategy.privacy_spent()
        t0 = time.perf_counter()
        scores = self.strategy.evaluate(open_.number, self.global_weights) or {}
        metrics.evaluate_seconds = time.perf_counter() - t0
        metrics.test_loss, metrics.test_accuracy = scores.get("loss"), scores.get("accuracy")
        self.completed_round = open_.number
        self._open = None
        if self.config.checkpoint_dir is not None:
            save_checkpoint(self.config.checkpoint_dir, self._checkpoint())
        metrics.round_seconds = time.perf_counter() - started
        metrics.bytes_in, metrics.bytes_out = self._bytes_in - bytes_in, self._bytes_out - bytes_out
        if self.config.metrics_path is not None:
            append_jsonl(self.config.metrics_path, metrics.to_json())
        self.history.append(metrics)
        if self.on_round is not None:
            self.on_round(metrics)

    def _wait_for_clients(self, stop: threading.Event) -> bool:
        """Wait until enough clients are online; False if stopped."""
        need = self.strategy.min_available - len(self._open.accepted)
        give_up = None if self.config.wait_for_clients is None else self._clock() + self.config.wait_for_clients
        logged = False
        while len(self._eligible() - self._open.accepted) < need:
            if stop.is_set():
                return False
            if give_up is not None and self._clock() > give_up:
                raise CoordinatorError(
                    f"only {len(self.online)} clients online after {self.config.wait_for_clients:.0f} s, "
                    f"{self.strategy.min_available} needed; start more clients or lower --min-available"
                )
            if not logged:
                log.info("waiting for clients: %d online, %d needed", len(self.online), self.strategy.min_available)
                logged = True
            self._poll(self.config.poll_interval)
        return True

    # -- messages -------------------------------------------------------------
    def _drain(self, limit: int = 10_000) -> None:
        """Handle what is already queued, without waiting."""
        for _ in range(limit):
            if not self._poll(0.0):
                return

    def _poll(self, timeout: float) -> bool:
        """Handle at most one message; False if none came within ``timeout``."""
        message = self.transport.receive(timeout=max(timeout, 0.0))
        if message is None:
            return False
        self._bytes_in += len(message.payload)
        client = self.topics.client_of(message.topic)
        if client is None:
            return True
        if message.topic == self.topics.presence(client):
            self._on_presence(client, message)
        else:
            self._on_update_chunk(client, message)
        return True

    def _on_presence(self, client: str, message: Message) -> None:
        if not message.payload:  # retained presence cleared
            self.online.pop(client, None)
            return
        try:
            presence = Presence.from_bytes(message.payload)
        except ProtocolError as exc:
            log.warning("presence from %s rejected: %s", client, exc)
            return
        if presence.status == "online":
            self.online[client] = presence.num_examples
        else:
            self.online.pop(client, None)

    def _eligible(self) -> set[str]:
        """Online clients that can train: a client without usable data would only stall a round."""
        return {client for client, examples in self.online.items() if examples > 0}

    def _on_update_chunk(self, client: str, message: Message) -> None:
        frame = None
        try:
            payload = self._reassembler.add(message.payload, source=message.topic)
            if payload is None:
                return
            frame = decode_frame(payload)
            if frame.client_id != client:
                raise ProtocolError(
                    "client_mismatch", f"update on {client}'s topic claims to be from {frame.client_id!r}"
                )
            self._accept(client, frame)
        except (ProtocolError, AggregationError) as exc:
            reason = getattr(exc, "reason", "bad_tensors")
            log.warning("update from %s rejected: %s", client, exc)
            if self._open is not None:
                self._open.metrics.reject(reason)
                if reason == "stale_round":
                    self._open.metrics.late_updates += 1
            # The ack names the update's round, so the client knows which update was refused.
            # So does its run: a board of another run can tell this rejection is about its update.
            current = self._open.number if self._open else self.completed_round
            if frame is not None:
                self._ack(client, Ack(frame.round, "rejected", reason, frame.run))
            else:
                self._ack(client, Ack(current, "rejected", reason, self.run_id))

    def _accept(self, client: str, frame: Frame) -> None:
        open_ = self._open
        if open_ is None:
            raise ProtocolError("stale_round", f"no round is open (last completed: {self.completed_round})")
        validate_frame(
            frame, self.manifest.weights, self.model_sha256, "update", current_round=open_.number, run=self.run_id
        )
        if client in open_.accepted:
            self._ack(client, Ack(open_.number, "duplicate", run=self.run_id))
            return
        if client not in open_.selected:
            raise ProtocolError("not_selected", f"{client} was not selected for round {open_.number}")
        open_.aggregation.add(ClientUpdate(client, frame.tensors, frame.num_examples, dict(frame.metrics)))
        open_.accepted.add(client)
        open_.metrics.record_update(frame.num_examples, frame.metrics)
        self._ack(client, Ack(open_.number, "accepted", run=self.run_id))
        log.debug(
            "round %d: update from %s accepted (%d/%d)", open_.number, client, len(open_.accepted), len(open_.selected)
        )

    # -- publishing -----------------------------------------------------------
    def _ack(self, client: str, ack: Ack) -> None:
        self._publish(self.topics.ack(client), ack.to_bytes())

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.transport.publish(topic, payload, retain=retain)
        self._bytes_out += len(payload)

    def _publish_global(self, number: int) -> None:
        frame = Frame("global", number, self.model_sha256, self.global_weights, run=self.run_id)
        self._publish_chunked("global", self.topics.global_chunk, encode_frame(frame))

    def _publish_chunked(self, family: str, topic_for: Callable[[int], str], payload: bytes) -> int:
        """Publish ``payload`` as retained chunks; clear retained chunks left from a longer payload."""
        chunks = split(payload, self.config.max_chunk)
        stale = range(len(chunks), self._published_chunks.get(family, 0))
        messages = [Message(topic_for(i), chunk, retain=True) for i, chunk in enumerate(chunks)]
        messages += [Message(topic_for(i), b"", retain=True) for i in stale]
        self.transport.publish_many(messages)
        self._bytes_out += sum(len(m.payload) for m in messages)
        self._published_chunks[family] = len(chunks)
        return len(chunks)

    def _checkpoint(self) -> Checkpoint:
        state = self.strategy.state_dict()
        return Checkpoint(self.completed_round, self.model_sha256, self.global_weights, state, self.run_id)

    def _restore(self) -> bool:
        """Resume from the checkpoint if there is one for this model; True if resumed."""
        if self.config.checkpoint_dir is None:
            return False
        checkpoint = load_checkpoint(self.config.checkpoint_dir, self.model_sha256)
        if checkpoint is None:
            return False
        self.global_weights, self.completed_round = checkpoint.weights, checkpoint.completed_round
        if checkpoint.strategy_state:
            self.strategy.load_state_dict(checkpoint.strategy_state)  # e.g. FedAdam's moments
        if checkpoint.run_id:
            self.run_id = checkpoint.run_id
        else:  # written before runs had ids (protocol v1): continue under a new one, saved at once
            log.warning("the checkpoint in %s has no run id; continuing as run %s", self.config.checkpoint_dir,
                        self.run_id)  # fmt: skip
            save_checkpoint(self.config.checkpoint_dir, self._checkpoint())
        log.info("resuming after round %d from %s", self.completed_round, self.config.checkpoint_dir)
        return True
