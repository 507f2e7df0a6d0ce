"""Strategies: how a round is configured and how its updates become a new model.

A strategy is a small object with a few hooks, shared by the MQTT
coordinator and the in-process simulator, so the same strategy gives the
same result whichever way the updates arrived:

- :meth:`Strategy.configure_round` picks the clients and the round's
  hyper-parameters;
- :meth:`Strategy.begin_aggregation` returns an :class:`Aggregation` that
  folds in updates one at a time (memory O(model), not O(clients x model))
  and finally yields the new global weights;
- the optional hooks (:meth:`Strategy.evaluate`, :meth:`Strategy.state_dict`
  ...) have defaults in :class:`Strategy`.

Clients send deltas (``local - global``); strategies aggregate deltas.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

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


class Strategy(abc.ABC):
    """The base of every strategy: two required hooks, and documented defaults for the rest.

    The coordinator and the simulator call exactly these methods, never
    probing for others. A subclass implements :meth:`configure_round` and
    :meth:`begin_aggregation`; the other hooks have defaults that suit a
    stateless, non-private strategy without server-side evaluation.

    Attributes the round engine reads:

    - ``min_fit``: a round needs at least this many accepted updates (it is
      retried otherwise). Default 1.
    - ``min_available``: a round starts once this many clients with data are
      online. Default 1.
    """

    min_fit: int = 1
    min_available: int = 1

    @abc.abstractmethod
    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]:
        """Pick clients among ``available`` (sorted ids of online clients with data) for round
        ``server_round`` (from 1), drawing randomness only from ``rng``; return them with the round's
        :class:`RoundConfig`. Called again for a retried round, with the clients already accepted
        left out of ``available``."""

    @abc.abstractmethod
    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        """A fresh :class:`Aggregation` for round ``server_round``, starting from ``global_weights``."""

    def config_for_round(self, server_round: int) -> RoundConfig:
        """What round ``server_round`` would ask of its clients, without sampling any.

        Used by :meth:`~coordinator.simulator.FederatedProcess.next` when no
        config is passed. Default: ``RoundConfig()``.
        """
        return RoundConfig()

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float] | None:
        """Score the new global model (``loss`` and ``accuracy`` keys are reported). Default: None."""
        return None

    def privacy_spent(self) -> float | None:
        """Epsilon spent so far by a differentially private strategy. Default: None (not private)."""
        return None

    def state_dict(self) -> dict[str, np.ndarray]:
        """State that must survive a restart (e.g. server optimiser moments), as named plain arrays.

        Saved in every checkpoint and handed back to :meth:`load_state_dict`.
        Default: ``{}`` (stateless).
        """
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned; an empty mapping resets the state.

        Raise :class:`~coordinator.errors.CoordinatorError` for a state this
        strategy cannot use. Default: nothing to restore, ``state`` is ignored.
        """
        return None  # stateless: a checkpoint of another strategy's state is not an error
