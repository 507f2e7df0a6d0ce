"""FedAvg aggregation: agreement with a NumPy reference, streaming, rejection and memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import AggregationError
from coordinator.strategies.aggregate import StreamingAverage, apply_delta, finish_or_keep, weighted_average
from edge_client.weights import NamedArray

LAYOUT = (("conv/kernel", (3, 3, 1, 4)), ("conv/bias", (4,)), ("dense/kernel", (36, 10)), ("dense/bias", (10,)))

# float32 results are the float64 mean rounded once, so they sit within half an
# ulp (~6e-8 relative) of the exact mean; 1e-6 leaves room for a differently
# ordered float64 reference while still catching any wrong weighting.
RTOL, ATOL = 1e-6, 1e-7


def random_weights(rng: np.random.Generator, layout=LAYOUT, dtype=np.float32) -> list[NamedArray]:
    return [NamedArray(name, rng.normal(size=shape).astype(dtype)) for name, shape in layout]


def random_results(seed: int, num_clients: int) -> list[tuple[list[NamedArray], int]]:
    rng = np.random.default_rng(seed)
    return [(random_weights(rng), int(rng.integers(1, 5000))) for _ in range(num_clients)]


def reference_average(results) -> dict[str, np.ndarray]:
    """sum_k n_k w_k / sum_k n_k per tensor, written as a float64 tensordot."""
    counts = np.array([n for _, n in results], np.float64)
    out = {}
    for i, (name, _) in enumerate(results[0][0]):
        stacked = np.stack([w[i].array.astype(np.float64) for w, _ in results])
        out[name] = np.tensordot(counts, stacked, axes=1) / counts.sum()
    return out


def state_of(average: StreamingAverage) -> tuple:
    """Everything observable about an aggregate, copied."""
    result = [(n, a.copy()) for n, a in average.result()] if average.count else None
    return average.count, average.total_examples, result


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[:2] == b[:2]
    assert (a[2] is None) == (b[2] is None)
    for (na, xa), (nb, xb) in zip(a[2] or [], b[2] or [], strict=True):
        assert na == nb
        np.testing.assert_array_equal(xa, xb)


# -- weighted_average ---------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_clients=st.integers(1, 12))
def test_weighted_average_matches_numpy_reference(seed, num_clients):
    results = random_results(seed, num_clients)
    expected = reference_average(results)
    got = weighted_average(results)
    assert [n for n, _ in got] == [name for name, _ in LAYOUT]
    for name, array in got:
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, expected[name], rtol=RTOL, atol=ATOL)


def test_weighted_average_weights_by_example_count():
    # Hand-computable: (1 * 0 + 3 * 4) / 4 = 3.
    a = [NamedArray("w", np.zeros(3, np.float32))]
    b = [NamedArray("w", np.full(3, 4.0, np.float32))]
    np.testing.assert_array_equal(weighted_average([(a, 1), (b, 3)])[0].array, [3.0, 3.0, 3.0])


def test_single_client_is_identity():
    (weights, n), *_ = random_results(3, 1)
    got = weighted_average([(weights, n)])
    for (name, array), (ref_name, ref) in zip(got, weights, strict=True):
        assert name == ref_name
        assert array.dtype == ref.dtype
        np.testing.assert_array_equal(array, ref)  # n * w / n is exact in float64


def test_identical_updates_average_to_themselves_exactly():
    weights = random_weights(np.random.default_rng(4))
    got = weighted_average([(weights, n) for n in (1, 7, 300, 12345)])
    for (_, array), (_, ref) in zip(got, weights, strict=True):
        np.testing.assert_array_equal(array, ref)


def test_order_does_not_matter():
    results = random_results(5, 9)
    forward = weighted_average(results)
    shuffled = [results[i] for i in np.random.default_rng(6).permutation(len(results))]
    for (_, a), (_, b) in zip(forward, weighted_average(shuffled), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_sums_are_kept_in_float64():
    # A float32 running sum of 2,000 updates of 0.1 drifts to ~0.099998 (hundreds of
    # ulps); in float64 every n * w and partial sum is exact, so the mean is 0.1f exactly.
    average = StreamingAverage()
    for _ in range(2000):
        average.add([NamedArray("w", np.full(3, 0.1, np.float32))], 3)
    np.testing.assert_array_equal(average.result()[0].array, np.full(3, 0.1, np.float32))


def test_float64_models_stay_float64():
    rng = np.random.default_rng(7)
    results = [(random_weights(rng, dtype=np.float64), n) for n in (2, 5)]
    expected = reference_average(results)
    for name, array in weighted_average(results):
        assert array.dtype == np.float64
        np.testing.assert_allclose(array, expected[name], rtol=1e-12)


def test_weighted_average_rejects_empty_and_says_which_result():
    with pytest.raises(AggregationError, match="no client results"):
        weighted_average([])
    results = random_results(8, 3)
    results[2] = (results[2][0][:-1], results[2][1])
    with pytest.raises(AggregationError, match=r"result 2: update has 3 tensors, expected 4"):
        weighted_average(results)


# -- StreamingAverage -----------------------------------------------------------------


def test_streaming_equals_batch_and_counts():
    results = random_results(9, 6)
    average = StreamingAverage()
    for weights, n in results:
        average.add(weights, n)
    assert average.count == 6
    assert average.total_examples == sum(n for _, n in results)
    for (na, a), (nb, b) in zip(average.result(), weighted_average(results), strict=True):
        assert na == nb
        np.testing.assert_array_equal(a, b)


def test_streaming_does_not_keep_or_alias_updates():
    results = random_results(10, 3)
    expected = weighted_average(results)
    average = StreamingAverage()
    for weights, n in results:
        average.add(weights, n)
        for _, array in weights:
            array[...] = np.nan  # the caller reuses its buffers
    for (_, got), (_, ref) in zip(average.result(), expected, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_reset_starts_a_new_round_with_a_new_layout():
    average = StreamingAverage()
    average.add(random_weights(np.random.default_rng(11)), 5)
    average.reset()
    assert (average.count, average.total_examples) == (0, 0)
    with pytest.raises(AggregationError, match="no updates have been added"):
        average.result()
    other = [NamedArray("only", np.arange(4, dtype=np.float32))]
    average.add(other, 2)  # a different model is fine after a reset
    np.testing.assert_array_equal(average.result()[0].array, other[0].array)


def _bad_updates(good: list[NamedArray]) -> dict[str, tuple[list[NamedArray], int, str]]:
    renamed = [NamedArray("other", good[0].array), *good[1:]]
    reshaped = [NamedArray(good[0].name, good[0].array.reshape(-1)), *good[1:]]
    retyped = [NamedArray(good[0].name, good[0].array.astype(np.float64)), *good[1:]]
    swapped = [good[1], good[0], *good[2:]]
    nan = [*good[:-1], NamedArray(good[-1].name, np.where(np.arange(10) == 9, np.nan, good[-1].array))]
    inf = [*good[:-1], NamedArray(good[-1].name, np.full(10, np.inf, np.float32))]
    ints = [*good[:-1], NamedArray(good[-1].name, np.arange(10, dtype=np.int32))]
    return {
        "name": (renamed, 3, "expected tensor 'conv/kernel' at this position, got 'other'"),
        "order": (swapped, 3, "expected tensor 'conv/kernel' at this position, got 'conv/bias'"),
        "shape": (reshaped, 3, r"shape \(36,\) != expected \(3, 3, 1, 4\)"),
        "dtype": (retyped, 3, "dtype float64 != expected float32"),
        "missing": (good[:-1], 3, "update has 3 tensors, expected 4"),
        "extra": ([*good, NamedArray("x", np.zeros(1, np.float32))], 3, "update has 5 tensors"),
        "nan": (nan, 3, "'dense/bias' contains NaN or Inf"),
        "inf": (inf, 3, "'dense/bias' contains NaN or Inf"),
        "integer tensor": (ints, 3, "only floating-point"),
        "zero examples": (good, 0, "num_examples must be positive"),
        "negative examples": (good, -4, "num_examples must be positive"),
        "float examples": (good, 2.5, "num_examples must be an int"),
        "bool examples": (good, True, "num_examples must be an int"),
    }


@pytest.mark.parametrize("case", list(_bad_updates(random_weights(np.random.default_rng(0)))))
def test_rejected_update_leaves_the_aggregate_unchanged(case):
    rng = np.random.default_rng(12)
    average = StreamingAverage()
    average.add(random_weights(rng), 10)
    average.add(random_weights(rng), 20)
    before = state_of(average)
    weights, n, message = _bad_updates(random_weights(rng))[case]
    with pytest.raises(AggregationError, match=message):
        average.add(weights, n)
    assert_same_state(state_of(average), before)
    # And the aggregate still works: a good update lands as if nothing had happened.
    extra = random_weights(rng)
    average.add(extra, 30)
    assert average.count == 3


@pytest.mark.parametrize("case", ["nan", "zero examples", "integer tensor"])
def test_rejected_first_update_leaves_the_aggregate_empty(case):
    weights, n, message = _bad_updates(random_weights(np.random.default_rng(13)))[case]
    average = StreamingAverage()
    with pytest.raises(AggregationError, match=message):
        average.add(weights, n)
    assert (average.count, average.total_examples) == (0, 0)
    other = [NamedArray("w", np.ones(2, np.float32))]  # no layout was fixed by the bad update
    average.add(other, 1)
    np.testing.assert_array_equal(average.result()[0].array, [1.0, 1.0])


def test_duplicate_names_are_rejected():
    weights = [NamedArray("w", np.ones(2, np.float32)), NamedArray("w", np.ones(2, np.float32))]
    with pytest.raises(AggregationError, match=r"repeated: \['w'\]"):
        StreamingAverage().add(weights, 1)


def _model_layout(num_params: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return (("dense/kernel", (1000, num_params // 1000 - 1)), ("dense/bias", (1000,)))


def _peak_bytes_streaming(num_updates: int, layout) -> int:
    rng = np.random.default_rng(14)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        average = StreamingAverage()
        for _ in range(num_updates):
            average.add(random_weights(rng, layout), int(rng.integers(1, 100)))  # made here, dropped after add
        average.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_clients():
    layout = _model_layout(1_000_000)
    update_bytes = sum(4 * int(np.prod(shape)) for _, shape in layout)  # float32
    assert 3.9e6 < update_bytes < 4.1e6
    peak_5 = _peak_bytes_streaming(5, layout)
    peak_40 = _peak_bytes_streaming(40, layout)
    # Both peaks are the same working set: float64 sums (2 updates' worth), the update
    # being added, the float64 temporary of one tensor and the result. Keeping even one
    # update per client would add 35 updates (~140 MB) to peak_40; one update's size
    # absorbs allocator and tracemalloc bookkeeping noise without hiding such a leak.
    assert peak_40 <= peak_5 + update_bytes, (peak_5, peak_40)
    assert peak_5 >= 2 * update_bytes  # sanity: tracemalloc does see NumPy's buffers


# -- apply_delta ---------------------------------------------------------------------


def test_apply_delta_matches_reference_and_keeps_dtype():
    rng = np.random.default_rng(15)
    global_weights, delta = random_weights(rng), random_weights(rng)
    for scale in (1.0, 0.5, -2.0):
        got = apply_delta(global_weights, delta, scale)
        for (name, array), (g_name, g), (_, d) in zip(got, global_weights, delta, strict=True):
            assert name == g_name and array.dtype == np.float32
            np.testing.assert_allclose(array, g.astype(np.float64) + scale * d.astype(np.float64), rtol=RTOL, atol=ATOL)


def test_mean_delta_applied_to_global_is_fedavg_of_local_models():
    rng = np.random.default_rng(16)
    global_weights = random_weights(rng, dtype=np.float64)
    locals_ = [(random_weights(rng, dtype=np.float64), n) for n in (3, 8, 1)]
    deltas = [
        ([NamedArray(n, w - g) for (n, w), (_, g) in zip(lw, global_weights, strict=True)], k) for lw, k in locals_
    ]
    via_delta = apply_delta(global_weights, weighted_average(deltas))
    for (_, a), (_, b) in zip(via_delta, weighted_average(locals_), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_apply_delta_zero_scale_and_errors():
    rng = np.random.default_rng(17)
    global_weights, delta = random_weights(rng), random_weights(rng)
    for (_, a), (_, g) in zip(apply_delta(global_weights, delta, 0.0), global_weights, strict=True):
        np.testing.assert_array_equal(a, g)
    with pytest.raises(AggregationError, match="shape"):
        apply_delta(global_weights, [NamedArray(delta[0].name, delta[0].array.ravel()), *delta[1:]])
    with pytest.raises(AggregationError, match="NaN or Inf"):
        apply_delta(global_weights, [*delta[:-1], NamedArray(delta[-1].name, np.full(10, np.nan, np.float32))])
    with pytest.raises(AggregationError, match="scale must be a finite number"):
        apply_delta(global_weights, delta, float("inf"))


def test_apply_delta_refuses_a_result_that_overflows_float32():
    # Both inputs are finite float32, but their sum is beyond float32's range (max ~3.4e38).
    big = np.finfo(np.float32).max
    global_weights = [NamedArray("w", np.array([big, 1.0], np.float32)), NamedArray("b", np.zeros(2, np.float32))]
    delta = [NamedArray("w", np.array([big, 0.0], np.float32)), NamedArray("b", np.ones(2, np.float32))]
    before = [a.copy() for _, a in global_weights]
    with pytest.raises(AggregationError, match="'w' of the new global model would be NaN or Inf"):
        apply_delta(global_weights, delta)
    with pytest.raises(AggregationError, match="NaN or Inf"):
        apply_delta(global_weights, [NamedArray("w", np.ones(2, np.float32)), delta[1]], scale=1e300)
    for (_, a), b in zip(global_weights, before, strict=True):
        np.testing.assert_array_equal(a, b)  # the caller's global model is untouched
    # The same values in float64 do not overflow: the check is on the result, not a magnitude cap.
    wide = [NamedArray(n, a.astype(np.float64)) for n, a in global_weights]
    assert np.isfinite(apply_delta(wide, delta)[0].array).all()


def test_finish_or_keep_returns_the_current_model_with_the_reason_of_a_refusal():
    current = [NamedArray("w", np.ones(3, np.float32))]

    class Refusing:
        def finish(self):
            raise AggregationError("would overflow")

    class Finishing:
        def finish(self):
            return [NamedArray("w", np.zeros(3, np.float32))]

    assert finish_or_keep(Refusing(), current, 3) == (current, "would overflow")
    weights, reason = finish_or_keep(Finishing(), current, 3)
    assert reason is None and weights[0].array.tolist() == [0.0, 0.0, 0.0]


# -- validated once ------------------------------------------------------------------


def _frame_update(rng: np.random.Generator, client: str, n: int):
    """An update as the coordinator receives it: encoded, decoded and validated against the model."""
    from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
    from edge_client.weights import TensorSpec

    specs = [TensorSpec(name, shape, "float32") for name, shape in LAYOUT]
    delta = random_weights(rng)
    frame = decode_frame(encode_frame(Frame("update", 1, "ab" * 32, delta, client_id=client, num_examples=n)))
    validate_frame(frame, specs, "ab" * 32, "update", current_round=1)
    return frame


def _count_finiteness_checks(monkeypatch) -> list[str]:
    """Every finiteness check, validate_frame's or an aggregation's, appends the first tensor's name here."""
    import coordinator.strategies.aggregate as aggregate
    import edge_client.weights as weights

    calls: list[str] = []
    original = weights.check_finite

    def spy(tensors, **kwargs):
        calls.append(tensors[0].name)
        return original(tensors, **kwargs)

    monkeypatch.setattr(weights, "check_finite", spy)  # check_weights, hence validate_frame
    monkeypatch.setattr(aggregate, "check_finite", spy)  # check_update and apply_delta
    return calls


def _aggregations():
    from coordinator.strategies import DifferentialPrivacy, FedAdam, FedAvg, FedMedian, Krum

    return {
        "fedavg": FedAvg(),
        "fedadam": FedAdam(),
        "median": FedMedian(),
        "krum": Krum(num_byzantine=0),
        "dp": DifferentialPrivacy(FedAvg(), clip_norm=100.0, noise_multiplier=0.0),
    }


@pytest.mark.parametrize("name", list(_aggregations()))
def test_an_update_from_a_validated_frame_is_checked_once(name, monkeypatch):
    from coordinator.strategies import ClientUpdate

    rng = np.random.default_rng(20)
    global_weights = random_weights(rng)
    calls = _count_finiteness_checks(monkeypatch)
    frames = [_frame_update(rng, f"c{k}", 10 * (k + 1)) for k in range(3)]
    assert len(calls) == 3  # validate_frame, once per frame
    for validated, expect_checks in ((True, 0), (False, 3)):
        calls.clear()
        aggregation = _aggregations()[name].begin_aggregation(1, global_weights)  # fresh: FedAdam has state
        for f in frames:
            aggregation.add(ClientUpdate(f.client_id, f.tensors, f.num_examples, dict(f.metrics), validated=validated))
        assert len(calls) == expect_checks, calls
        result = aggregation.finish()
        # finish() checks the round's mean delta (apply_delta) once per round at most, never each update again.
        assert len(calls) <= expect_checks + 2, calls
        if validated:
            trusted = result
    for (_, a), (_, b) in zip(trusted, result, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_validated_adds_sum_exactly_as_checked_ones():
    results = random_results(21, 5)
    checked, trusted = StreamingAverage(), StreamingAverage()
    for weights, n in results:
        checked.add(weights, n)
        trusted.add(weights, n, validated=True)
    assert trusted.layout == checked.layout and [s.name for s in checked.layout] == [n for n, _ in LAYOUT]
    for (_, a), (_, b) in zip(checked.result(), trusted.result(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unvalidated_updates_are_still_refused_with_a_hint():
    from coordinator.strategies.aggregate import check_update

    good = random_weights(np.random.default_rng(22))
    nan = [*good[:-1], NamedArray(good[-1].name, np.full(10, np.nan, np.float32))]
    with pytest.raises(AggregationError, match="'dense/bias' contains NaN or Inf; the client's training diverged"):
        check_update(nan, 1)
    layout = check_update(good, 1)
    with pytest.raises(AggregationError, match="update has 3 tensors, expected 4; all clients must train the same"):
        check_update(good[:-1], 1, layout)
