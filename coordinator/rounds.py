"""One round of federated learning, the same for the MQTT coordinator and the simulator.

:class:`RoundEngine` owns the server side of a run: its
:class:`~coordinator.checkpoint.ServerState` (the global weights after N
completed rounds, the strategy's state, the run id), the round in progress,
and the steps both front ends share:

- :meth:`RoundEngine.open_round` starts the aggregation of the round after
  the state; :attr:`RoundEngine.global_frame` is that round's ``global``
  frame, encoded once, as the boards download it (the coordinator publishes
  it, the simulator hands it to its virtual clients);
- :meth:`RoundEngine.accept` takes one update (its bytes or the decoded
  frame), validates it, folds it into the aggregation and counts it in the
  round's metrics, or counts why it was refused; it returns the
  :class:`~edge_client.messages.Ack` the sender is owed;
- :meth:`RoundEngine.finish_round` ends the round: aggregate, privacy,
  evaluation, checkpoint, metrics line, history, ``on_round``;
- :meth:`RoundEngine.restore` resumes from the checkpoint.

What only one front end has stays there: presence, selection, announcements,
retries, chunks and acks over MQTT in :mod:`coordinator.service`; client
jobs, worker processes and error-feedback residuals in
:mod:`coordinator.simulator`. The simulator's promise (the same strategy
and frames give the same result as over MQTT) rests on this module.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.checkpoint import ServerState, load_checkpoint, save_checkpoint
from coordinator.errors import AggregationError, CoordinatorError
from coordinator.metrics import RoundMetrics, append_jsonl
from coordinator.strategies import Aggregation, ClientUpdate, Strategy
from coordinator.strategies.aggregate import finish_or_keep
from coordinator.strategies.dp import update_norm
from edge_client.errors import ProtocolError, WeightsError
from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
from edge_client.messages import Ack, is_run_id
from edge_client.reasons import DUPLICATE, NORM_TOO_LARGE, NOT_SELECTED, STALE_ROUND, TOO_MANY_EXAMPLES, WRONG_CODEC
from edge_client.weights import TensorSpec

log = logging.getLogger(__name__)

# Far above any board's data set, far below what could overflow a weighted sum: a 10**20 claim never weighs in.
DEFAULT_MAX_EXAMPLES = 10**7


@dataclass
class OpenRound:
    """The round in progress: its number, aggregation and metrics, and whose updates it took.

    ``codecs`` are the codecs its announcements asked for (the MQTT
    coordinator adds each one it announces); when there are any, an update
    in another codec is refused (``wrong_codec``).
    """

    number: int
    aggregation: Aggregation
    metrics: RoundMetrics
    started: float  # time.perf_counter() when it opened: round_seconds counts from here
    accepted: set[str] = field(default_factory=set)
    codecs: set[str] = field(default_factory=set)


class RoundEngine:
    """The rounds of one run of ``strategy`` over the model ``model_sha256`` (tensors ``specs``).

    ``state`` is where the run stands (it must name its run). With a
    ``checkpoint_dir`` every finished round is checkpointed there and
    :meth:`restore` resumes from it; with a ``metrics_path`` every round
    appends its metrics line there. ``on_round`` is called with each
    finished round's metrics, and may be set at any time. An update claiming
    more than ``max_examples`` examples is refused (``too_many_examples``), and
    one whose L2 norm exceeds ``max_update_norm`` (None: no bound) too
    (``norm_too_large``).
    """

    def __init__(
        self,
        strategy: Strategy,
        specs: Sequence[TensorSpec],
        model_sha256: str,
        state: ServerState,
        *,
        checkpoint_dir: Path | None = None,
        metrics_path: Path | None = None,
        on_round: Callable[[RoundMetrics], None] | None = None,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        max_update_norm: float | None = None,
    ):
        self.strategy, self.specs, self.model_sha256 = strategy, tuple(specs), model_sha256
        self.max_examples, self.max_update_norm = max_examples, max_update_norm
        self.checkpoint_dir, self.metrics_path, self.on_round = checkpoint_dir, metrics_path, on_round
        self.history: list[RoundMetrics] = []
        self.current: OpenRound | None = None
        self._state = _named(state)
        self._frame: tuple[ServerState, bytes] | None = None  # the last global frame encoded, and its state

    @property
    def state(self) -> ServerState:
        """Where the run stands: the state after the last completed round."""
        return self._state

    @property
    def run_id(self) -> str:
        return self._state.run_id

    @property
    def completed_round(self) -> int:
        return self._state.round

    # -- state ------------------------------------------------------------------------
    def reset(self, state: ServerState) -> None:
        """Go on from ``state``: its weights and run, and its strategy state loaded into the strategy.

        Any open round is dropped. The strategy is loaded first, so a state it
        refuses (:class:`CoordinatorError`) leaves the engine as it was.
        """
        checked = _named(state)
        self.strategy.load_state_dict(dict(checked.strategy_state))
        self._state, self.current = checked, None

    def restore(self) -> ServerState | None:
        """Resume from the checkpoint in ``checkpoint_dir`` for this model; the state resumed, or None.

        The strategy gets its saved state back; one it refuses makes a one-line
        error (the directory holds a run of another strategy). A checkpoint
        written before runs had ids (protocol v1) goes on under this engine's
        run id, checkpointed at once so that it is kept from now on.
        """
        if self.checkpoint_dir is None:
            return None
        state = load_checkpoint(self.checkpoint_dir, self.model_sha256)
        if state is None:
            return None
        try:
            if state.strategy_state:
                self.strategy.load_state_dict(dict(state.strategy_state))  # validates it
        except (CoordinatorError, WeightsError, ValueError) as exc:
            raise CoordinatorError(f"cannot resume from {self.checkpoint_dir}: {exc}; use another --out") from exc
        without_run = not state.run_id
        self._state, self.current = dataclasses.replace(state, run_id=state.run_id or self.run_id), None
        if without_run:
            log.warning("the checkpoint in %s has no run id; continuing as run %s", self.checkpoint_dir, self.run_id)
            self.save_checkpoint()
        log.info("resuming after round %d from %s", self.completed_round, self.checkpoint_dir)
        return self._state

    def save_checkpoint(self) -> None:
        """Checkpoint the state in ``checkpoint_dir`` (nothing to do without one)."""
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.model_sha256, self._state)

    @property
    def global_frame(self) -> bytes:
        """The ``global`` frame of the round after the state (the open round, if any): what boards download."""
        return self.global_frame_of(self._state)

    def global_frame_of(self, state: ServerState) -> bytes:
        """The encoded ``global`` frame that starts the round after ``state``, encoded once per state."""
        if self._frame is None or self._frame[0] is not state:
            frame = Frame("global", state.round + 1, self.model_sha256, state.weights, run=_named(state).run_id)
            self._frame = (state, encode_frame(frame))
        return self._frame[1]

    # -- one round --------------------------------------------------------------------
    def open_round(self) -> OpenRound:
        """Open the round after the state: a fresh aggregation from the global weights, new metrics."""
        number, started = self._state.round + 1, time.perf_counter()
        aggregation = self.strategy.begin_aggregation(number, self._state.weights)
        self.current = OpenRound(number, aggregation, RoundMetrics(round=number), started)
        return self.current

    def accept(
        self,
        update: bytes | Frame,
        sender: str,
        selected: Container[str] | None = None,
        reported_examples: int | None = None,
    ) -> Ack:
        """Take ``sender``'s update into the open round; the ack it is owed.

        ``update`` is an update frame's bytes or the decoded frame. The checks,
        in this order: a round is open; :func:`~edge_client.frames.validate_frame`
        (kind, model, run, round, tensors); the codec is one the round
        announced (:attr:`OpenRound.codecs`); at most ``max_examples``
        examples; ``sender`` has no update accepted this round yet (else the
        ack says ``duplicate`` and nothing is counted); ``sender`` is among
        ``selected``, when given; at most ``reported_examples`` examples (what
        the sender said it trains on), when given; an L2 norm of at most
        ``max_update_norm``; the strategy's aggregation takes it. Then it
        counts in the round's metrics. A refusal goes through :meth:`refuse`.
        """
        frame: Frame | None = None  # for the refusal: None when the bytes do not decode
        try:
            frame = update if isinstance(update, Frame) else decode_frame(update)
            return self._fold_in(frame, sender, selected, reported_examples)
        except (ProtocolError, AggregationError) as exc:
            return self.refuse(sender, exc, frame)

    def _fold_in(
        self, frame: Frame, sender: str, selected: Container[str] | None, reported_examples: int | None
    ) -> Ack:
        open_ = self.current
        if open_ is None:
            raise ProtocolError(STALE_ROUND, f"no round is open (last completed: {self.completed_round})")
        validate_frame(frame, self.specs, self.model_sha256, "update", current_round=open_.number, run=self.run_id)
        if open_.codecs and frame.codec not in open_.codecs:
            raise ProtocolError(
                WRONG_CODEC, f"update in {frame.codec!r}, round {open_.number} asked for {sorted(open_.codecs)}"
            )
        if frame.num_examples > self.max_examples:
            raise ProtocolError(
                TOO_MANY_EXAMPLES, f"{frame.num_examples} examples is more than the limit of {self.max_examples}"
            )
        if sender in open_.accepted:
            return Ack(open_.number, DUPLICATE, run=self.run_id)
        if selected is not None and sender not in selected:
            raise ProtocolError(NOT_SELECTED, f"{sender} was not selected for round {open_.number}")
        if reported_examples is not None and frame.num_examples > reported_examples:
            raise ProtocolError(
                TOO_MANY_EXAMPLES,
                f"{frame.num_examples} examples, but {sender}'s presence reported {reported_examples}",
            )
        self._check_norm(frame)
        open_.aggregation.add(
            ClientUpdate(sender, frame.tensors, frame.num_examples, dict(frame.metrics), validated=True)
        )
        open_.accepted.add(sender)
        open_.metrics.record_update(frame.num_examples, frame.metrics)
        return Ack(open_.number, "accepted", run=self.run_id)

    def _check_norm(self, frame: Frame) -> None:
        """``norm_too_large`` if the update's L2 norm (all tensors as one vector) exceeds ``max_update_norm``."""
        if self.max_update_norm is None:
            return
        norm = update_norm(frame.tensors)  # float64: squares of large float32 values would overflow to inf
        if not norm <= self.max_update_norm:
            raise ProtocolError(NORM_TOO_LARGE, f"update norm {norm:.4g} exceeds the limit of {self.max_update_norm:g}")

    def refuse(self, sender: str, error: ProtocolError | AggregationError, frame: Frame | None = None) -> Ack:
        """Log and count (in the open round, if any) a refused update of ``sender``; the ack that says so.

        ``frame`` is the update when it decoded: the ack then names its round
        and run, so that the client knows which of its updates was refused,
        and a board of another run can tell the refusal is about its update.
        An update that did not decode gets this engine's round and run.
        """
        log.warning("update from %s rejected: %s", sender, error)
        open_ = self.current
        if open_ is not None:
            open_.metrics.reject(error.reason)
        if frame is not None:
            return Ack(frame.round, "rejected", error.reason, frame.run)
        number = open_.number if open_ is not None else self.completed_round
        return Ack(number, "rejected", error.reason, self.run_id)

    def finish_round(self, bytes_in: int, bytes_out: int) -> RoundMetrics:
        """End the open round, whose traffic was ``bytes_in`` / ``bytes_out``; its complete metrics.

        The steps, in this order, and why:

        1. the aggregate, timed (``aggregate_seconds``); a refused one keeps
           the global model and says why (``aggregation_error``);
        2. the privacy spent, after the aggregate: a private aggregation
           accounts its round when it finishes;
        3. the evaluation of the new model, timed (``evaluate_seconds``);
        4. the new state, with the strategy's state after the round, and its
           checkpoint, before anything reports the round: a metrics line or
           an ``on_round`` never tells of a round that a restart would run
           again (and write twice), and a callback that stops the run cannot
           lose the round;
        5. ``round_seconds``, from the opening of the round to the checkpoint,
           and the bytes;
        6. the metrics line, the history, ``on_round``.
        """
        open_ = self.current
        if open_ is None:
            raise CoordinatorError("no round is open; call open_round() first")
        metrics = open_.metrics
        t0 = time.perf_counter()
        weights, metrics.aggregation_error = finish_or_keep(open_.aggregation, self._state.weights, open_.number)
        metrics.aggregate_seconds = time.perf_counter() - t0
        metrics.dp_epsilon = self.strategy.privacy_spent()
        t0 = time.perf_counter()
        scores = self.strategy.evaluate(open_.number, weights) or {}
        metrics.evaluate_seconds = time.perf_counter() - t0
        metrics.test_loss, metrics.test_accuracy = scores.get("loss"), scores.get("accuracy")
        self._state = ServerState(open_.number, weights, self.strategy.state_dict(), self.run_id)
        self.current = None
        self.save_checkpoint()
        metrics.round_seconds = time.perf_counter() - open_.started
        metrics.bytes_in, metrics.bytes_out = bytes_in, bytes_out
        if self.metrics_path is not None:
            append_jsonl(self.metrics_path, metrics.to_json())
        self.history.append(metrics)
        if self.on_round is not None:
            self.on_round(metrics)
        return metrics


def _named(state: ServerState) -> ServerState:
    """``state``, checked to name its run: frames and checkpoints carry it."""
    if not is_run_id(state.run_id):
        raise CoordinatorError(
            f"server state of round {state.round} has run id {state.run_id!r}, not 16 lowercase hex digits; "
            "give it the run's id (edge_client.messages.new_run_id() for a new run)"
        )
    return state
