"""Client-level differential privacy with central noise (DP-FedAvg, McMahan et al. 2018).

:class:`DifferentialPrivacy` wraps any strategy. Each round it

1. clips every client's delta to L2 norm ``clip_norm`` (the whole update,
   all tensors together), so no client moves the sum by more than that;
2. sums the clipped deltas with equal weights (example counts would let one
   client's weight exceed the bound) and divides by the number of clients
   selected, a count fixed before anyone trains;
3. adds Gaussian noise of standard deviation ``noise_multiplier *
   clip_norm / selected`` to every coordinate;
4. hands that noisy mean to the wrapped strategy as a single update, so its
   server optimiser (FedAvg, FedAvgM, FedAdam, ...) applies it as usual.

Privacy spent is accounted by Google's ``dp-accounting`` (Rényi DP) as one
Poisson-sampled Gaussian mechanism per round with sampling rate
``selected / available``; the fixed-size sampling the strategies actually
do is the usual approximation of it. :meth:`DifferentialPrivacy.privacy_spent`
gives epsilon for the configured delta and lands in each round's metrics.

Noise comes from the operating system's entropy unless a seed is given;
seed it only for reproducible research, never in a deployment (a known
seed lets anyone subtract the noise). Floating-point Gaussian sampling is
not hardened against the known precision attacks on DP implementations.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from coordinator.errors import CoordinatorError
from coordinator.strategies.aggregate import StreamingAverage, check_update
from coordinator.strategies.base import Aggregation, ClientUpdate, RoundConfig, Strategy
from coordinator.strategies.params import NON_NEGATIVE, OPEN_UNIT, POSITIVE, check_range
from edge_client.weights import NamedArray, Weights

__all__ = ["DifferentialPrivacy", "clip_update", "epsilon_spent", "update_norm"]

_STATE_KEY = "dp/sampling_rates"


def update_norm(delta: Weights) -> float:
    """L2 norm of a whole update (all tensors as one vector), in float64."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for _, a in delta))


def clip_update(delta: Weights, clip_norm: float) -> Weights:
    """``delta`` scaled down to L2 norm ``clip_norm`` if it is longer; unchanged otherwise."""
    norm = update_norm(delta)
    if norm <= clip_norm:
        return list(delta)
    scale = clip_norm / norm
    return [NamedArray(name, (np.asarray(a, np.float64) * scale).astype(np.asarray(a).dtype)) for name, a in delta]


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp-accounting logs a warning per Rényi order it cannot evaluate; the
    # result is still a valid (slightly looser) bound, so keep them out of the logs.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon_spent(sampling_rates: Sequence[float], noise_multiplier: float, delta: float) -> float:
    """Epsilon after one Poisson-sampled Gaussian mechanism per entry of ``sampling_rates``."""
    import dp_accounting  # the coordinator extra; imported here so non-DP runs never load it

    if not sampling_rates:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    rates, counts = np.unique(np.round(np.asarray(sampling_rates, np.float64), 12), return_counts=True)
    with _quiet_absl():
        for rate, count in zip(rates, counts, strict=True):
            event = dp_accounting.PoissonSampledDpEvent(float(rate), dp_accounting.GaussianDpEvent(noise_multiplier))
            accountant.compose(event, int(count))
        return float(accountant.get_epsilon(delta))


class _PrivateAggregation:
    """Clipped, equally weighted deltas; ``finish`` adds noise and defers to the wrapped strategy."""

    def __init__(self, dp: DifferentialPrivacy, server_round: int, global_weights: Weights):
        self._dp, self._round, self._global = dp, server_round, global_weights
        self._sum = StreamingAverage()
        self._result: Weights | None = None

    def add(self, update: ClientUpdate) -> None:
        if not update.validated:  # checked as sent, before clipping rescales it
            check_update(update.delta, update.num_examples, self._sum.layout)
        clipped = clip_update(update.delta, self._dp.clip_norm)
        # Equal weights: n_k would scale a client past the clip bound. Clipping a checked update
        # keeps it finite and of the same layout, so the sum need not read it again.
        self._sum.add(clipped, 1, validated=True)

    @property
    def count(self) -> int:
        return self._sum.count

    def finish(self) -> Weights:
        if self._result is not None:
            return self._result
        if self._sum.count == 0:
            raise CoordinatorError("no accepted update to aggregate")
        selected = max(self._dp.selected_for(self._round), self._sum.count)
        rng = self._dp.noise_rng(self._round)
        std = self._dp.noise_multiplier * self._dp.clip_norm / selected
        noisy = []
        for name, mean in self._sum.result():
            total = np.asarray(mean, np.float64) * self._sum.count  # the sum of the clipped deltas
            noise = rng.normal(0.0, std, size=total.shape) if std > 0 else 0.0
            noisy.append(NamedArray(name, (total / selected + noise).astype(np.asarray(mean).dtype)))
        inner = self._dp.strategy.begin_aggregation(self._round, self._global)
        inner.add(ClientUpdate("dp-aggregate", noisy, 1))
        self._result = inner.finish()
        self._dp.account(self._round)
        return self._result


class DifferentialPrivacy(Strategy):
    """Central client-level DP around ``strategy``: clip each update, noise the mean.

    ``noise_multiplier`` 0 gives clipping only (no privacy guarantee, epsilon
    is infinite). ``delta`` is the DP delta the reported epsilon refers to;
    take it well below 1 / (number of clients). ``seed`` makes the noise
    reproducible: simulations only. Everything but ``strategy`` is
    keyword-only; a bad value raises
    :class:`~coordinator.strategies.params.StrategyConfigError`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        delta: float = 1e-5,
        seed: int | None = None,
    ):
        check_range("the DP clip norm", clip_norm, POSITIVE, rule="a positive number")
        check_range("the DP noise multiplier", noise_multiplier, NON_NEGATIVE, rule=">= 0")
        check_range("the DP delta", delta, OPEN_UNIT)
        self.strategy, self.clip_norm, self.noise_multiplier, self.delta = strategy, clip_norm, noise_multiplier, delta
        self._seed = seed
        self._selected: dict[int, tuple[int, int]] = {}  # round -> (selected, available)
        self._rates: list[float] = []  # sampling rate of every aggregated round so far

    # -- the Strategy hooks, delegated ------------------------------------------------
    # Read-only views of the wrapped strategy's counts (Strategy declares plain attributes, which
    # the engine only reads): a writable copy here could disagree with the strategy that aggregates.
    @property
    def min_fit(self) -> int:  # type: ignore[override]
        return self.strategy.min_fit

    @property
    def min_available(self) -> int:  # type: ignore[override]
        return self.strategy.min_available

    @property
    def round_config(self) -> RoundConfig:
        return self.strategy.config_for_round(1)

    def config_for_round(self, server_round: int) -> RoundConfig:
        return self.strategy.config_for_round(server_round)

    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]:
        chosen, config = self.strategy.configure_round(server_round, available, rng)
        previous = self._selected.get(server_round, (0, len(available)))
        # A retried round selects more clients; the first attempt's population stands.
        self._selected[server_round] = (previous[0] + len(chosen), previous[1])
        return chosen, config

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _PrivateAggregation(self, server_round, global_weights)

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float] | None:
        return self.strategy.evaluate(server_round, weights)

    # -- privacy ----------------------------------------------------------------------
    def selected_for(self, server_round: int) -> int:
        return self._selected.get(server_round, (0, 0))[0]

    def noise_rng(self, server_round: int) -> np.random.Generator:
        if self._seed is None:
            return np.random.default_rng()  # OS entropy
        return np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(server_round,)))

    def account(self, server_round: int) -> None:
        """Record one aggregated round (called once per round by the aggregation)."""
        selected, available = self._selected.pop(server_round, (0, 0))
        # Without a configure_round (e.g. FederatedProcess.next) every given client took part.
        self._rates.append(min(1.0, selected / available) if selected and available else 1.0)

    def privacy_spent(self) -> float:
        """Epsilon spent over the rounds aggregated so far, for :attr:`delta`."""
        if self.noise_multiplier == 0:
            return math.inf if self._rates else 0.0
        return epsilon_spent(self._rates, self.noise_multiplier, self.delta)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        inner = self.strategy.state_dict()
        return {**inner, _STATE_KEY: np.asarray(self._rates, np.float64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        inner = dict(state)
        rates = np.asarray(inner.pop(_STATE_KEY, np.zeros(0)), np.float64)
        if rates.ndim != 1 or not np.all((rates > 0) & (rates <= 1)):
            raise CoordinatorError("checkpoint: the DP sampling-rate history is malformed")
        self.strategy.load_state_dict(inner)  # an empty state resets it, as FederatedProcess.next expects
        self._rates = [float(r) for r in rates]
