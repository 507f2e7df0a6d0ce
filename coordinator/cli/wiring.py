"""Wiring for the command lines: build a coordinator or a strategy from options
and run it with a progress bar, and the set-up and report that the local runs
(``litefed-emulate`` and ``litefed-simulate``) share. Kept apart from
:mod:`coordinator.cli.coordinate` so that ``--help`` stays light."""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from coordinator.builtin_models import builtin_model
from coordinator.cli.coordinate import fill_local_round_sizes, strategy_options
from coordinator.datasets import load_test_set, load_training_data
from coordinator.errors import CoordinatorError
from coordinator.evaluation import ServerEvaluator
from coordinator.metrics import RoundMetrics, read_jsonl
from coordinator.plots import plot_rounds
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.strategies import STRATEGIES, RoundConfig, Strategy
from coordinator.strategies.dp import DifferentialPrivacy
from edge_client.manifest import load_manifest, manifest_path_for
from edge_client.transport import Transport

log = logging.getLogger(__name__)


def build_strategy(
    args: argparse.Namespace, model_path: Path, dp_seed: int | None = None, eval_threads: int | None = None
) -> Strategy:
    """The strategy (with its evaluator and round config) that the options describe."""
    manifest = load_manifest(manifest_path_for(model_path))
    lr = args.lr if args.lr is not None else float(manifest.optimizer["learning_rate"])
    evaluate = None
    if args.test_data:
        x, y = load_test_set(args.test_data, manifest)
        evaluate = ServerEvaluator(model_path.read_bytes(), manifest, x, y, num_threads=eval_threads)
        log.info("evaluating on %d held-out examples from %s", len(x), args.test_data)
    else:
        log.warning(
            "no held-out set: the global model is not evaluated and metrics.jsonl has no test accuracy; "
            "pass --test-data (mnist-small, mnist or an .npz), or give --data an .npz with x_test/y_test"
        )
    round_config = RoundConfig(epochs=args.epochs, lr=lr, mu=args.mu or 0.0, codec=args.codec)
    strategy = make_strategy(args, round_config, evaluate)
    if args.dp_clip is not None:
        strategy = DifferentialPrivacy(strategy, args.dp_clip, args.dp_noise, args.dp_delta, seed=dp_seed)
        log.info("differential privacy: clip %g, noise multiplier %g, delta %g", args.dp_clip, args.dp_noise,
                 args.dp_delta)  # fmt: skip
    return strategy


def build_coordinator(args: argparse.Namespace, make_transport: Callable[[str, str], Transport]) -> Coordinator:
    """A coordinator configured from ``litefed-coordinator`` options."""
    model_path = Path(args.model)
    strategy = build_strategy(args, model_path)  # DP noise from OS entropy: never seeded in a deployment
    out = Path(args.out)
    config = CoordinatorConfig(
        model_path=model_path,
        rounds=args.rounds,
        round_timeout=args.round_timeout,
        federation=args.federation,
        topic_prefix=args.topic_prefix,
        checkpoint_dir=out / "checkpoints",
        metrics_path=out / "metrics.jsonl",
        seed=args.seed,
        max_attempts=args.max_attempts,
        wait_for_clients=args.wait_for_clients,
    )
    return Coordinator(config, make_transport(args.broker, f"coordinator-{args.federation}"), strategy)


def make_strategy(args: argparse.Namespace, round_config: RoundConfig, evaluate) -> Strategy:
    """The strategy named by ``--strategy``: its class's defaults, overridden by the options given."""
    cls = STRATEGIES.get(args.strategy)
    if cls is None:
        raise CoordinatorError(f"unknown strategy {args.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return cls(round_config=round_config, evaluate_fn=evaluate, **strategy_options(args))


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
    coordinator.start()
    try:
        with round_progress(coordinator.config.rounds, coordinator.completed_round, progress) as on_round:
            coordinator.on_round = on_round
            return coordinator.run(stop)
    finally:
        coordinator.close()


# -- local runs: litefed-emulate and litefed-simulate ------------------------------------


def prepare_local_federation(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(x, y, parts)`` from the local-run options, one index array per client.

    Resolves ``--model`` (the built-in MNIST CNN by default), loads ``--data``
    (and its test split as the default ``--test-data``), splits it with
    ``--partition`` and fills in ``--min-available`` / ``--min-fit`` from
    ``--clients``.
    """
    args.model = args.model or builtin_model("mnist_cnn", args.batch_size)
    manifest = load_manifest(manifest_path_for(args.model))
    x, y, test = load_training_data(args.data, manifest)
    args.test_data = args.test_data or test
    parts = args.partition(y, args.clients, np.random.default_rng(args.seed))
    log.info("%d examples split %s among %d clients (sizes %d..%d)", len(x), args.partition, args.clients,
             min(map(len, parts)), max(map(len, parts)))  # fmt: skip
    fill_local_round_sizes(args)
    return x, y, parts


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
