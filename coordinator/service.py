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

The broker may go away: publishes are retried until it is back, for up to
``broker_outage_timeout`` (:class:`BrokerOutage`), an attempt of a round
during which it was away does not count, and after every reconnection the
retained state (model, global weights, announcement) is published again, as a
broker restarted without persistence has lost it (docs/protocol.md, "Recovery").

With a :class:`~edge_client.signing.SigningKey` what boards download is
signed; the :class:`~coordinator.publisher.Publisher` writes it.

The service knows MQTT only through a :class:`~edge_client.transport.Transport`,
so tests drive it over an in-memory broker exactly as it runs over Mosquitto.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.checkpoint import ServerState
from coordinator.errors import CoordinatorError
from coordinator.metrics import RoundMetrics
from coordinator.outage import BrokerOutage
from coordinator.presence import Presences
from coordinator.publisher import Publisher
from coordinator.rounds import DEFAULT_MAX_EXAMPLES, OpenRound, RoundEngine
from coordinator.strategies import Strategy
from edge_client.chunks import DEFAULT_MAX_CHUNK, Reassembler
from edge_client.errors import ProtocolError
from edge_client.frames import decode_frame
from edge_client.manifest import Manifest, load_manifest, manifest_path_for
from edge_client.messages import RoundAnnouncement, new_run_id
from edge_client.model_file import sha256_hex
from edge_client.reasons import CLIENT_MISMATCH
from edge_client.runtime import TrainableModel
from edge_client.signing import SigningKey
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
    broker_outage_timeout: float = 600.0  # seconds the broker may stay away before the coordinator gives up
    # Bounds on what clients send (docs/protocol.md, "Hostile input"): see Presences and RoundEngine.accept.
    max_clients: int = 10_000
    presence_rate: int = 12  # presence changes per client per minute
    allowed_clients: frozenset[str] | None = None  # None: any client id
    max_examples: int = DEFAULT_MAX_EXAMPLES
    max_update_norm: float | None = None
    max_update_bytes: int = 64 << 20  # one update frame; a client's incomplete ones: two of these
    max_pending_bytes: int = 1 << 30  # all clients' incomplete updates

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.round_timeout <= 0 or self.max_attempts < 1:
            raise CoordinatorError("rounds and max_attempts must be >= 1 and round_timeout > 0")
        if not self.broker_outage_timeout > 0:
            raise CoordinatorError(f"broker_outage_timeout must be > 0 seconds, got {self.broker_outage_timeout}")
        if self.max_clients < 1 or self.presence_rate < 1 or self.max_examples < 1:
            raise CoordinatorError("max_clients, presence_rate and max_examples must be >= 1")
        norm = self.max_update_norm
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise CoordinatorError(f"max_update_norm must be a positive number or None, got {norm}")


class Coordinator:
    """Runs ``config.rounds`` rounds of ``strategy`` over ``transport``; signs what it publishes with ``signer``."""

    def __init__(
        self,
        config: CoordinatorConfig,
        transport: Transport,
        strategy: Strategy,
        clock: Callable[[], float] = time.time,
        on_round: Callable[[RoundMetrics], None] | None = None,
        *,
        signer: SigningKey | None = None,
    ):
        self.config, self.transport, self.strategy = config, transport, strategy
        self._clock = clock
        self.model = Path(config.model_path).read_bytes()
        self.manifest: Manifest = load_manifest(manifest_path_for(config.model_path))
        self.model_sha256 = sha256_hex(self.model)
        self.topics = Topics(config.federation, config.topic_prefix)
        self.presences = Presences(config.max_clients, config.presence_rate, config.allowed_clients, clock)
        self.online = self.presences.online  # client id -> examples it reported
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
            max_examples=config.max_examples,
            max_update_norm=config.max_update_norm,
        )
        self._rng = np.random.default_rng(config.seed)
        self._reassembler = Reassembler(config.max_update_bytes, config.max_pending_bytes)
        self._selected: set[str] = set()  # asked for an update in the open round, by any attempt
        self._reported: dict[str, int] = {}  # examples the clients selected this round reported when selected
        self._deadline = 0.0  # of the open round's latest attempt
        self._bytes_in = 0
        self._outage = BrokerOutage(transport, config.broker_outage_timeout)
        self.publisher = Publisher(transport, self.topics, self._outage, config.max_chunk, signer)

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
    def start(self, stop: threading.Event | None = None) -> None:
        """Connect, restore the last checkpoint (or start a new run) and publish the model.

        A broker that cannot be reached yet is waited for as any outage is (up to
        ``broker_outage_timeout``), or until ``stop`` is set.
        """
        resumed = self.engine.restore() is not None
        if not resumed:
            # Checkpointed at once, so a restart during round 1 keeps the run id the boards joined.
            self.engine.save_checkpoint()
        if stop is not None:
            self._outage.stop = stop
        if not self._outage.send("connecting to the broker", self.transport.connect):
            return
        # Clear the retained announcement first: until this run announces its own round, a board
        # must not find a round of another run (or a closed one of this run) there.
        self.publisher.clear_round()
        self.transport.subscribe(self.topics.presences)
        self.transport.subscribe(self.topics.updates)
        count = self.publisher.model(self.model, self.model_sha256, self.manifest)
        log.info("published model %s (%d bytes, %d chunks)", self.model_sha256[:12], len(self.model), count)
        self.publisher.describe_signing()
        log.info("%s run %s", "resuming" if resumed else "starting", self.run_id)

    def run(self, stop: threading.Event | None = None) -> list[RoundMetrics]:
        """Run the remaining rounds; return the metrics of the rounds run now."""
        stop = stop or threading.Event()
        self._outage.stop = stop
        ran: list[RoundMetrics] = []
        if stop.is_set():  # e.g. stopped while start() waited for the broker
            return ran
        for number in range(self.completed_round + 1, self.config.rounds + 1):
            metrics = self.run_round(number, stop)
            if metrics is None:  # stopped
                break
            ran.append(metrics)
        else:
            self.publish_global()  # the model after the last round: boards keep it
        return ran

    def close(self) -> None:
        self.transport.close()

    def publish_global(self) -> None:
        """Publish the global frame the next round starts from (retained: late boards find it)."""
        self.publisher.global_frame(self.engine.global_frame)

    # -- one round ------------------------------------------------------------
    def run_round(self, number: int, stop: threading.Event) -> RoundMetrics | None:
        """Run round ``number`` (the one after the last completed); its metrics, or None if stopped."""
        if number != self.completed_round + 1:
            raise CoordinatorError(f"round {number} cannot run after round {self.completed_round}; run rounds in order")
        bytes_in, bytes_out = self._bytes_in, self.publisher.bytes_out
        open_ = self.engine.open_round()
        self._selected, self._deadline, self._reported = set(), 0.0, {}
        self.publish_global()
        attempt = 0
        while attempt < self.config.max_attempts:
            attempt += 1
            open_.metrics.attempts = attempt
            if not self._wait_for_clients(open_, stop):
                return None
            outages = self._outage.outages
            self._announce(open_, attempt)
            if not self._collect(open_, stop):
                return None
            if len(open_.accepted) >= self.strategy.min_fit:
                break
            if self._outage.outages != outages or not self.transport.connected:
                # The boards may have missed the announcement, or their updates the coordinator: not their fault.
                log.warning("round %d: the broker was away during attempt %d, which does not count; announcing "
                            "the round again", number, attempt)  # fmt: skip
                attempt -= 1
                continue
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
        return self.engine.finish_round(self._bytes_in - bytes_in, self.publisher.bytes_out - bytes_out)

    def _announce(self, open_: OpenRound, attempt: int) -> None:
        self._drain()  # select from the freshest presence state
        self.presences.settle()
        available = sorted(c for c in self._eligible() if c not in open_.accepted)
        chosen, round_config = self.strategy.configure_round(open_.number, available, self._rng)
        waiting = self._selected - open_.accepted  # selected by earlier attempts, no update yet
        self._deadline = self._clock() + self.config.round_timeout
        open_.metrics.client_lr = round_config.lr
        open_.codecs.add(round_config.codec)
        # "selected" asks for an update: clients already accepted this round are not asked again,
        # while a restarted coordinator asks everyone (clients resend what it lost).
        announcement = RoundAnnouncement(
            open_.number,
            tuple(sorted(waiting | set(chosen))),
            self._deadline,
            self.model_sha256,
            round_config.epochs,
            round_config.lr,
            round_config.mu,
            round_config.codec,
            self.run_id,
        )
        asked = len(announcement.selected)
        announcement = within_limit(announcement, self.publisher.announcement_limit, self._rng)
        open_.metrics.clients_unannounced += asked - len(announcement.selected)
        self._selected |= set(announcement.selected)
        self._reported |= {c: self.online[c] for c in announcement.selected if c in self.online}
        open_.metrics.clients_selected = len(self._selected)
        self.publisher.announce(announcement.to_bytes())
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
        if self.publisher.republish():
            self._forget_silent_clients()
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

    def _forget_silent_clients(self) -> None:
        """After a reconnection, clients count as online again once they (or the retained presence) say so."""
        gone = self.presences.forget_before(self.transport.reconnections)
        if gone:
            log.info(
                "reconnected: %d client(s) offline until their presence arrives again (a board that died while "
                "the broker was away left no Last Will): %s",
                len(gone),
                ", ".join(gone[:10]) + (" ..." if len(gone) > 10 else ""),
            )

    def _on_presence(self, client: str, message: Message) -> None:
        why = self.presences.update(client, message.payload, self.transport.reconnections)
        if why is not None and (open_ := self.engine.current) is not None:
            open_.metrics.ignore_presence(why)

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
            self.publisher.ack(client, self.engine.refuse(client, exc, frame))
            return
        # What it reports now if it is online, else what it reported when selected (its Last Will says nothing).
        reported = self.online.get(client, self._reported.get(client))
        ack = self.engine.accept(frame, client, selected=self._selected, reported_examples=reported)
        self.publisher.ack(client, ack)
        if ack.status == "accepted" and (open_ := self.engine.current) is not None:
            log.debug("round %d: update from %s accepted (%d/%d)", open_.number, client, len(open_.accepted),
                      len(self._selected))  # fmt: skip


def within_limit(announcement: RoundAnnouncement, limit: int, rng: np.random.Generator) -> RoundAnnouncement:
    """``announcement``, or if it is over ``limit`` bytes, asking only the clients that fit (logged).

    A deterministic subset: the clients in an order drawn from ``rng`` (only
    when the selection does not fit, so that runs that fit draw as before),
    then the longest prefix that fits. Clients asked in an earlier attempt
    have no precedence: silent ones would take every slot.
    """
    if len(announcement.to_bytes()) <= limit:
        return announcement
    # Announcing the whole selection in several messages is issue 13's; until then the round asks fewer.
    fitted = fit_announcement(announcement, [str(c) for c in rng.permutation(list(announcement.selected))], limit)
    log.warning(
        "round %d: %d clients selected, but an announcement naming them all would exceed the %d-byte payload "
        "limit; asking %d of them, %d left out (a smaller --fraction-fit or shorter client ids avoid this)",
        announcement.round,
        len(announcement.selected),
        limit,
        len(fitted.selected),
        len(announcement.selected) - len(fitted.selected),
    )
    return fitted


def fit_announcement(announcement: RoundAnnouncement, order: Sequence[str], limit: int) -> RoundAnnouncement:
    """``announcement`` asking the longest prefix of ``order`` (sorted) whose encoding is at most ``limit`` bytes."""
    budget = limit - len(dataclasses.replace(announcement, selected=()).to_bytes())
    count = 0
    for client in order:  # a client id needs no JSON escapes: its quotes and a comma (none before the first)
        budget -= len(client) + 2 + (count > 0)
        if budget < 0:
            break
        count += 1
    fitted = dataclasses.replace(announcement, selected=tuple(sorted(order[:count])))
    while count and len(fitted.to_bytes()) > limit:  # never in practice: the arithmetic above is exact
        count -= 1
        fitted = dataclasses.replace(announcement, selected=tuple(sorted(order[:count])))
    return fitted
