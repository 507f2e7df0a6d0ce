"""Virtual clients for the simulator: one round's work for one client, and the processes that run it.

A :class:`ClientJob` carries everything a client needs (the global frame
exactly as a board downloads it, its data, the round's
:class:`~coordinator.strategies.base.RoundConfig`, its seed and
error-feedback residuals); :func:`run_client_job` trains and encodes the
update with the devices' own code (:func:`edge_client.training.train_local`,
:func:`edge_client.training.encode_update`). :class:`ClientPool` runs jobs in
worker processes, or in this one.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.errors import CoordinatorError
from coordinator.strategies import RoundConfig
from edge_client.error_feedback import ErrorFeedback
from edge_client.errors import ProtocolError
from edge_client.frames import decode_frame
from edge_client.reasons import DIVERGED
from edge_client.runtime import TrainableModel
from edge_client.training import TrainingDiverged, encode_update, train_local, uses_error_feedback


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
        return ClientOutcome(job.client_id, None, job.residuals, DIVERGED)
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
