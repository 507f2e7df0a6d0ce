"""In-process simulation: many virtual clients, no broker, the devices' own code.

Every virtual client trains with :func:`edge_client.training.train_local` on
the converted ``.tflite`` and encodes its update with
:func:`edge_client.training.encode_update`, exactly as a board does; the
server side decodes and validates the frame and hands it to the same
:class:`~coordinator.strategies.base.Strategy` object the MQTT coordinator uses.
Only the transport is missing, so the byte counts are frame bytes (the MQTT
chunk headers, 33 bytes per 96 KiB chunk, are not counted).

Two ways in:

- :class:`FederatedProcess`, the iterative-process shape TensorFlow Federated
  users know::

      process = build_fedavg_process("mnist_cnn.tflite", client_lr=0.02, server_lr=1.0)
      state = process.initialize()
      for _ in range(10):
          state, metrics = process.next(state, client_datasets)  # list of (x, y)

- :class:`Simulation`, what ``litefed-simulate`` runs: the strategy samples
  clients from a partitioned dataset each round; metrics go to JSON Lines,
  checkpoints make a run resumable.

Clients run in ``workers`` processes (0: in this one). Results depend only
on the seed, never on the number of workers: each client's shuffling comes
from ``SeedSequence(seed, spawn_key=(round, client index))`` and updates are
aggregated in client-id order.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.errors import AggregationError, CoordinatorError
from coordinator.metrics import RoundMetrics, append_jsonl
from coordinator.strategies import (
    Aggregation,
    ClientUpdate,
    FedAvg,
    RoundConfig,
    Strategy,
)
from coordinator.strategies.aggregate import finish_or_keep
from edge_client.error_feedback import ErrorFeedback
from edge_client.errors import ProtocolError, WeightsError
from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
from edge_client.manifest import load_manifest, manifest_path_for
from edge_client.messages import new_run_id
from edge_client.runtime import TrainableModel
from edge_client.state import StateStore
from edge_client.training import TrainingDiverged, encode_update, train_local, uses_error_feedback
from edge_client.weights import Weights

log = logging.getLogger(__name__)

Dataset = tuple[np.ndarray, np.ndarray]
_SELECTION_STREAM = 1 << 30  # spawn-key slot of the per-round client sampling, apart from client indices


# -- the client side (runs in worker processes) -----------------------------------------


@dataclass(frozen=True)
class ClientJob:
    """One virtual client's work for one round (picklable: it crosses into a worker)."""

    client_id: str
    round: int
    global_frame: bytes  # the global weights exactly as a board downloads them
    x: np.ndarray
    y: np.ndarray
    config: RoundConfig
    seed: np.random.SeedSequence
    residuals: dict[str, np.ndarray] | None = None  # error-feedback state of this client


@dataclass(frozen=True)
class ClientOutcome:
    client_id: str
    payload: bytes | None  # the encoded update frame; None when nothing was sent
    residuals: dict[str, np.ndarray] | None = None
    error: str | None = None  # why nothing was sent


def run_client_job(model: TrainableModel, job: ClientJob) -> ClientOutcome:
    """Train, encode and return one client's update, as :class:`~edge_client.client.EdgeClient` does."""
    start = decode_frame(job.global_frame)
    feedback = None
    if uses_error_feedback(job.config.codec):
        feedback = ErrorFeedback()
        feedback.load_state_dict(job.residuals or {})
    try:
        training = train_local(
            model,
            start.tensors,
            job.x,
            job.y,
            epochs=job.config.epochs,
            lr=job.config.lr,
            mu=job.config.mu,
            rng=np.random.default_rng(job.seed),
        )
        assert training is not None  # nothing asks it to stop early
        payload = encode_update(
            training,
            round=job.round,
            run=start.run,  # echoed from the global frame, as a board does
            model_sha256=start.model_sha256,
            client_id=job.client_id,
            codec=job.config.codec,
            feedback=feedback,
        )
    except TrainingDiverged:
        return ClientOutcome(job.client_id, None, job.residuals, "diverged")
    except ProtocolError as exc:
        return ClientOutcome(job.client_id, None, job.residuals, exc.reason)
    return ClientOutcome(job.client_id, payload, feedback.state_dict() if feedback else None)


_worker_model: TrainableModel | None = None


def _init_worker(model_path: str, num_threads: int) -> None:
    global _worker_model
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    _worker_model = TrainableModel.load(model_path, num_threads=num_threads)


def _run_in_worker(job: ClientJob) -> ClientOutcome:
    assert _worker_model is not None
    return run_client_job(_worker_model, job)


class ClientPool:
    """Runs :class:`ClientJob` s in ``workers`` processes, or in this process when 0."""

    def __init__(self, model_path: Path, workers: int = 0, threads_per_worker: int = 1):
        if workers < 0:
            raise CoordinatorError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self._local: TrainableModel | None = None
        self._executor: ProcessPoolExecutor | None = None
        if workers == 0:
            self._local = TrainableModel.load(model_path, num_threads=threads_per_worker)
        else:
            # spawn, not fork: LiteRT's thread pools do not survive a fork.
            self._executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(str(model_path), threads_per_worker),
            )

    def run(self, jobs: Sequence[ClientJob]) -> list[ClientOutcome]:
        """Outcomes in job order."""
        if self._executor is None:
            assert self._local is not None
            return [run_client_job(self._local, job) for job in jobs]
        try:
            return list(self._executor.map(_run_in_worker, jobs))
        except BrokenProcessPool as exc:
            raise CoordinatorError(
                f"a client worker process died ({exc}); run again to resume from the last checkpoint, "
                "or with --workers 0 to see the failure in this process"
            ) from exc

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


# -- the iterative process --------------------------------------------------------------


@dataclass(frozen=True)
class ServerState:
    """The global model after ``round`` rounds, and the strategy's state (server optimiser moments)."""

    round: int
    weights: Weights
    strategy_state: Mapping[str, np.ndarray] = field(default_factory=dict)


class FederatedProcess:
    """``initialize()`` / ``next(state, client_datasets)`` over a converted model and a strategy.

    :meth:`next` trains every dataset it is given (the caller samples, as in
    TensorFlow Federated) with the strategy's :class:`RoundConfig`, or the one
    passed. The strategy's state is loaded from ``state`` first and the new
    one returned in the new state, so with float32 updates ``next`` is a
    function of its inputs. Lossy codecs add client state, the clients'
    error-feedback residuals: they live in this object, or under
    ``client_state_dir/<client id>/`` when given, and advance with every call.
    ``run_id`` is the run the frames carry (default: a new random one), as an
    MQTT coordinator's; it changes no number, only frame headers.
    """

    def __init__(
        self,
        model_path: str | Path,
        strategy: Strategy,
        *,
        workers: int = 0,
        threads_per_worker: int = 1,
        seed: int = 0,
        client_state_dir: Path | None = None,
        run_id: str | None = None,
    ):
        self.model_path = Path(model_path)
        self.run_id = run_id or new_run_id()
        self.manifest = load_manifest(manifest_path_for(self.model_path))
        self.model_sha256 = self.manifest.model_sha256
        self.strategy, self.seed = strategy, seed
        self._client_state_dir = client_state_dir
        self._residuals: dict[str, dict[str, np.ndarray]] = {}
        self._pool = ClientPool(self.model_path, workers, threads_per_worker)

    def __enter__(self) -> FederatedProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    def initialize(self) -> ServerState:
        """Round 0: the converted model's initial weights, a fresh strategy state."""
        weights = TrainableModel.load(self.model_path).get_weights()
        return ServerState(0, weights, _state_of(self.strategy))

    def next(
        self,
        state: ServerState,
        client_datasets: Mapping[str, Dataset] | Sequence[Dataset],
        config: RoundConfig | None = None,
    ) -> tuple[ServerState, RoundMetrics]:
        """One round: every client trains from ``state``; return the new state and the round's metrics."""
        started = time.perf_counter()
        datasets = _named(client_datasets)
        if not datasets:
            raise CoordinatorError("next() needs at least one client dataset")
        number = state.round + 1
        config = config or self.strategy.config_for_round(number)
        self.strategy.load_state_dict(dict(state.strategy_state))
        jobs = self.client_jobs(state, datasets, config)
        metrics = RoundMetrics(round=number, clients_selected=len(jobs), client_lr=config.lr)
        metrics.bytes_out = sum(len(job.global_frame) for job in jobs)  # what the selected devices download
        outcomes = self._pool.run(jobs)
        t0 = time.perf_counter()
        aggregation = self.strategy.begin_aggregation(number, state.weights)
        for outcome in outcomes:  # client-id order: the sums do not depend on who finished first
            self._accept(outcome, number, aggregation, metrics)
        if aggregation.count == 0:
            raise CoordinatorError(
                f"round {number}: no client sent a usable update ({metrics.rejected_reasons}); "
                "lower the client learning rate if training diverged"
            )
        weights, metrics.aggregation_error = finish_or_keep(aggregation, state.weights, number)
        metrics.aggregate_seconds = time.perf_counter() - t0
        metrics.dp_epsilon = self.strategy.privacy_spent()
        t0 = time.perf_counter()
        scores = self.strategy.evaluate(number, weights) or {}
        metrics.evaluate_seconds = time.perf_counter() - t0
        metrics.test_loss, metrics.test_accuracy = scores.get("loss"), scores.get("accuracy")
        metrics.round_seconds = time.perf_counter() - started
        return ServerState(number, weights, _state_of(self.strategy)), metrics

    def client_jobs(self, state: ServerState, datasets: Mapping[str, Dataset], config: RoundConfig) -> list[ClientJob]:
        """The jobs of the round after ``state``, in client-id order, each with its seed and residuals."""
        number = state.round + 1
        global_frame = encode_frame(Frame("global", number, self.model_sha256, state.weights, run=self.run_id))
        jobs = []
        for index, (client_id, (x, y)) in enumerate(sorted(datasets.items())):
            seed = np.random.SeedSequence(self.seed, spawn_key=(number, _client_index(client_id, index)))
            residuals = self._load_residuals(client_id) if uses_error_feedback(config.codec) else None
            jobs.append(ClientJob(client_id, number, global_frame, x, y, config, seed, residuals))
        return jobs

    def _accept(self, outcome: ClientOutcome, number: int, aggregation: Aggregation, metrics: RoundMetrics) -> None:
        """Validate one update as the coordinator does and fold it in; reject with a reason otherwise."""
        if outcome.residuals is not None:
            self._save_residuals(outcome.client_id, outcome.residuals)
        if outcome.payload is None:
            log.warning("round %d: %s sent nothing (%s)", number, outcome.client_id, outcome.error)
            metrics.reject(outcome.error or "no_update")
            return
        metrics.bytes_in += len(outcome.payload)
        try:
            frame = decode_frame(outcome.payload)
            validate_frame(
                frame, self.manifest.weights, self.model_sha256, "update", current_round=number, run=self.run_id
            )
            aggregation.add(ClientUpdate(outcome.client_id, frame.tensors, frame.num_examples, dict(frame.metrics)))
        except (ProtocolError, AggregationError) as exc:
            log.warning("round %d: update from %s rejected: %s", number, outcome.client_id, exc)
            metrics.reject(getattr(exc, "reason", "bad_tensors"))
            return
        metrics.record_update(frame.num_examples, frame.metrics)

    def _load_residuals(self, client_id: str) -> dict[str, np.ndarray] | None:
        if self._client_state_dir is None:
            return self._residuals.get(client_id)
        return StateStore(self._client_state_dir / client_id).load_residuals(self.model_sha256)

    def _save_residuals(self, client_id: str, residuals: dict[str, np.ndarray]) -> None:
        if self._client_state_dir is None:
            self._residuals[client_id] = residuals
        else:
            StateStore(self._client_state_dir / client_id).save_residuals(self.model_sha256, residuals)


def build_fedavg_process(
    model_path: str | Path,
    *,
    client_lr: float = 0.02,
    server_lr: float = 1.0,
    lr_decay: float = 1.0,
    epochs: int = 1,
    mu: float = 0.0,
    codec: str = "float32",
    evaluate_fn: Callable[[Weights], dict[str, float]] | None = None,
    workers: int = 0,
    seed: int = 0,
) -> FederatedProcess:
    """FedAvg as an iterative process: client SGD at ``client_lr``, server SGD at ``server_lr``.

    The client optimiser is the one converted into the model (its learning
    rate is an input of the ``train`` signature); ``client_lr=0.02,
    server_lr=1.0`` is the textbook FedAvg setting. Round ``t`` trains at
    ``client_lr * lr_decay**(t - 1)``.
    """
    strategy = FedAvg(
        round_config=RoundConfig(epochs=epochs, lr=client_lr, mu=mu, codec=codec),
        server_lr=server_lr,
        evaluate_fn=evaluate_fn,
        lr_decay=lr_decay,
    )
    return FederatedProcess(model_path, strategy, workers=workers, seed=seed)


def _named(client_datasets: Mapping[str, Dataset] | Sequence[Dataset]) -> dict[str, Dataset]:
    if isinstance(client_datasets, Mapping):
        return dict(client_datasets)
    return {f"client-{i:03d}": data for i, data in enumerate(client_datasets)}


def _client_index(client_id: str, fallback: int) -> int:
    """The number in ``client-007`` (stable whichever clients a round samples), else the position."""
    tail = client_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


def _state_of(strategy: Strategy) -> dict[str, np.ndarray]:
    return strategy.state_dict()


# -- whole runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated federation: ``rounds`` rounds over the clients' datasets."""

    model_path: Path
    rounds: int = 10
    workers: int = 0
    threads_per_worker: int = 1
    seed: int = 0
    out: Path | None = None  # metrics.jsonl, checkpoints/ and clients/ (residuals); resumes from it
    target_accuracy: float | None = None  # stop after the first round at or above it

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise CoordinatorError(f"rounds must be >= 1, got {self.rounds}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise CoordinatorError(f"target accuracy must be in (0, 1], got {self.target_accuracy}")


class Simulation:
    """Runs :class:`SimulationConfig` with ``strategy`` over ``client_datasets``, resumably."""

    def __init__(
        self,
        config: SimulationConfig,
        strategy: Strategy,
        client_datasets: Mapping[str, Dataset],
        on_round: Callable[[RoundMetrics], None] | None = None,
    ):
        if len(client_datasets) < strategy.min_available:
            raise CoordinatorError(
                f"{len(client_datasets)} clients, but the strategy needs at least {strategy.min_available}"
            )
        self.config, self.strategy, self.on_round = config, strategy, on_round
        self.datasets = dict(client_datasets)
        self.history: list[RoundMetrics] = []
        out = config.out
        self.process = FederatedProcess(
            config.model_path,
            strategy,
            workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            seed=config.seed,
            client_state_dir=None if out is None else out / "clients",
        )
        self.state = self._restore() or self.process.initialize()

    @property
    def completed_round(self) -> int:
        return self.state.round

    def run(self, stop: threading.Event | None = None) -> list[RoundMetrics]:
        """Run the remaining rounds (all of them, or until ``stop`` or the target accuracy)."""
        try:
            while self.state.round < self.config.rounds and not (stop is not None and stop.is_set()):
                metrics = self.run_round()
                target = self.config.target_accuracy
                if target is not None and (metrics.test_accuracy or 0.0) >= target:
                    log.info("reached test accuracy %.4f >= %.4f in round %d", metrics.test_accuracy, target,
                             metrics.round)  # fmt: skip
                    break
        finally:
            self.process.close()
        return self.history

    def run_round(self) -> RoundMetrics:
        number = self.state.round + 1
        rng = np.random.default_rng(np.random.SeedSequence(self.config.seed, spawn_key=(number, _SELECTION_STREAM)))
        selected, round_config = self.strategy.configure_round(number, sorted(self.datasets), rng)
        self.state, metrics = self.process.next(self.state, {c: self.datasets[c] for c in selected}, round_config)
        out = self.config.out
        if out is not None:
            save_checkpoint(
                out / "checkpoints",
                Checkpoint(
                    number,
                    self.process.model_sha256,
                    self.state.weights,
                    dict(self.state.strategy_state),
                    self.process.run_id,
                ),
            )
            append_jsonl(out / "metrics.jsonl", metrics.to_json())
        self.history.append(metrics)
        if self.on_round is not None:
            self.on_round(metrics)
        return metrics

    def _restore(self) -> ServerState | None:
        if self.config.out is None:
            return None
        checkpoint = load_checkpoint(self.config.out / "checkpoints", self.process.model_sha256)
        if checkpoint is None:
            return None
        try:
            if checkpoint.strategy_state:
                self.strategy.load_state_dict(checkpoint.strategy_state)  # validates it
        except (CoordinatorError, WeightsError, ValueError) as exc:
            raise CoordinatorError(
                f"cannot resume from {self.config.out / 'checkpoints'}: {exc}; use another --out"
            ) from exc
        if checkpoint.run_id:
            self.process.run_id = checkpoint.run_id  # the same run, as a resumed MQTT coordinator
        log.info("resuming after round %d from %s", checkpoint.completed_round, self.config.out)
        return ServerState(checkpoint.completed_round, checkpoint.weights, checkpoint.strategy_state)
