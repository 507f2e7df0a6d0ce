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
    """What the selected clients are asked to do in one round.

    ``epochs`` local epochs at learning rate ``lr``; ``mu`` the FedProx
    proximal coefficient (0: none); ``codec`` the name of the
    :mod:`edge_client.codecs` codec the clients encode their update with.
    """

    epochs: int = 1
    lr: float = 0.01
    mu: float = 0.0
    codec: str = "float32"


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted update: the client's delta, its example count and train metrics.

    ``delta`` is ``local - global`` per tensor, in the global model's order.
    ``validated`` is True when the round engine has already checked the
    update at the frame boundary
    (:func:`edge_client.frames.validate_frame`: the model's tensor names,
    order, shapes and dtypes, every value finite, ``num_examples >= 1``).
    The built-in aggregations then skip their own checks, so an update that
    arrived as a frame is checked once; an update built in Python keeps the
    default False and is checked by :meth:`Aggregation.add`. Set it only
    for an update that passed those checks.
    """

    client_id: str
    delta: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    validated: bool = False


class Aggregation(Protocol):
    """Folds in the accepted updates of one round; made by :meth:`Strategy.begin_aggregation`.

    The round engine calls :meth:`add` once per update, from one thread, in
    a deterministic order (client-id order in the simulator, arrival order
    in the MQTT coordinator), then :meth:`finish` once.
    """

    def add(self, update: ClientUpdate) -> None:
        """Fold in one update, or raise :class:`~coordinator.errors.AggregationError` to reject it.

        A rejected update must leave the aggregation as if :meth:`add` had
        not been called: the engine tells that client its update was
        rejected (reason ``bad_tensors``) and carries on with the round. Any
        other exception stops the run. The engine may reuse the update's
        arrays after the call: copy what you keep.
        """
        ...

    @property
    def count(self) -> int:
        """Updates accepted so far; a round whose count is 0 is an error, not a model."""
        ...

    def finish(self) -> Weights:
        """The round's new global weights: the global weights' names, order, shapes and dtypes.

        Raise :class:`~coordinator.errors.AggregationError` to refuse the
        aggregate (e.g. too few updates for a robust rule, a non-finite
        model): the round then ends with the global model unchanged and the
        reason in the round's metrics
        (:func:`~coordinator.strategies.aggregate.finish_or_keep`).
        Another :class:`~coordinator.errors.CoordinatorError` stops the run.
        Calling it twice should return the same weights without changing
        the strategy's state again.
        """
        ...


class Strategy(abc.ABC):
    """The base of every strategy: two required hooks, and documented defaults for the rest.

    This class's docstrings are the whole contract: a strategy written
    against them runs unchanged in the MQTT coordinator
    (:class:`~coordinator.service.Coordinator`), the simulator
    (:class:`~coordinator.simulator.FederatedProcess`,
    :class:`~coordinator.simulator.Simulation`) and inside
    :class:`~coordinator.strategies.dp.DifferentialPrivacy`. The engines
    call exactly these methods, never probing for others, and always from
    one thread, so a strategy needs no locks.

    A subclass implements :meth:`configure_round` and
    :meth:`begin_aggregation` (instantiating one that lacks either raises
    ``TypeError``); the other hooks have defaults that suit a stateless,
    non-private strategy without server-side evaluation. Subclassing
    :class:`~coordinator.strategies.fedavg.FedAvg` instead and overriding
    only :meth:`begin_aggregation` keeps FedAvg's client sampling and
    round config.

    One round, as every engine runs it:

    1. :meth:`configure_round` picks the clients and their
       :class:`RoundConfig` (the simulator's ``FederatedProcess.next``
       trains the clients it is given and asks :meth:`config_for_round`
       instead);
    2. :meth:`begin_aggregation` returns a fresh :class:`Aggregation`
       starting from the current global weights (the MQTT coordinator calls
       it before step 1, the simulator after: rely on neither order);
    3. each update the selected clients send is checked against the model
       at the frame boundary (:func:`edge_client.frames.validate_frame`), and
       passed to :meth:`Aggregation.add` as a :class:`ClientUpdate` if it
       fits (see :attr:`ClientUpdate.validated`); a round without ``min_fit``
       accepted updates by its deadline is announced again (step 1, with the
       clients already accepted left out);
    4. :meth:`Aggregation.finish` gives the new global weights;
    5. :meth:`privacy_spent` and :meth:`evaluate` are asked about the round;
    6. :meth:`state_dict` is saved with the global weights (checkpoint,
       simulator state).

    Attributes the round engine reads (plain attributes or properties):

    - ``min_fit``: a round needs at least this many accepted updates (it is
      retried otherwise). Default 1.
    - ``min_available``: a round starts once this many clients with data are
      online (the simulator refuses fewer datasets). Default 1.

    Errors: raise :class:`~coordinator.errors.CoordinatorError` (for a bad
    constructor argument, :class:`~coordinator.strategies.params.StrategyConfigError`)
    with a one-line message that says what to do; it stops the run with that
    message. :class:`~coordinator.errors.AggregationError` has the narrower
    meanings given in :class:`Aggregation`.
    """

    min_fit: int = 1
    min_available: int = 1

    @abc.abstractmethod
    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]:
        """Pick the clients of round ``server_round`` (from 1) and what they are asked to do.

        ``available`` is the sorted ids of the online clients with data that
        may still be asked (at least ``min_available`` of them in the first
        attempt). Return a list of ids from ``available`` (the engine waits
        for each; none outside it) and the round's :class:`RoundConfig`.
        Draw randomness only from ``rng``, which the engine seeds, so a run
        is reproducible from its seed. Called again for a retried round, with
        the clients already accepted left out of ``available``; a client
        chosen again that has not answered yet is simply asked again.
        """

    @abc.abstractmethod
    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        """A fresh :class:`Aggregation` for round ``server_round``, starting from ``global_weights``.

        Called once per round: a retried round (step 3 of :class:`Strategy`)
        keeps its aggregation and the updates already accepted.
        ``global_weights`` is the model the clients trained from; do not
        modify it, the engine keeps it if the aggregate is refused.
        """

    def config_for_round(self, server_round: int) -> RoundConfig:
        """What round ``server_round`` would ask of its clients, without sampling any.

        Used by :meth:`~coordinator.simulator.FederatedProcess.next` when no
        config is passed, and by wrappers that need the config alone. It
        should agree with the config :meth:`configure_round` returns.
        Default: ``RoundConfig()``.
        """
        return RoundConfig()

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float] | None:
        """Score the global model after round ``server_round``, or None not to.

        Called once per round after :meth:`Aggregation.finish`, with the new
        global weights (the unchanged ones if the aggregate was refused). The
        ``loss`` and ``accuracy`` keys are reported in the round's metrics;
        other keys are ignored. Default: None.
        """
        return None

    def privacy_spent(self) -> float | None:
        """Epsilon spent so far by a differentially private strategy, or None if it is not private.

        Called once per round after :meth:`Aggregation.finish` and reported
        in the round's metrics. Default: None.
        """
        return None

    def state_dict(self) -> dict[str, np.ndarray]:
        """State that must survive a restart (e.g. server optimiser moments), as named plain arrays.

        Called after every round (and by some engines before the first);
        the result is saved in the checkpoint (``numpy.savez``: string keys,
        numeric arrays, no objects) and is the simulator's
        ``ServerState.strategy_state``, so return copies, not arrays the
        strategy will go on changing. Key order is kept. Default: ``{}``
        (stateless).
        """
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned; an empty mapping resets the state.

        Called when a run resumes from a checkpoint, and by
        ``FederatedProcess.next`` before every round with the state it was
        given (empty for a fresh one). Raise
        :class:`~coordinator.errors.CoordinatorError` for a state this
        strategy cannot use, leaving the current state untouched. Default:
        nothing to restore, ``state`` is ignored.
        """
        return None  # stateless: a checkpoint of another strategy's state is not an error
