"""In-process simulation: many virtual clients, no broker, the devices' own code.

Every virtual client trains with :func:`edge_client.training.train_local` on
the converted ``.tflite`` and encodes its update with
:func:`edge_client.training.encode_update`, exactly as a board does
(:mod:`coordinator.client_pool`); the server side is the MQTT coordinator's
own :class:`~coordinator.rounds.RoundEngine`, which decodes and validates the
frame and hands it to the same :class:`~coordinator.strategies.base.Strategy`
object. Only the transport is missing, so the byte counts are frame bytes
(the MQTT chunk headers, 33 bytes per 96 KiB chunk, are not counted).

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
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from coordinator.checkpoint import ServerState
from coordinator.client_pool import ClientJob, ClientOutcome, ClientPool, run_client_job
from coordinator.errors import CoordinatorError
from coordinator.metrics import RoundMetrics
from coordinator.rounds import OpenRound, RoundEngine
from coordinator.strategies import FedAvg, RoundConfig, Strategy
from edge_client.manifest import load_manifest, manifest_path_for
from edge_client.messages import new_run_id
from edge_client.reasons import NO_UPDATE
from edge_client.runtime import TrainableModel
from edge_client.state import StateStore
from edge_client.training import uses_error_feedback
from edge_client.weights import Weights

__all__ = [
    "ClientJob",
    "ClientOutcome",
    "Dataset",
    "FederatedProcess",
    "ServerState",
    "Simulation",
    "SimulationConfig",
    "build_fedavg_process",
    "run_client_job",
]

log = logging.getLogger(__name__)

Dataset = tuple[np.ndarray, np.ndarray]
_SELECTION_STREAM = 1 << 30  # spawn-key slot of the per-round client sampling, apart from client indices


# -- the iterative process --------------------------------------------------------------


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
    MQTT coordinator's; it changes no number, only frame headers. It is the
    run of the states :meth:`initialize` makes, and of a state given without one.

    The server side of a round is :attr:`engine`, the
    :class:`~coordinator.rounds.RoundEngine` of the MQTT coordinator; with
    ``checkpoint_dir`` / ``metrics_path`` (what :class:`Simulation` gives)
    each round is checkpointed / appends its metrics line there, as the
    coordinator's rounds do.
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
        checkpoint_dir: Path | None = None,
        metrics_path: Path | None = None,
    ):
        self.model_path = Path(model_path)
        self.run_id = run_id or new_run_id()
        self.manifest = load_manifest(manifest_path_for(self.model_path))
        self.model_sha256 = self.manifest.model_sha256
        self.strategy, self.seed = strategy, seed
        self._client_state_dir = client_state_dir
        self._residuals: dict[str, dict[str, np.ndarray]] = {}
        self.engine = RoundEngine(
            strategy,
            self.manifest.weights,
            self.model_sha256,
            self.initialize(),
            checkpoint_dir=checkpoint_dir,
            metrics_path=metrics_path,
        )
        self._pool = ClientPool(self.model_path, workers, threads_per_worker)

    def __enter__(self) -> FederatedProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    def initialize(self) -> ServerState:
        """Round 0: the converted model's initial weights, a fresh strategy state.

        The strategy state is empty, which :meth:`next` loads as a reset: a
        strategy object that already ran rounds starts over too.
        """
        weights = TrainableModel.load(self.model_path).get_weights()
        return ServerState(0, weights, {}, self.run_id)

    def next(
        self,
        state: ServerState,
        client_datasets: Mapping[str, Dataset] | Sequence[Dataset],
        config: RoundConfig | None = None,
    ) -> tuple[ServerState, RoundMetrics]:
        """One round: every client trains from ``state``; return the new state and the round's metrics."""
        datasets = _named(client_datasets)
        if not datasets:
            raise CoordinatorError("next() needs at least one client dataset")
        state = self._with_run(state)
        config = config or self.strategy.config_for_round(state.round + 1)
        self.engine.reset(state)
        open_ = self.engine.open_round()
        jobs = self.client_jobs(state, datasets, config)
        open_.metrics.clients_selected, open_.metrics.client_lr = len(jobs), config.lr
        outcomes = self._pool.run(jobs)
        # In client-id order, whoever finished first: the sums do not depend on the scheduling.
        bytes_in = sum(self._hand_in(outcome, open_) for outcome in outcomes)
        if open_.aggregation.count == 0:
            raise CoordinatorError(
                f"round {open_.number}: no client sent a usable update ({open_.metrics.rejected_reasons}); "
                "lower the client learning rate if training diverged"
            )
        bytes_out = sum(len(job.global_frame) for job in jobs)  # what the selected devices download
        metrics = self.engine.finish_round(bytes_in, bytes_out)
        return self.engine.state, metrics

    def client_jobs(self, state: ServerState, datasets: Mapping[str, Dataset], config: RoundConfig) -> list[ClientJob]:
        """The jobs of the round after ``state``, in client-id order, each with its seed and residuals."""
        state = self._with_run(state)
        number = state.round + 1
        global_frame = self.engine.global_frame_of(state)
        jobs = []
        for index, (client_id, (x, y)) in enumerate(sorted(datasets.items())):
            seed = np.random.SeedSequence(self.seed, spawn_key=(number, _client_index(client_id, index)))
            residuals = self._load_residuals(client_id) if uses_error_feedback(config.codec) else None
            jobs.append(ClientJob(client_id, number, global_frame, x, y, config, seed, residuals))
        return jobs

    def _with_run(self, state: ServerState) -> ServerState:
        return state if state.run_id else replace(state, run_id=self.run_id)

    def _hand_in(self, outcome: ClientOutcome, open_: OpenRound) -> int:
        """Give one client's update to the engine, as the coordinator does; the bytes it sent."""
        if outcome.residuals is not None:
            self._save_residuals(outcome.client_id, outcome.residuals)
        if outcome.payload is None:
            log.warning("round %d: %s sent nothing (%s)", open_.number, outcome.client_id, outcome.error)
            open_.metrics.reject(outcome.error or NO_UPDATE)
            return 0
        self.engine.accept(outcome.payload, outcome.client_id)
        return len(outcome.payload)

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
        self.config, self.strategy = config, strategy
        self.datasets = dict(client_datasets)
        out = config.out
        self.process = FederatedProcess(
            config.model_path,
            strategy,
            workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            seed=config.seed,
            client_state_dir=None if out is None else out / "clients",
            checkpoint_dir=None if out is None else out / "checkpoints",
            metrics_path=None if out is None else out / "metrics.jsonl",
        )
        self.on_round = on_round
        try:
            self.process.engine.restore()
        except BaseException:
            self.process.close()  # its worker processes
            raise
        self.state = self.process.engine.state  # the checkpoint's, else round 0
        self.process.run_id = self.state.run_id  # resumed: the same run, as a resumed MQTT coordinator

    @property
    def completed_round(self) -> int:
        return self.state.round

    @property
    def history(self) -> list[RoundMetrics]:
        """The metrics of the rounds this simulation ran."""
        return self.process.engine.history

    @property
    def on_round(self) -> Callable[[RoundMetrics], None] | None:
        """Called with each finished round's metrics (may be set before :meth:`run`)."""
        return self.process.engine.on_round

    @on_round.setter
    def on_round(self, callback: Callable[[RoundMetrics], None] | None) -> None:
        self.process.engine.on_round = callback

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
        """Sample the round's clients and run it (checkpoint and metrics line included, with ``out``)."""
        number = self.state.round + 1
        rng = np.random.default_rng(np.random.SeedSequence(self.config.seed, spawn_key=(number, _SELECTION_STREAM)))
        selected, round_config = self.strategy.configure_round(number, sorted(self.datasets), rng)
        self.state, metrics = self.process.next(self.state, {c: self.datasets[c] for c in selected}, round_config)
        return metrics
