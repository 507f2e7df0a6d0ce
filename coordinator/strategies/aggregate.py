"""FedAvg: weighted averages of client updates, in plain NumPy.

Everything here works on :data:`~edge_client.weights.Weights` and example
counts and knows nothing of transport or rounds. Sums are kept in float64
whatever the tensors' dtype, so the result does not depend on how many
clients reported or in which order (up to float64 rounding), and results
come back in the dtype the clients sent.

Each update is validated once. One that arrives as a frame is checked by
:func:`edge_client.frames.validate_frame` against the model's manifest
(names, order, shapes, dtypes, finite values, ``num_examples >= 1``) and
reaches an aggregation as a ``ClientUpdate`` with ``validated=True``; the
strategies' aggregations pass that on (``StreamingAverage.add(...,
validated=True)``) and read its values only to sum them. The check stays at
the frame, not here, because only the frame boundary knows the model (an
aggregation can only compare updates with one another) and because boards
run the same check on the global frames they receive. Used directly from
Python, :func:`weighted_average`, :class:`StreamingAverage` and the robust
functions check every input themselves, with the checks of
:mod:`edge_client.weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.errors import AggregationError
from edge_client.errors import WeightsError
from edge_client.weights import NamedArray, TensorSpec, Weights, check_finite, check_layout, layout_of

log = logging.getLogger(__name__)


def weighted_average(results: Sequence[tuple[Weights, int]]) -> Weights:
    """FedAvg of ``(weights, num_examples)`` pairs: ``sum n_k w_k / sum n_k``.

    Every update must have the same tensor names, shapes and dtypes, finite
    values and a positive example count; otherwise :class:`AggregationError`.
    """
    if not results:
        raise AggregationError("no client results to aggregate; wait for at least one update")
    average = StreamingAverage()
    for i, (weights, num_examples) in enumerate(results):
        try:
            average.add(weights, num_examples)
        except AggregationError as exc:
            raise AggregationError(f"result {i}: {exc}") from exc
    return average.result()


class StreamingAverage:
    """FedAvg that folds updates in as they arrive and never keeps them.

    Memory is one float64 running sum per tensor, however many clients
    report. The first update fixes the layout (names, shapes, dtypes); every
    later one is checked against it, and checked entirely before the sums
    are touched, so a rejected update leaves the aggregate exactly as it was.
    Not thread-safe: callers that receive updates on several threads must
    serialise calls to :meth:`add` and :meth:`result`.
    """

    # Set by reset().
    _layout: tuple[TensorSpec, ...] | None
    _sums: list[np.ndarray]
    _count: int
    _total_examples: int

    def __init__(self) -> None:
        self.reset()

    @property
    def count(self) -> int:
        """Number of updates accepted since creation or the last :meth:`reset`."""
        return self._count

    @property
    def total_examples(self) -> int:
        """Sum of the example counts of the accepted updates."""
        return self._total_examples

    @property
    def layout(self) -> tuple[TensorSpec, ...] | None:
        """Names, shapes and dtypes fixed by the first update; None before it."""
        return self._layout

    def add(self, weights: Weights, num_examples: int, *, validated: bool = False) -> None:
        """Fold in one client's update, trained on ``num_examples`` examples.

        ``validated=True`` skips the checks, for an update already checked
        against the model (see :attr:`ClientUpdate.validated
        <coordinator.strategies.base.ClientUpdate.validated>`): the strategies'
        aggregations pass it for updates from frames, so each update's values
        are read once to check them and once to sum them, not twice to check.
        """
        if not validated:
            layout = check_update(weights, num_examples, self._layout)
        else:  # checked at the frame boundary; only the first update's layout is read, for the sums' shapes
            layout = self._layout or layout_of_update(weights)
        # Validation is complete: only from here on is any state modified.
        if self._layout is None:
            self._layout = layout
            self._sums = [np.zeros(spec.shape, np.float64) for spec in layout]
        for total, (_, array) in zip(self._sums, weights, strict=True):
            # One float64 temporary per tensor; n * w is exact for float32 w and n < 2**29.
            total += np.multiply(array, float(num_examples), dtype=np.float64)
        self._count += 1
        self._total_examples += int(num_examples)

    def result(self) -> Weights:
        """The weighted mean of the updates so far, in the clients' dtypes."""
        if self._layout is None:
            raise AggregationError("no updates have been added; call add() at least once before result()")
        return [
            NamedArray(spec.name, (total / self._total_examples).astype(spec.dtype))
            for spec, total in zip(self._layout, self._sums, strict=True)
        ]

    def reset(self) -> None:
        """Forget every update and the layout, ready for the next round."""
        self._layout = None
        self._sums = []
        self._count = 0
        self._total_examples = 0


def apply_delta(global_weights: Weights, delta: Weights, scale: float = 1.0) -> Weights:
    """``global + scale * delta``: the new global model from a mean client delta.

    Clients send ``local - global``; averaging those deltas and applying them
    here with ``scale = 1`` is FedAvg, and other scales give a server
    learning rate. The result has the global weights' dtypes.

    Finite inputs can still give a non-finite model (a sum beyond float32's
    range rounds to Inf), so the result is checked too: a non-finite global
    model is never returned, :class:`AggregationError` is raised instead and
    the caller keeps its current global model.
    """
    if not np.isfinite(scale):
        raise AggregationError(f"scale must be a finite number, got {scale!r}")
    try:
        layout = layout_of(global_weights, floating=True)
        check_layout(layout_of(delta, floating=True), layout, dtypes=False, subject="delta")
        check_finite(delta)
    except WeightsError as exc:
        raise AggregationError(str(exc)) from None
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below, not warned about
        result = [
            NamedArray(spec.name, (np.asarray(g, np.float64) + scale * np.asarray(d, np.float64)).astype(spec.dtype))
            for spec, (_, g), (_, d) in zip(layout, global_weights, delta, strict=True)
        ]
    for name, array in result:
        if not np.isfinite(array).all():
            raise AggregationError(
                f"tensor {name!r} of the new global model would be NaN or Inf (overflow of {array.dtype}); "
                "the global model is left unchanged: lower the server or client learning rate"
            )
    return result


# -- validation ------------------------------------------------------------------
# The checks themselves are edge_client.weights' (the same ones validate_frame runs on
# frames); here they raise AggregationError and say what the client should do.


def check_num_examples(num_examples: int) -> None:
    """Raise :class:`AggregationError` unless ``num_examples`` is a positive int."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise AggregationError(f"num_examples must be an int, got {type(num_examples).__name__}")
    if num_examples <= 0:
        raise AggregationError(
            f"num_examples must be positive, got {num_examples}; a client that trained on no data has no update"
        )


def check_update(
    weights: Weights, num_examples: int, layout: tuple[TensorSpec, ...] | None = None
) -> tuple[TensorSpec, ...]:
    """Check one update for aggregation and return its layout; raise :class:`AggregationError`.

    Floating-point NumPy tensors with unique names, ``layout``'s names,
    order, shapes and dtypes when one is given (the round's first update
    fixes it), finite values and a positive int ``num_examples``. A custom
    :class:`~coordinator.strategies.base.Aggregation` can call it for
    updates that are not ``validated``.
    """
    check_num_examples(num_examples)
    try:
        got = layout_of(weights, floating=True)
        if layout is not None:
            check_layout(got, layout, subject="update", hint="all clients must train the same model")
        check_finite(weights, hint="the client's training diverged")
    except WeightsError as exc:
        raise AggregationError(str(exc)) from None
    return got


def layout_of_update(weights: Weights) -> tuple[TensorSpec, ...]:
    """The layout of an update (names, shapes, float dtypes), without reading its values."""
    try:
        return layout_of(weights, floating=True)
    except WeightsError as exc:
        raise AggregationError(str(exc)) from None


def finish_or_keep(aggregation: Any, current: Weights, round_number: int) -> tuple[Weights, str | None]:
    """The round's new global model, or ``current`` and the reason when the aggregate is refused.

    A refused aggregate (non-finite, too few updates for a robust rule) ends
    the round with the global model unchanged instead of stopping the
    federation: the next round trains afresh from the last good model.
    """
    try:
        return aggregation.finish(), None
    except AggregationError as exc:
        log.error("round %d: aggregate refused (%s); the global model stays as it was", round_number, exc)
        return current, str(exc)
