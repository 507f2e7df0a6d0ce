"""Strategies: how a round is configured and how its updates become a new model.

Write your own by subclassing :class:`Strategy` (its docstrings are the
contract); the built-in ones are listed by name in :data:`STRATEGIES`.
Constructors take keyword arguments only (``FedAvg(fraction_fit=0.5)``,
``DifferentialPrivacy(strategy, clip_norm=1.0, noise_multiplier=1.1)``) and
raise :class:`StrategyConfigError` for a value out of range.
"""

from __future__ import annotations

from coordinator.strategies.base import Aggregation, ClientUpdate, RoundConfig, Strategy
from coordinator.strategies.dp import DifferentialPrivacy
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedProx, FedYogi
from coordinator.strategies.params import StrategyConfigError
from coordinator.strategies.robust import FedMedian, FedTrimmedAvg, Krum

__all__ = [
    "STRATEGIES",
    "Aggregation",
    "ClientUpdate",
    "DifferentialPrivacy",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "RoundConfig",
    "Strategy",
    "StrategyConfigError",
]

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedprox": FedProx,
    "median": FedMedian,
    "trimmed-mean": FedTrimmedAvg,
    "krum": Krum,
}
"""The strategies ``--strategy`` offers, by name; each class holds its own defaults."""
