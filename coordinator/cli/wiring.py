"""Wiring for the command lines: build a coordinator or a strategy from the
settings and run it with a progress bar, and the set-up and report that the
local runs (``litefed-emulate`` and ``litefed-simulate``) share. Kept apart
from the commands' modules so that ``--help`` stays light."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from coordinator.builtin_models import builtin_model
from coordinator.cli.settings import (
    BrokerSettings,
    CoordinatorSettings,
    EvaluationSettings,
    LocalSettings,
    RunSettings,
    StrategySettings,
)
from coordinator.datasets import load_test_set, load_training_data
from coordinator.errors import CoordinatorError
from coordinator.evaluation import ServerEvaluator
from coordinator.metrics import RoundMetrics, read_jsonl
from coordinator.plots import plot_rounds
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.strategies import RoundConfig, Strategy
from edge_client.manifest import Manifest, load_manifest, manifest_path_for
from edge_client.signing import SigningKey
from edge_client.transport import Transport

log = logging.getLogger(__name__)


def build_strategy(run: RunSettings) -> Strategy:
    """The strategy (with its evaluator, round config and DP) that ``run`` describes."""
    model_path = model_of(run)
    manifest = load_manifest(manifest_path_for(model_path))
    lr = run.training.lr if run.training.lr is not None else float(manifest.optimizer["learning_rate"])
    round_config = RoundConfig(epochs=run.training.epochs, lr=lr, mu=run.strategy.mu or 0.0, codec=run.training.codec)
    strategy = make_strategy(run.strategy, round_config, _evaluator(run.evaluation, model_path, manifest))
    dp = run.privacy
    if dp is not None:
        strategy = dp.wrap(strategy)
        log.info("differential privacy: clip %g, noise multiplier %g, delta %g", dp.clip, dp.noise, dp.delta)
    return strategy


def make_strategy(settings: StrategySettings, round_config: RoundConfig, evaluate) -> Strategy:
    """The strategy named by ``--strategy``: its class's defaults, overridden by the options given."""
    return settings.build(round_config, evaluate)


def _evaluator(settings: EvaluationSettings, model_path: Path, manifest: Manifest) -> ServerEvaluator | None:
    if not settings.test_data:
        log.warning(
            "no held-out set: the global model is not evaluated and metrics.jsonl has no test accuracy; "
            "pass --test-data (mnist-small, mnist or an .npz), or give --data an .npz with x_test/y_test"
        )
        return None
    x, y = load_test_set(settings.test_data, manifest)
    log.info("evaluating on %d held-out examples from %s", len(x), settings.test_data)
    return ServerEvaluator(model_path.read_bytes(), manifest, x, y, num_threads=settings.threads)


def model_of(run: RunSettings) -> Path:
    """The run's model; a local run's is filled in by :func:`prepare_local_federation`."""
    if run.model is None:
        raise CoordinatorError("no model: pass --model, or prepare the local federation first")
    return Path(run.model)


def build_coordinator(
    settings: CoordinatorSettings, make_transport: Callable[[BrokerSettings], Transport]
) -> Coordinator:
    """A coordinator configured from ``litefed-coordinator`` settings; the transport is made last."""
    run, service = settings.run, settings.service
    strategy = build_strategy(run)
    config = CoordinatorConfig(
        model_path=model_of(run),
        rounds=run.rounds,
        round_timeout=service.round_timeout,
        federation=service.federation,
        topic_prefix=service.topic_prefix,
        checkpoint_dir=run.out / "checkpoints",
        metrics_path=run.out / "metrics.jsonl",
        seed=run.seed,
        max_attempts=service.max_attempts,
        wait_for_clients=service.wait_for_clients,
        max_clients=service.bounds.max_clients,
        presence_rate=service.bounds.presence_rate,
        allowed_clients=service.bounds.allowed_clients,
        max_examples=service.bounds.max_examples,
        max_update_norm=service.bounds.max_update_norm,
        broker_outage_timeout=service.broker_outage_timeout,
    )
    signer = None if service.signing_key is None else SigningKey.load(service.signing_key)
    return Coordinator(config, make_transport(settings.broker), strategy, signer=signer)


def describe(metrics: RoundMetrics) -> str:
    parts = [f"round {metrics.round}", f"{metrics.clients_answered}/{metrics.clients_selected} clients"]
    if metrics.test_accuracy is not None:
        parts.append(f"test acc {metrics.test_accuracy:.4f} loss {metrics.test_loss:.4f}")
    if metrics.train_loss is not None:
        parts.append(f"train loss {metrics.train_loss:.4f}")
    if metrics.clients_rejected:
        parts.append(f"rejected {metrics.rejected_reasons}")
    if metrics.dp_epsilon is not None:
        parts.append(f"epsilon {metrics.dp_epsilon:.3g}")
    return ", ".join(parts) + f" ({metrics.round_seconds:.1f} s)"


@contextlib.contextmanager
def round_progress(total: int, done: int, enabled: bool = True) -> Iterator[Callable[[RoundMetrics], None]]:
    """A progress bar of rounds; yields the ``on_round`` callback that logs and advances it."""
    with logging_redirect_tqdm(), tqdm(total=total, initial=done, unit="round", disable=not enabled) as bar:

        def on_round(metrics: RoundMetrics) -> None:
            log.info(describe(metrics))
            if metrics.test_accuracy is not None:
                bar.set_postfix(acc=f"{metrics.test_accuracy:.4f}", loss=f"{metrics.test_loss:.3f}")
            bar.update(1)

        yield on_round


def run_with_progress(coordinator: Coordinator, stop: threading.Event, progress: bool = True) -> list[RoundMetrics]:
    """Start, run every remaining round, close; one progress-bar step per round."""
    coordinator.start(stop)
    try:
        with round_progress(coordinator.config.rounds, coordinator.completed_round, progress) as on_round:
            coordinator.on_round = on_round
            return coordinator.run(stop)
    finally:
        coordinator.close()


# -- local runs: litefed-emulate and litefed-simulate ------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LocalFederation:
    """A local run's data split among its clients, and its settings with the model and test set resolved."""

    run: RunSettings
    x: np.ndarray
    y: np.ndarray
    parts: list[np.ndarray]  # one index array per client

    def datasets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``client-000``, ``client-001``, ... -> that client's ``(x, y)``."""
        return {f"client-{i:03d}": (self.x[idx], self.y[idx]) for i, idx in enumerate(self.parts)}


def prepare_local_federation(run: RunSettings, local: LocalSettings) -> LocalFederation:
    """Load and split the data of a local run.

    Resolves the model (the built-in MNIST CNN when ``run`` has none), loads
    ``local.data`` (its test split becomes the held-out set unless one is
    given) and splits it with ``local.partition``.
    """
    model = run.model or builtin_model("mnist_cnn", local.batch_size)
    manifest = load_manifest(manifest_path_for(model))
    x, y, test = load_training_data(local.data, manifest)
    evaluation = dataclasses.replace(run.evaluation, test_data=run.evaluation.test_data or test)
    parts = local.partition(y, local.clients, np.random.default_rng(run.seed))
    log.info("%d examples split %s among %d clients (sizes %d..%d)", len(x), local.partition, local.clients,
             min(map(len, parts)), max(map(len, parts)))  # fmt: skip
    return LocalFederation(dataclasses.replace(run, model=Path(model), evaluation=evaluation), x, y, parts)


def report_local_run(history: list[RoundMetrics], started: float, out: Path, label: str, title: str) -> list[dict]:
    """Plot ``out/metrics.jsonl`` (every round, resumed runs included), print the summary; return the records."""
    records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    if records:
        plot_rounds({label: records}, out / "metrics.png", title)
    print(summarize(history, started, out))
    return records


def summarize(history: list[RoundMetrics], started: float, out: Path) -> str:
    if not history:
        return "no round completed"
    last = history[-1]
    accuracies = [m.test_accuracy for m in history if m.test_accuracy is not None]
    lines = [
        f"rounds completed: {last.round}",
        f"wall time: {time.monotonic() - started:.1f} s",
        f"bytes in/out: {sum(m.bytes_in for m in history):,} / {sum(m.bytes_out for m in history):,}",
        f"rejected updates: {sum(m.clients_rejected for m in history)}",
    ]
    if accuracies:
        lines.insert(1, f"final test accuracy: {accuracies[-1]:.4f} (best {max(accuracies):.4f})")
    lines.append(f"metrics: {out / 'metrics.jsonl'}, plot: {out / 'metrics.png'}")
    return "\n".join(lines)
