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

The round itself (taking updates in, aggregation, evaluation, checkpoints,
metrics) is the :class:`~coordinator.rounds.RoundEngine` the simulator runs
too; this module adds what MQTT needs: presence, selection, announcements,
retries, chunks, acks and publishing.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.checkpoint import ServerState
from coordinator.errors import CoordinatorError
from coordinator.metrics import RoundMetrics
from coordinator.rounds import OpenRound, RoundEngine
from coordinator.strategies import Strategy
from edge_client.chunks import DEFAULT_MAX_CHUNK, Reassembler, split
from edge_client.errors import ProtocolError
from edge_client.frames import decode_frame
from edge_client.manifest import Manifest, load_manifest, manifest_path_for
from edge_client.messages import Ack, ModelMeta, Presence, RoundAnnouncement, new_run_id
from edge_client.model_file import sha256_hex
from edge_client.reasons import CLIENT_MISMATCH
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
        self._clock = clock
        self.model = Path(config.model_path).read_bytes()
        self.manifest: Manifest = load_manifest(manifest_path_for(config.model_path))
        self.model_sha256 = sha256_hex(self.model)
        self.topics = Topics(config.federation, config.topic_prefix)
        self.online: dict[str, int] = {}  # client id -> examples it reported
        weights = TrainableModel(self.model, self.manifest).get_weights()
        # A new run; start() replaces it with the checkpoint's when resuming.
        initial = ServerState(0, weights, strategy.state_dict(), new_run_id())
        self.engine = RoundEngine(
            strategy,
            self.manifest.weights,
            self.model_sha256,
            initial,
            checkpoint_dir=config.checkpoint_dir,
            metrics_path=config.metrics_path,
            on_round=on_round,
        )
        self._rng = np.random.default_rng(config.seed)
        self._reassembler = Reassembler()
        self._selected: set[str] = set()  # asked for an update in the open round, by any attempt
        self._deadline = 0.0  # of the open round's latest attempt
        self._published_chunks: dict[str, int] = {}
        self._bytes_in = self._bytes_out = 0

    # -- the run, as the engine has it ----------------------------------------------
    @property
    def run_id(self) -> str:
        return self.engine.run_id

    @property
    def completed_round(self) -> int:
        return self.engine.completed_round

    @property
    def global_weights(self) -> Weights:
        return self.engine.state.weights

    @property
    def history(self) -> list[RoundMetrics]:
        """The metrics of the rounds this coordinator ran."""
        return self.engine.history

    @property
    def on_round(self) -> Callable[[RoundMetrics], None] | None:
        """Called with each finished round's metrics (may be set before :meth:`run`)."""
        return self.engine.on_round

    @on_round.setter
    def on_round(self, callback: Callable[[RoundMetrics], None] | None) -> None:
        self.engine.on_round = callback

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Connect, restore the last checkpoint (or start a new run) and publish the model."""
        resumed = self.engine.restore() is not None
        if not resumed:
            # Checkpointed at once, so a restart during round 1 keeps the run id the boards joined.
            self.engine.save_checkpoint()
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
            self._publish_global()  # the model after the last round: boards keep it
        return ran

    def close(self) -> None:
        self.transport.close()

    # -- one round ------------------------------------------------------------
    def run_round(self, number: int, stop: threading.Event) -> RoundMetrics | None:
        """Run round ``number`` (the one after the last completed); its metrics, or None if stopped."""
        if number != self.completed_round + 1:
            raise CoordinatorError(f"round {number} cannot run after round {self.completed_round}; run rounds in order")
        bytes_in, bytes_out = self._bytes_in, self._bytes_out
        open_ = self.engine.open_round()
        self._selected, self._deadline = set(), 0.0
        self._publish_global()
        for attempt in range(1, self.config.max_attempts + 1):
            open_.metrics.attempts = attempt
            if not self._wait_for_clients(open_, stop):
                return None
            self._announce(open_, attempt)
            if not self._collect(open_, stop):
                return None
            if len(open_.accepted) >= self.strategy.min_fit:
                break
            if attempt < self.config.max_attempts:
                log.warning(
                    "round %d: %d accepted update(s) by the deadline, min_fit is %d; announcing the round again "
                    "(attempt %d of %d)",
                    number,
                    len(open_.accepted),
                    self.strategy.min_fit,
                    attempt + 1,
                    self.config.max_attempts,
                )
        else:
            raise CoordinatorError(
                f"round {number} got {len(open_.accepted)} updates in {self.config.max_attempts} attempts, "
                f"fewer than min_fit={self.strategy.min_fit}; check that enough clients are online and fast enough "
                "for --round-timeout"
            )
        return self.engine.finish_round(self._bytes_in - bytes_in, self._bytes_out - bytes_out)

    def _announce(self, open_: OpenRound, attempt: int) -> None:
        self._drain()  # select from the freshest presence state
        available = sorted(c for c in self._eligible() if c not in open_.accepted)
        chosen, round_config = self.strategy.configure_round(open_.number, available, self._rng)
        waiting = self._selected - open_.accepted  # selected by earlier attempts, no update yet
        self._selected |= set(chosen)
        self._deadline = self._clock() + self.config.round_timeout
        open_.metrics.clients_selected = len(self._selected)
        open_.metrics.client_lr = round_config.lr
        # "selected" asks for an update: clients already accepted this round are not asked again,
        # while a restarted coordinator asks everyone (clients resend what it lost).
        announcement = RoundAnnouncement(
            open_.number,
            tuple(sorted(self._selected - open_.accepted)),
            self._deadline,
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

    def _collect(self, open_: OpenRound, stop: threading.Event) -> bool:
        """Handle messages until every selected client answered or the deadline passed; False if stopped."""
        while not stop.is_set():
            remaining = self._deadline - self._clock()
            if remaining <= 0 or self._selected <= open_.accepted:
                return True
            self._poll(min(remaining, self.config.poll_interval))
        return False

    def _wait_for_clients(self, open_: OpenRound, stop: threading.Event) -> bool:
        """Wait until enough clients are online; False if stopped."""
        need = self.strategy.min_available - len(open_.accepted)
        give_up = None if self.config.wait_for_clients is None else self._clock() + self.config.wait_for_clients
        logged = False
        while len(self._eligible() - open_.accepted) < need:
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
        """One chunk of ``client``'s update; a complete update goes to the engine, and the client gets its ack."""
        frame = None
        try:
            payload = self._reassembler.add(message.payload, source=message.topic)
            if payload is None:
                return
            frame = decode_frame(payload)
            if frame.client_id != client:
                raise ProtocolError(
                    CLIENT_MISMATCH, f"update on {client}'s topic claims to be from {frame.client_id!r}"
                )
        except ProtocolError as exc:
            self._ack(client, self.engine.refuse(client, exc, frame))
            return
        ack = self.engine.accept(frame, client, selected=self._selected)
        self._ack(client, ack)
        if ack.status == "accepted" and (open_ := self.engine.current) is not None:
            log.debug("round %d: update from %s accepted (%d/%d)", open_.number, client, len(open_.accepted),
                      len(self._selected))  # fmt: skip

    # -- publishing -----------------------------------------------------------
    def _ack(self, client: str, ack: Ack) -> None:
        self._publish(self.topics.ack(client), ack.to_bytes())

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.transport.publish(topic, payload, retain=retain)
        self._bytes_out += len(payload)

    def _publish_global(self) -> None:
        """Publish the global weights that start the next round (retained: late boards find them)."""
        self._publish_chunked("global", self.topics.global_chunk, self.engine.global_frame)

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
