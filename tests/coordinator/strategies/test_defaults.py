"""Every strategy ``--strategy`` offers learns with its defaults (issue 9).

The same short non-IID job for all of them, built exactly as
``litefed-simulate`` builds it (its parser, option checks, data set-up and
strategy factory), run in this process: the McMahan MNIST CNN, client SGD at
0.05 (a job parameter, as in ``litefed-simulate --help``'s first example: the
converted 0.02 learns too little in 3 short rounds to tell strategies apart),
the first 2,000 images of the bundled MNIST subset split among 5 clients by
Dirichlet(0.5) with a fixed seed, 3 rounds of one local epoch, every client
every round, scored on 500 bundled test images.

Every strategy must clear THRESHOLD, far above chance (0.1) and well below
what each reached when measured (see the constants). The strategies that
aggregate by averaging must also stay within MARGIN of FedAvg on the same
run. The robust aggregators of :mod:`coordinator.strategies.robust` discard most of
each non-IID round by design (Krum applies a single client's update), so
three rounds leave them further behind; for them the threshold is the test.
A strategy added to ``STRATEGIES`` is covered automatically, since the names
come from the ``--strategy`` option itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.cli import simulate
from coordinator.datasets import load_bundled_mnist
from coordinator.strategies import STRATEGIES

pytestmark = pytest.mark.slow

TRAIN_EXAMPLES, TEST_EXAMPLES = 2000, 500
JOB = ["--clients", "5", "--partition", "dirichlet:0.5", "--rounds", "3", "--epochs", "1", "--lr", "0.05"]
JOB += ["--seed", "0", "--workers", "0", "--no-progress"]
THRESHOLD = 0.25  # measured: FedAvg-like 0.70-0.77, median/trimmed mean ~0.6, Krum 0.32; chance 0.1
MARGIN = 0.15  # averaging strategies: at most this below FedAvg's accuracy on the same run


def strategy_names() -> list[str]:
    """The choices of ``--strategy``: whatever the CLI offers is tested."""
    (action,) = [a for a in simulate.build_parser()._actions if a.dest == "strategy"]
    return list(action.choices)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    """``(train, test)`` .npz files: the first images of the bundled MNIST subset's splits."""
    data, directory = load_bundled_mnist(), tmp_path_factory.mktemp("defaults")
    np.savez(directory / "train.npz", x=data.x_train[:TRAIN_EXAMPLES], y=data.y_train[:TRAIN_EXAMPLES])
    np.savez(directory / "test.npz", x=data.x_test[:TEST_EXAMPLES], y=data.y_test[:TEST_EXAMPLES])
    return directory / "train.npz", directory / "test.npz"


@pytest.fixture(scope="module")
def final_accuracy(mnist_cnn, data_files) -> Callable[[str], float]:
    """``name -> test accuracy after the last round`` of the job, each strategy run once per module."""
    from coordinator.cli.settings import SimulateSettings
    from coordinator.cli.wiring import build_strategy, model_of, prepare_local_federation
    from coordinator.simulator import Simulation, SimulationConfig

    done: dict[str, float] = {}

    def run(name: str) -> float:
        if name not in done:
            parser = simulate.build_parser()
            train, test = data_files
            argv = ["--model", str(mnist_cnn.model_path), "--data", str(train), "--test-data", str(test), *JOB]
            argv += ["--strategy", name]
            settings = SimulateSettings.from_args(parser.parse_args(argv))  # the option checks included
            federation = prepare_local_federation(settings.run, settings.local)
            strategy = build_strategy(federation.run)
            run = federation.run
            config = SimulationConfig(model_path=model_of(run), rounds=run.rounds, workers=0, seed=run.seed)
            history = Simulation(config, strategy, federation.datasets()).run()
            assert [m.round for m in history] == [1, 2, 3] and all(m.clients_rejected == 0 for m in history)
            done[name] = history[-1].test_accuracy
        return done[name]

    return run


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_learns_with_its_defaults(name, final_accuracy):
    accuracy, fedavg = final_accuracy(name), final_accuracy("fedavg")
    assert accuracy >= THRESHOLD, f"{name}: test accuracy {accuracy:.3f} < {THRESHOLD} after 3 rounds"
    if STRATEGIES[name].__module__ != "coordinator.strategies.robust":
        assert accuracy >= fedavg - MARGIN, f"{name}: {accuracy:.3f} is far below FedAvg's {fedavg:.3f}"
