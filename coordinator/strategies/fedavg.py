"""FedAvg: the strategy every other built-in one builds on."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from coordinator.errors import CoordinatorError
from coordinator.strategies.aggregate import StreamingAverage, apply_delta
from coordinator.strategies.base import Aggregation, ClientUpdate, RoundConfig, Strategy
from coordinator.strategies.params import FRACTION, check_client_counts, check_number, check_range
from edge_client.weights import Weights


class _FedAvgAggregation:
    def __init__(self, global_weights: Weights, server_lr: float):
        self._global, self._server_lr = global_weights, server_lr
        self._average = StreamingAverage()

    def add(self, update: ClientUpdate) -> None:
        self._average.add(update.delta, update.num_examples, validated=update.validated)

    @property
    def count(self) -> int:
        return self._average.count

    def finish(self) -> Weights:
        if self._average.count == 0:
            raise CoordinatorError("no accepted update to aggregate")
        return apply_delta(self._global, self._average.result(), self._server_lr)


class FedAvg(Strategy):
    """Weighted FedAvg (McMahan et al. 2017) over client deltas.

    ``fraction_fit`` of the available clients are sampled each round (at
    least ``min_fit``); the new global model is ``global + server_lr *
    sum(n_k * delta_k) / sum(n_k)``. ``server_lr = 1`` is plain FedAvg.

    ``server_lr`` defaults to the class's ``DEFAULT_SERVER_LR`` (1 here;
    server optimisers set their own), the one place each default is held.
    Arguments are keyword-only; a bad one raises
    :class:`~coordinator.strategies.params.StrategyConfigError`.

    ``lr_decay`` multiplies the client learning rate by itself every round
    (round ``t`` trains at ``lr * lr_decay**(t - 1)``): with non-IID data a
    smaller late step means less client drift, and FedAvg needs a decaying
    rate to converge there (Li et al. 2020, "On the Convergence of FedAvg on
    Non-IID Data"). ``1`` keeps it constant.
    """

    DEFAULT_SERVER_LR: float = 1.0

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        min_fit: int = 1,
        min_available: int = 1,
        round_config: RoundConfig | None = None,
        server_lr: float | None = None,
        evaluate_fn: Callable[[Weights], dict[str, float]] | None = None,
        lr_decay: float = 1.0,
    ):
        check_range("fraction_fit", fraction_fit, FRACTION)
        check_client_counts(min_fit, min_available)
        check_range("lr_decay", lr_decay, FRACTION)
        self.lr_decay = lr_decay
        self.fraction_fit, self.min_fit, self.min_available = fraction_fit, min_fit, min_available
        self.server_lr = type(self).DEFAULT_SERVER_LR if server_lr is None else server_lr
        check_number("server_lr", self.server_lr)  # a NaN rate would refuse every round's aggregate
        self.round_config = RoundConfig() if round_config is None else round_config
        self._evaluate_fn = evaluate_fn

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
