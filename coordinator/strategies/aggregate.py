"""FedAvg: weighted averages of client updates, in plain NumPy.

Everything here works on :data:`~edge_client.weights.Weights` and example
counts and knows nothing of transport or rounds. Sums are kept in float64
whatever the tensors' dtype, so the result does not depend on how many
clients reported or in which order (up to float64 rounding), and results
come back in the dtype the clients sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.errors import AggregationError
from edge_client.weights import NamedArray, TensorSpec, Weights

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

    def add(self, weights: Weights, num_examples: int) -> None:
        """Fold in one client's update, trained on ``num_examples`` examples."""
        check_num_examples(num_examples)
        layout = layout_of(weights)
        if self._layout is not None:
            check_same_layout(layout, self._layout)
        check_finite(weights)
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
        self._layout: tuple[TensorSpec, ...] | None = None
        self._sums: list[np.ndarray] = []
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
    layout = layout_of(global_weights)
    check_same_layout(layout_of(delta), layout, dtypes=False)
    check_finite(delta)
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


def check_num_examples(num_examples: int) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise AggregationError(f"num_examples must be an int, got {type(num_examples).__name__}")
    if num_examples <= 0:
        raise AggregationError(
            f"num_examples must be positive, got {num_examples}; a client that trained on no data has no update"
        )


def layout_of(weights: Weights) -> tuple[TensorSpec, ...]:
    """Names, shapes and dtypes of ``weights``; floating-point tensors with unique names only."""
    layout = []
    for item in weights:
        name, array = item
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            kind = getattr(array, "dtype", type(array).__name__)
            raise AggregationError(f"tensor {name!r} is {kind}; only floating-point NumPy arrays can be averaged")
        layout.append(TensorSpec(name, tuple(array.shape), array.dtype.name))
    names = [spec.name for spec in layout]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise AggregationError(f"tensor names must be unique within an update, repeated: {duplicates}")
    return tuple(layout)


def check_same_layout(got: tuple[TensorSpec, ...], expected: tuple[TensorSpec, ...], dtypes: bool = True) -> None:
    if len(got) != len(expected):
        raise AggregationError(
            f"update has {len(got)} tensors, expected {len(expected)}; all clients must train the same model"
        )
    for g, e in zip(got, expected, strict=True):
        if g.name != e.name:
            raise AggregationError(f"expected tensor {e.name!r} at this position, got {g.name!r}")
        if g.shape != e.shape:
            raise AggregationError(f"tensor {g.name!r}: shape {g.shape} != expected {e.shape}")
        if dtypes and g.dtype != e.dtype:
            raise AggregationError(f"tensor {g.name!r}: dtype {g.dtype} != expected {e.dtype}")


def check_finite(weights: Weights) -> None:
    for name, array in weights:
        if not np.isfinite(array).all():
            raise AggregationError(f"tensor {name!r} contains NaN or Inf; the client's training diverged")


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
