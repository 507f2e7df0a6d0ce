"""Byzantine-robust aggregation for untrusted fleets.

FedAvg's mean lets a single client move the global model arbitrarily far.
The aggregators here bound what a minority of bad updates can do, at a
price: they need **every** update of the round at once, so memory is
O(clients x model) rather than the O(model) of
:class:`~coordinator.strategies.aggregate.StreamingAverage`.

Pure functions over ``(weights, num_examples)`` pairs:

- :func:`coordinate_median` — element-wise median;
- :func:`trimmed_mean` — element-wise mean after dropping the ``beta``
  fraction of largest and of smallest values;
- :func:`krum` — (multi-)Krum of Blanchard et al. 2017.

Example counts are client-reported, so a Byzantine client could inflate
them; the median and trimmed mean ignore them (plain, unweighted
statistics), and Krum ignores them unless asked to weight the average of
the selected updates. Counts are still validated (positive ints).

Strategies :class:`FedMedian`, :class:`FedTrimmedAvg` and :class:`Krum`
are :class:`~coordinator.strategies.fedavg.FedAvg` (same selection and round
config) whose aggregation buffers the round's deltas and returns
``global + server_lr * robust(deltas)``. Each update is checked once, when
it is added (or not at all when it is ``validated``), never again by the
robust rule at the end of the round.

Math is float64; results come back in the clients' dtypes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from coordinator.errors import AggregationError, CoordinatorError
from coordinator.strategies.aggregate import apply_delta, check_update, layout_of_update
from coordinator.strategies.base import Aggregation, ClientUpdate
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.params import TRIM_FRACTION, StrategyConfigError, check_count, check_range
from edge_client.weights import NamedArray, TensorSpec, Weights

__all__ = ["FedMedian", "FedTrimmedAvg", "Krum", "coordinate_median", "krum", "min_trimmed_updates", "trimmed_mean"]

Results = Sequence[tuple[Weights, int]]
Layout = tuple[TensorSpec, ...]
_BETA_RULE = "a number in [0, 0.5)"


def coordinate_median(results: Results) -> Weights:
    """Element-wise median of the updates (unweighted; mean of the two middle values for an even count).

    Tolerates fewer than half the updates being arbitrary. Memory O(clients x model).
    """
    return _median(_checked(results), results)


def _median(layout: Layout, results: Results) -> Weights:
    return _pack(layout, [np.median(stack, axis=0) for stack in _stack(layout, results)])


def trimmed_mean(results: Results, beta: float) -> Weights:
    """Element-wise mean after dropping, per coordinate, the ``floor(beta * n)`` largest and smallest values.

    ``beta`` is in ``[0, 0.5)``; ``beta = 0`` asks for the plain unweighted
    mean. A positive ``beta`` that trims nothing (``floor(beta * n) = 0``, too
    few updates) raises :class:`AggregationError` rather than silently
    returning the plain mean, which one bad update can move arbitrarily far.
    Memory O(clients x model).
    """
    check_range("beta", beta, TRIM_FRACTION, rule=_BETA_RULE, error=AggregationError)
    return _trimmed_mean(_checked(results), results, beta)


def _trimmed_mean(layout: Layout, results: Results, beta: float) -> Weights:
    n = len(results)
    cut = math.floor(beta * n)
    if beta > 0 and cut == 0:
        raise AggregationError(
            f"a trimmed mean with beta={beta:g} of {n} updates trims nothing and would be a plain, non-robust "
            f"mean; it needs at least {min_trimmed_updates(beta)} updates (or pass beta=0 for a plain mean)"
        )
    if n - 2 * cut < 1:  # unreachable for beta < 0.5, kept as a guard
        raise AggregationError(f"trimming {cut} from each end of {n} updates leaves nothing; lower beta")
    return _pack(layout, [np.sort(stack, axis=0)[cut : n - cut].mean(axis=0) for stack in _stack(layout, results)])


def min_trimmed_updates(beta: float) -> int:
    """The fewest updates ``n`` for which ``floor(beta * n) >= 1``: below it a trimmed mean trims nothing."""
    if not 0 < beta < 0.5:
        raise AggregationError(f"beta must be in (0, 0.5) to trim anything, got {beta!r}")
    ratio = 1 / beta
    if math.isinf(ratio):  # a subnormal beta: the count is beyond float range, so take it exactly
        return math.ceil(1 / Fraction(beta))
    n = math.ceil(ratio)
    return n if math.floor(beta * n) >= 1 else n + 1  # 1 / beta can round below the true ratio


def krum(results: Results, num_byzantine: int, multi: int = 1, weighted: bool = False) -> Weights:
    """(Multi-)Krum of Blanchard et al. 2017, "Machine Learning with Adversaries".

    Each update is flattened (all tensors concatenated). Its score is the
    sum of squared Euclidean distances to its ``n - f - 2`` nearest other
    updates, with ``f = num_byzantine``; Krum returns the update with the
    lowest score. Multi-Krum (``multi = m > 1``) returns the mean of the
    ``m`` lowest-scoring updates: plain by default, as in the multi-Krum
    literature, or example-weighted with ``weighted=True`` (which trusts
    the selected clients' counts). Ties go to the earlier update.

    Needs ``n > 2f + 2`` updates and ``1 <= m <= n - f``; otherwise
    :class:`AggregationError`. Memory O(clients x model), time O(n² x model).
    """
    check_count("num_byzantine", num_byzantine, 0, error=AggregationError)
    check_count("multi", multi, 1, error=AggregationError)
    if not results:
        raise AggregationError("no client results to aggregate; wait for at least one update")
    _check_krum_count(len(results), int(num_byzantine), multi)  # before reading any update
    return _krum(_checked(results), results, f=int(num_byzantine), multi=multi, weighted=weighted)


def _check_krum_count(n: int, f: int, multi: int) -> None:
    if n <= 2 * f + 2:
        raise AggregationError(
            f"Krum with num_byzantine={f} needs more than 2f + 2 = {2 * f + 2} updates, got {n}; "
            f"wait for more clients (min_fit >= {2 * f + 3}) or lower num_byzantine"
        )
    if multi > n - f:
        raise AggregationError(f"multi={multi} exceeds n - f = {n - f} updates that may be honest")


def _krum(layout: Layout, results: Results, *, f: int, multi: int, weighted: bool) -> Weights:
    n = len(results)
    _check_krum_count(n, f, multi)
    stacks = _stack(layout, results)
    flat = np.concatenate([stack.reshape(n, -1) for stack in stacks], axis=1)
    # Squared distances via explicit differences: exact enough, and no negative round-off as with the Gram trick.
    distances = np.array([((flat - flat[i]) ** 2).sum(axis=1) for i in range(n)])
    nearest = n - f - 2
    scores = np.array([np.sort(np.delete(distances[i], i))[:nearest].sum() for i in range(n)])
    chosen = np.argsort(scores, kind="stable")[:multi]
    weights = np.array([results[i][1] for i in chosen], np.float64) if weighted else np.ones(len(chosen))
    weights /= weights.sum()
    return _pack(layout, [np.tensordot(weights, stack[chosen], axes=1) for stack in stacks])


# -- strategies ------------------------------------------------------------------


class _BufferedAggregation:
    """Keeps every checked delta of the round; ``finish`` applies a robust rule to them.

    ``combine(layout, results)`` gets updates that are already checked and
    share ``layout``, so the rule does not read them again to validate them.
    """

    def __init__(self, global_weights: Weights, server_lr: float, combine: Callable[[Layout, Results], Weights]):
        self._global, self._server_lr, self._combine = global_weights, server_lr, combine
        self._layout: Layout | None = None
        self._results: list[tuple[Weights, int]] = []

    def add(self, update: ClientUpdate) -> None:
        if update.validated:  # checked at the frame boundary; the first one's layout is read for the rule
            layout = self._layout or layout_of_update(update.delta)
        else:
            layout = check_update(update.delta, update.num_examples, self._layout)
        self._layout = layout
        # Copy: the caller may reuse its buffers, and the round must see what was accepted.
        self._results.append(([NamedArray(n, np.array(a)) for n, a in update.delta], int(update.num_examples)))

    @property
    def count(self) -> int:
        return len(self._results)

    def finish(self) -> Weights:
        if not self._results:
            raise CoordinatorError("no accepted update to aggregate")
        assert self._layout is not None
        return apply_delta(self._global, self._combine(self._layout, self._results), self._server_lr)


class FedMedian(FedAvg):
    """FedAvg selection; new global = ``global + server_lr * coordinate_median(deltas)``.

    Buffers the whole round: memory O(clients x model).
    """

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _BufferedAggregation(global_weights, self.server_lr, _median)


class FedTrimmedAvg(FedAvg):
    """FedAvg selection; new global = ``global + server_lr * trimmed_mean(deltas, beta)``.

    A trimmed mean of ``n`` updates trims ``floor(beta * n)`` from each end,
    so with too few updates it trims nothing and is a plain mean, no longer
    robust. A round may close with as few as ``min_fit`` updates, so the
    check is made on ``min_fit`` when the strategy is built: ``min_fit``
    (and ``min_available``) default to the fewest updates that trim one
    from each end, :func:`min_trimmed_updates` (5 for ``beta = 0.2``), and a
    smaller ``min_fit`` is refused. A round that still ends up with fewer
    updates (rejected or lost ones) is refused at aggregation rather than
    averaged: :class:`AggregationError`, and the global model stays as it
    was. ``beta = 0`` is an explicit plain mean and accepts any count.
    Buffers the whole round: memory O(clients x model).
    """

    def __init__(
        self, *, beta: float = 0.2, min_fit: int | None = None, min_available: int | None = None, **fedavg_kwargs: Any
    ):
        check_range("beta", beta, TRIM_FRACTION, rule=_BETA_RULE)
        needed = min_trimmed_updates(beta) if beta > 0 else 1
        min_fit = needed if min_fit is None else min_fit
        min_available = max(min_fit, needed) if min_available is None else min_available
        if min_fit < needed:
            raise StrategyConfigError(_untrimmed_message(beta, min_fit, needed))
        super().__init__(min_fit=min_fit, min_available=min_available, **fedavg_kwargs)
        self.beta = beta

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _BufferedAggregation(global_weights, self.server_lr, functools.partial(_trimmed_mean, beta=self.beta))


class Krum(FedAvg):
    """FedAvg selection; new global = ``global + server_lr * krum(deltas, num_byzantine, multi)``.

    Krum needs more than ``2f + 2`` updates per round, so ``min_fit`` and
    ``min_available`` default to ``2f + 3`` and may not be set lower.
    Buffers the whole round: memory O(clients x model).
    """

    def __init__(
        self,
        *,
        num_byzantine: int = 1,
        multi: int = 1,
        weighted: bool = False,
        min_fit: int | None = None,
        min_available: int | None = None,
        **fedavg_kwargs: Any,
    ):
        check_count("num_byzantine", num_byzantine, 0)
        check_count("multi", multi, 1)
        needed = 2 * num_byzantine + 3
        min_fit = needed if min_fit is None else min_fit
        min_available = max(min_fit, needed) if min_available is None else min_available
        if min_fit < needed:
            raise StrategyConfigError(
                f"Krum with num_byzantine={num_byzantine} needs min_fit >= 2f + 3 = {needed}, got {min_fit}"
            )
        super().__init__(min_fit=min_fit, min_available=min_available, **fedavg_kwargs)
        self.num_byzantine, self.multi, self.weighted = num_byzantine, multi, weighted

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        rule = functools.partial(_krum, f=self.num_byzantine, multi=self.multi, weighted=self.weighted)
        return _BufferedAggregation(global_weights, self.server_lr, rule)


# -- helpers ---------------------------------------------------------------------


def _untrimmed_message(beta: float, min_fit: int, needed: int) -> str:
    larger = f", or a larger beta (--trim-beta >= {1 / min_fit:.3g}, below 0.5)" if min_fit >= 3 else ""
    return (
        f"a trimmed mean with beta={beta:g} of min_fit={min_fit} updates trims floor({beta:g} x {min_fit}) = 0 "
        f"from each end and is a plain, non-robust mean; aggregate at least {needed} clients per round "
        f"(--min-fit >= {needed}){larger}"
    )


def _checked(results: Results) -> Layout:
    """Check every result as one update (naming the bad one) and return their common layout."""
    if not results:
        raise AggregationError("no client results to aggregate; wait for at least one update")
    layout: Layout | None = None
    for i, (weights, num_examples) in enumerate(results):
        try:
            layout = check_update(weights, num_examples, layout)
        except AggregationError as exc:
            raise AggregationError(f"result {i}: {exc}") from exc
    assert layout is not None
    return layout


def _stack(layout: Layout, results: Results) -> list[np.ndarray]:
    """Each tensor of checked ``results`` stacked over clients as float64, shape ``(n, *shape)``."""
    return [np.stack([np.asarray(w[t].array, np.float64) for w, _ in results]) for t in range(len(layout))]


def _pack(layout: Layout, arrays: list[np.ndarray]) -> Weights:
    return [NamedArray(spec.name, np.asarray(a).astype(spec.dtype)) for spec, a in zip(layout, arrays, strict=True)]
