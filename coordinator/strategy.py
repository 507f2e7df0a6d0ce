"""Strategies: how a round is configured and how its updates become a new model.

A strategy is a small object with three hooks, shared by the MQTT
coordinator and (later) the in-process simulator, so the same strategy
gives the same result whichever way the updates arrived:

- :meth:`Strategy.configure_round` picks the clients and the round's
  hyper-parameters;
- :meth:`Strategy.begin_aggregation` returns an :class:`Aggregation` that
  folds in updates one at a time (memory O(model), not O(clients x model))
  and finally yields the new global weights;
- :meth:`Strategy.evaluate` optionally scores the global weights.

Clients send deltas (``local - global``); strategies aggregate deltas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from coordinator.aggregate import StreamingAverage, apply_delta
from coordinator.errors import CoordinatorError
from edge_client.weights import Weights


@dataclass(frozen=True)
class RoundConfig:
    """What the selected clients are asked to do in one round."""

    epochs: int = 1
    lr: float = 0.01
    mu: float = 0.0
    codec: str = "float32"


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted update: the client's delta, its example count and train metrics."""

    client_id: str
    delta: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Aggregation(Protocol):
    """Folds in the accepted updates of one round."""

    def add(self, update: ClientUpdate) -> None: ...

    @property
    def count(self) -> int: ...

    def finish(self) -> Weights: ...


class Strategy(Protocol):
    min_fit: int
    min_available: int

    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]: ...

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation: ...

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float] | None: ...


class _FedAvgAggregation:
    def __init__(self, global_weights: Weights, server_lr: float):
        self._global, self._server_lr = global_weights, server_lr
        self._average = StreamingAverage()

    def add(self, update: ClientUpdate) -> None:
        self._average.add(update.delta, update.num_examples)

    @property
    def count(self) -> int:
        return self._average.count

    def finish(self) -> Weights:
        if self._average.count == 0:
            raise CoordinatorError("no accepted update to aggregate")
        return apply_delta(self._global, self._average.result(), self._server_lr)


class FedAvg:
    """Weighted FedAvg (McMahan et al. 2017) over client deltas.

    ``fraction_fit`` of the available clients are sampled each round (at
    least ``min_fit``); the new global model is ``global + server_lr *
    sum(n_k * delta_k) / sum(n_k)``. ``server_lr = 1`` is plain FedAvg.

    ``server_lr`` defaults to the class's ``DEFAULT_SERVER_LR`` (1 here;
    server optimisers set their own), the one place each default is held.

    ``lr_decay`` multiplies the client learning rate by itself every round
    (round ``t`` trains at ``lr * lr_decay**(t - 1)``): with non-IID data a
    smaller late step means less client drift, and FedAvg needs a decaying
    rate to converge there (Li et al. 2020, "On the Convergence of FedAvg on
    Non-IID Data"). ``1`` keeps it constant.
    """

    DEFAULT_SERVER_LR: float = 1.0

    def __init__(
        self,
        fraction_fit: float = 1.0,
        min_fit: int = 1,
        min_available: int = 1,
        round_config: RoundConfig = RoundConfig(),
        server_lr: float | None = None,
        evaluate_fn: Callable[[Weights], dict[str, float]] | None = None,
        lr_decay: float = 1.0,
    ):
        if not 0 < fraction_fit <= 1:
            raise CoordinatorError(f"fraction_fit must be in (0, 1], got {fraction_fit}")
        if not 1 <= min_fit <= min_available:
            raise CoordinatorError(f"need 1 <= min_fit ({min_fit}) <= min_available ({min_available})")
        if not 0 < lr_decay <= 1:
            raise CoordinatorError(f"lr_decay must be in (0, 1], got {lr_decay}")
        self.lr_decay = lr_decay
        self.fraction_fit, self.min_fit, self.min_available = fraction_fit, min_fit, min_available
        self.server_lr = type(self).DEFAULT_SERVER_LR if server_lr is None else server_lr
        self.round_config, self._evaluate_fn = round_config, evaluate_fn

    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]:
        count = min(len(available), max(self.min_fit, math.ceil(self.fraction_fit * len(available))))
        chosen = rng.choice(sorted(available), size=count, replace=False)
        return sorted(str(c) for c in chosen), self.config_for_round(server_round)

    def config_for_round(self, server_round: int) -> RoundConfig:
        """What round ``server_round`` (from 1) asks of its clients: the round config, lr decayed."""
        if self.lr_decay == 1.0:
            return self.round_config
        lr = self.round_config.lr * self.lr_decay ** (server_round - 1)
        return dataclasses.replace(self.round_config, lr=lr)

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _FedAvgAggregation(global_weights, self.server_lr)

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float] | None:
        return None if self._evaluate_fn is None else self._evaluate_fn(weights)


def config_for_round(strategy: Strategy, server_round: int) -> RoundConfig:
    """The round config a strategy would announce for ``server_round``, without sampling clients."""
    schedule = getattr(strategy, "config_for_round", None)
    if schedule is not None:
        return schedule(server_round)
    return getattr(strategy, "round_config", RoundConfig())


def privacy_spent(strategy: Strategy) -> float | None:
    """Epsilon spent so far by a differentially private strategy; None for the others."""
    spent = getattr(strategy, "privacy_spent", None)
    return None if spent is None else spent()
