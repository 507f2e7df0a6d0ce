"""A third-party strategy written only against :class:`coordinator.strategies.Strategy`'s docstrings.

``LargestClients`` averages, each round, the updates of the ``k`` clients
that trained on the most examples and drops the rest: no built-in strategy
does this, and it uses every hook of the contract (selection, aggregation,
evaluation, state). It runs through the simulator's
:class:`~coordinator.simulator.FederatedProcess` on the tabular model and
must give exactly what NumPy gives from the clients' own update frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from coordinator.errors import AggregationError, CoordinatorError
from coordinator.simulator import FederatedProcess, run_client_job
from coordinator.strategies import Aggregation, ClientUpdate, RoundConfig, Strategy
from edge_client.frames import decode_frame
from edge_client.weights import NamedArray, Weights
from tests.helpers import separable_binary_data

CONFIG = RoundConfig(epochs=1, lr=0.05)
SIZES = {"client-000": 48, "client-001": 30, "client-002": 20, "client-003": 10}


class _LargestAggregation:
    def __init__(self, strategy: LargestClients, global_weights: Weights):
        self._strategy, self._global = strategy, global_weights
        self._updates: list[tuple[int, str, list[np.ndarray]]] = []
        self._result: Weights | None = None

    def add(self, update: ClientUpdate) -> None:
        # Copy: the engine may reuse the update's arrays after add().
        arrays = [np.array(a, np.float64) for _, a in update.delta]
        self._updates.append((update.num_examples, update.client_id, arrays))

    @property
    def count(self) -> int:
        return len(self._updates)

    def finish(self) -> Weights:
        if self._result is None:
            k = self._strategy.k
            if len(self._updates) < k:
                raise AggregationError(f"the {k} largest clients are needed, got {len(self._updates)} updates")
            top = sorted(self._updates, key=lambda u: (-u[0], u[1]))[:k]
            total = sum(n for n, _, _ in top)
            self._result = [
                NamedArray(name, (g + sum(n * d[i] for n, _, d in top) / total).astype(g.dtype))
                for i, (name, g) in enumerate(self._global)
            ]
            self._strategy.rounds_aggregated += 1
        return self._result


class LargestClients(Strategy):
    """FedAvg of the ``k`` updates with the most examples; every online client is asked."""

    def __init__(self, k: int):
        self.k = k
        self.min_fit = self.min_available = k
        self.rounds_aggregated = 0

    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]:
        return sorted(available), CONFIG

    def config_for_round(self, server_round: int) -> RoundConfig:
        return CONFIG

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _LargestAggregation(self, global_weights)

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float]:
        return {"loss": _norm(weights), "accuracy": 0.5}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"rounds_aggregated": np.array([self.rounds_aggregated], np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            self.rounds_aggregated = 0
            return
        value = np.asarray(state.get("rounds_aggregated", np.zeros(0)))
        if value.shape != (1,):
            raise CoordinatorError("LargestClients: the state needs 'rounds_aggregated', one integer")
        self.rounds_aggregated = int(value[0])


def _norm(weights: Weights) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for _, a in weights)))


def _datasets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = separable_binary_data(sum(SIZES.values()), seed=3)
    bounds = np.cumsum([0, *SIZES.values()])
    return {c: (x[a:b], y[a:b]) for c, a, b in zip(SIZES, bounds[:-1], bounds[1:], strict=True)}


def _expected(start: Weights, frames: list, clients: list[str]) -> list[np.ndarray]:
    """``global + sum n_k d_k / sum n_k`` over ``clients``, in float64 from the decoded update frames."""
    chosen = [f for f in frames if f.client_id in clients]
    total = sum(f.num_examples for f in chosen)
    return [
        g.astype(np.float64) + sum(f.num_examples * f.tensors[i].array.astype(np.float64) for f in chosen) / total
        for i, (_, g) in enumerate(start)
    ]


def test_a_third_party_strategy_runs_in_the_simulator_and_matches_numpy(tabular):
    data = _datasets()
    strategy = LargestClients(k=2)
    with FederatedProcess(tabular.model_path, strategy, seed=0) as process:
        state = process.initialize()
        jobs = process.client_jobs(state, data, CONFIG)
        frames = [decode_frame(run_client_job(tabular.runtime(), job).payload) for job in jobs]
        new, metrics = process.next(state, data)
        again, _ = process.next(new, data)
        replay, _ = process.next(state, data)  # next() loads the (fresh) state it is given: round 1 again
    assert [f.num_examples for f in frames] == list(SIZES.values())
    largest = _expected(state.weights, frames, ["client-000", "client-001"])
    for (name, got), want in zip(new.weights, largest, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
    # The dropped clients matter: FedAvg over all four is measurably elsewhere.
    everyone = _expected(state.weights, frames, list(SIZES))
    assert max(np.abs(a - b).max() for a, b in zip(largest, everyone, strict=True)) > 1e-4
    assert (metrics.clients_selected, metrics.clients_answered, metrics.num_examples) == (4, 4, 108)
    assert metrics.aggregation_error is None
    assert metrics.test_loss == pytest.approx(_norm(new.weights)) and metrics.test_accuracy == 0.5
    assert new.strategy_state["rounds_aggregated"].tolist() == [1]
    assert again.strategy_state["rounds_aggregated"].tolist() == [2]
    assert replay.strategy_state["rounds_aggregated"].tolist() == [1]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(replay.weights, new.weights, strict=True))


def test_a_refused_aggregate_keeps_the_model_and_the_state(tabular):
    data = {c: d for c, d in _datasets().items() if c in ("client-000", "client-001")}
    with FederatedProcess(tabular.model_path, LargestClients(k=3), seed=0) as process:
        state = process.initialize()
        new, metrics = process.next(state, data)
    assert metrics.clients_answered == 2
    assert "the 3 largest clients are needed, got 2 updates" in metrics.aggregation_error
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(new.weights, state.weights, strict=True))
    assert new.strategy_state["rounds_aggregated"].tolist() == [0]


def test_selection_comes_from_configure_round():
    chosen, config = LargestClients(k=2).configure_round(1, ["b", "a", "c"], np.random.default_rng(0))
    assert chosen == ["a", "b", "c"] and config == CONFIG


class _OnlyConfigures(Strategy):
    def configure_round(self, server_round, available, rng):
        return list(available), RoundConfig()


class _OnlyAggregates(Strategy):
    def begin_aggregation(self, server_round, global_weights):
        raise AssertionError("never called")


class _Minimal(_OnlyConfigures):
    def begin_aggregation(self, server_round, global_weights):
        raise AssertionError("never called")


@pytest.mark.parametrize(
    ("cls", "missing"), [(_OnlyConfigures, "begin_aggregation"), (_OnlyAggregates, "configure_round")]
)
def test_a_strategy_missing_a_required_hook_cannot_be_instantiated(cls, missing):
    with pytest.raises(TypeError, match=missing):
        cls()


def test_the_optional_hooks_have_the_documented_defaults():
    strategy = _Minimal()
    assert (strategy.min_fit, strategy.min_available) == (1, 1)
    assert strategy.config_for_round(7) == RoundConfig()
    weights = [NamedArray("w", np.ones(2, np.float32))]
    assert strategy.evaluate(1, weights) is None and strategy.privacy_spent() is None
    assert strategy.state_dict() == {}
    assert strategy.load_state_dict({"m/w": np.zeros(2)}) is None  # stateless: another strategy's state is ignored
    assert strategy.state_dict() == {}
