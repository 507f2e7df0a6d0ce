"""Robust aggregators: agreement with NumPy/loop references, Byzantine resistance and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import AggregationError, CoordinatorError
from coordinator.strategies import ClientUpdate, FedAvg
from coordinator.strategies.robust import (
    FedMedian,
    FedTrimmedAvg,
    Krum,
    coordinate_median,
    krum,
    min_trimmed_updates,
    trimmed_mean,
)
from edge_client.weights import NamedArray

LAYOUT = (("conv/kernel", (2, 2, 1, 3)), ("conv/bias", (3,)), ("dense/kernel", (4, 2)), ("dense/bias", (2,)))


def random_weights(rng: np.random.Generator, scale: float = 1.0, shift: float = 0.0) -> list[NamedArray]:
    return [NamedArray(name, (shift + scale * rng.normal(size=shape)).astype(np.float32)) for name, shape in LAYOUT]


def random_results(seed: int, num_clients: int) -> list[tuple[list[NamedArray], int]]:
    rng = np.random.default_rng(seed)
    return [(random_weights(rng), int(rng.integers(1, 100))) for _ in range(num_clients)]


def stacked(results, i: int) -> np.ndarray:
    return np.stack([w[i].array.astype(np.float64) for w, _ in results])


def flat(weights) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for _, a in weights])


def assert_matches(got, expected: list[np.ndarray], rtol=1e-6, atol=1e-7) -> None:
    assert [n for n, _ in got] == [n for n, _ in LAYOUT]
    for (_, array), ref in zip(got, expected, strict=True):
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, ref, rtol=rtol, atol=atol)


# -- coordinate_median ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_clients=st.integers(1, 10))
def test_median_matches_numpy(seed, num_clients):
    results = random_results(seed, num_clients)
    assert_matches(coordinate_median(results), [np.median(stacked(results, i), axis=0) for i in range(len(LAYOUT))])


def test_median_odd_and_even_by_hand():
    make = lambda *xs: [([NamedArray("w", np.array([x], np.float32))], 1) for x in xs]  # noqa: E731
    assert coordinate_median(make(5.0, -1.0, 100.0))[0].array.tolist() == [5.0]
    assert coordinate_median(make(5.0, -1.0, 100.0, 1.0))[0].array.tolist() == [3.0]
    # Example counts are ignored: a huge claimed count buys nothing.
    results = make(0.0, 1.0, 2.0)
    results[2] = (results[2][0], 10**6)
    assert coordinate_median(results)[0].array.tolist() == [1.0]


# -- trimmed_mean ---------------------------------------------------------------------------


def loop_trimmed_mean(results, beta: float) -> list[np.ndarray]:
    """Coordinate by coordinate: sort the n values, drop int(beta n) from each end, average the rest."""
    n = len(results)
    k = int(beta * n)
    out = []
    for i, (_, shape) in enumerate(LAYOUT):
        values = stacked(results, i).reshape(n, -1)
        column_means = [float(np.mean(sorted(values[:, j])[k : n - k])) for j in range(values.shape[1])]
        out.append(np.array(column_means).reshape(shape))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_clients=st.integers(1, 10), beta=st.floats(0.0, 0.49))
def test_trimmed_mean_matches_loop_reference(seed, num_clients, beta):
    results = random_results(seed, num_clients)
    if beta > 0 and int(beta * num_clients) == 0:  # would trim nothing: refused, never a silent plain mean
        with pytest.raises(AggregationError, match="trims nothing"):
            trimmed_mean(results, beta)
        return
    assert_matches(trimmed_mean(results, beta), loop_trimmed_mean(results, beta))


def test_trimmed_mean_by_hand_and_beta_zero_is_plain_mean():
    make = lambda *xs: [([NamedArray("w", np.array([x], np.float32))], 7) for x in xs]  # noqa: E731
    assert trimmed_mean(make(1.0, 2.0, 3.0, 1000.0, -1000.0), 0.2)[0].array.tolist() == [2.0]
    assert trimmed_mean(make(1.0, 2.0, 3.0, 6.0), 0.0)[0].array.tolist() == [3.0]
    assert trimmed_mean(make(1.0, 2.0, 3.0, 6.0), 0.25)[0].array.tolist() == [2.5]


def test_trimmed_mean_that_would_trim_nothing_is_refused():
    make = lambda *xs: [([NamedArray("w", np.array([x], np.float32))], 7) for x in xs]  # noqa: E731
    # 0.2 * 4 = 0.8 rounds down: a "trimmed" mean of these would be the plain mean 251.5, moved by the outlier.
    with pytest.raises(AggregationError, match="beta=0.2 of 4 updates trims nothing.*at least 5 updates"):
        trimmed_mean(make(1.0, 2.0, 3.0, 1000.0), 0.2)
    assert trimmed_mean(make(1.0, 2.0, 3.0, 1000.0, 4.0), 0.2)[0].array.tolist() == [3.0]


@pytest.mark.parametrize(
    ("beta", "needed"), [(0.2, 5), (0.1, 10), (0.25, 4), (0.3, 4), (0.45, 3), (0.49, 3), (0.01, 100)]
)
def test_min_trimmed_updates_is_the_first_count_that_trims(beta, needed):
    assert min_trimmed_updates(beta) == needed
    assert int(beta * needed) >= 1 and int(beta * (needed - 1)) == 0


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1, float("nan"), True, "0.1"])
def test_trimmed_mean_rejects_bad_beta(beta):
    with pytest.raises(AggregationError, match="beta"):
        trimmed_mean(random_results(0, 5), beta)


# -- krum --------------------------------------------------------------------------------------


def loop_krum_scores(results, f: int) -> list[float]:
    n = len(results)
    vectors = [flat(w) for w, _ in results]
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return scores


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 3), extra=st.integers(1, 4), data=st.data())
def test_krum_matches_loop_reference(seed, f, extra, data):
    n = 2 * f + 2 + extra
    multi = data.draw(st.integers(1, n - f))
    results = random_results(seed, n)
    scores = loop_krum_scores(results, f)
    best = sorted(range(n), key=lambda i: (scores[i], i))[:multi]
    expected_plain = [np.mean([stacked(results, t)[i] for i in best], axis=0) for t in range(len(LAYOUT))]
    assert_matches(krum(results, f, multi), expected_plain)
    counts = np.array([results[i][1] for i in best], np.float64)
    expected_weighted = [
        sum(c * stacked(results, t)[i] for c, i in zip(counts, best, strict=True)) / counts.sum()
        for t in range(len(LAYOUT))
    ]
    assert_matches(krum(results, f, multi, weighted=True), expected_weighted)


def honest_plus_outlier(seed: int, honest: int, outlier_scale: float = 1e4):
    rng = np.random.default_rng(seed)
    results = [(random_weights(rng, scale=0.01, shift=0.5), int(rng.integers(1, 100))) for _ in range(honest)]
    results.insert(2, (random_weights(rng, scale=outlier_scale), 10**6))
    return results


def test_krum_picks_an_honest_update_over_a_huge_outlier():
    results = honest_plus_outlier(0, honest=5)
    got = flat(krum(results, num_byzantine=1))
    honest = [flat(w) for k, (w, _) in enumerate(results) if k != 2]
    assert any(np.array_equal(got, h) for h in honest)


def test_multi_krum_averages_the_honest_updates():
    results = honest_plus_outlier(1, honest=5)
    honest = [w for k, (w, _) in enumerate(results) if k != 2]
    expected = [np.mean([w[t].array.astype(np.float64) for w in honest], axis=0) for t in range(len(LAYOUT))]
    assert_matches(krum(results, num_byzantine=1, multi=5), expected)


def test_krum_ties_go_to_the_earliest():
    same = [([NamedArray("w", np.array([1.0, 2.0], np.float32))], 1)] * 4
    assert krum(same, 0)[0].array.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "n, f, multi, message",
    [
        (4, 1, 1, "needs more than 2f \\+ 2"),
        (2, 0, 1, "needs more than 2f \\+ 2"),
        (5, 1, 5, "exceeds n - f"),
        (5, -1, 1, "num_byzantine"),
        (5, 1, 0, "multi"),
        (5, 1.0, 1, "num_byzantine"),
    ],
)
def test_krum_rejects_bad_parameters(n, f, multi, message):
    with pytest.raises(AggregationError, match=message):
        krum(random_results(0, n), f, multi)


# -- shared validation ------------------------------------------------------------------------


@pytest.mark.parametrize("combine", [coordinate_median, lambda r: trimmed_mean(r, 0.1), lambda r: krum(r, 0)])
def test_bad_results_are_rejected(combine):
    with pytest.raises(AggregationError, match="no client results"):
        combine([])
    good = random_results(0, 3)
    mismatched = good + [([NamedArray("other", np.zeros(3, np.float32))] + good[0][0][1:], 1)]
    with pytest.raises(AggregationError, match="result 3"):
        combine(mismatched)
    bad_count = good + [(good[0][0], 0)]
    with pytest.raises(AggregationError, match="num_examples"):
        combine(bad_count)
    nan = [NamedArray(n, np.full_like(a, np.nan)) for n, a in good[0][0]]
    with pytest.raises(AggregationError, match="NaN"):
        combine(good + [(nan, 1)])


def test_results_keep_client_dtype():
    results = [([NamedArray("w", np.full(3, x, np.float16))], 1) for x in (1.0, 2.0, 3.0, 4.0, 5.0)]
    for combine in (coordinate_median, lambda r: trimmed_mean(r, 0.2), lambda r: krum(r, 1)):
        assert combine(results)[0].array.dtype == np.float16


# -- strategies ------------------------------------------------------------------------------


def aggregate(strategy, global_weights, results):
    aggregation = strategy.begin_aggregation(1, global_weights)
    for k, (delta, n) in enumerate(results):
        aggregation.add(ClientUpdate(f"c{k}", delta, n))
    assert aggregation.count == len(results)
    return aggregation.finish()


ROBUST = {
    "median": (lambda: FedMedian(), coordinate_median),
    "trimmed": (lambda: FedTrimmedAvg(beta=0.2), lambda r: trimmed_mean(r, 0.2)),
    "krum": (lambda: Krum(num_byzantine=1), lambda r: krum(r, 1)),
    "multikrum": (lambda: Krum(num_byzantine=1, multi=3), lambda r: krum(r, 1, 3)),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_strategy_is_global_plus_robust_delta(name):
    make, combine = ROBUST[name]
    results = random_results(4, 6)
    global_weights = random_weights(np.random.default_rng(5))
    got = aggregate(make(), global_weights, results)
    delta = combine(results)
    expected = [
        g.astype(np.float64) + d.astype(np.float64) for (_, g), (_, d) in zip(global_weights, delta, strict=True)
    ]
    assert_matches(got, expected)


@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("seed", range(3))
def test_single_byzantine_update_moves_fedavg_far_more(name, seed):
    results = honest_plus_outlier(seed, honest=6)
    global_weights = random_weights(np.random.default_rng(seed + 100))
    start = flat(global_weights)
    fedavg_move = np.linalg.norm(flat(aggregate(FedAvg(), global_weights, results)) - start)
    robust_move = np.linalg.norm(flat(aggregate(ROBUST[name][0](), global_weights, results)) - start)
    assert fedavg_move > 10 * robust_move


def test_strategy_rejected_update_leaves_buffer_unchanged():
    global_weights = random_weights(np.random.default_rng(0))
    aggregation = FedMedian().begin_aggregation(1, global_weights)
    results = random_results(1, 3)
    for k, (delta, n) in enumerate(results):
        aggregation.add(ClientUpdate(f"c{k}", delta, n))
    with pytest.raises(AggregationError):
        aggregation.add(ClientUpdate("bad", [NamedArray("w", np.zeros(2, np.float32))], 1))
    assert aggregation.count == 3
    expected = aggregate(FedMedian(), global_weights, results)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(aggregation.finish(), expected, strict=True))


def test_strategy_copies_updates():
    global_weights = random_weights(np.random.default_rng(0))
    results = random_results(1, 3)
    expected = aggregate(FedMedian(), global_weights, results)
    aggregation = FedMedian().begin_aggregation(1, global_weights)
    for k, (delta, n) in enumerate(results):
        aggregation.add(ClientUpdate(f"c{k}", delta, n))
        for _, array in delta:
            array += 1000.0  # a caller reusing its buffers after add()
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(aggregation.finish(), expected, strict=True))


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_strategy_without_updates_is_an_error(name):
    with pytest.raises(CoordinatorError, match="no accepted update"):
        ROBUST[name][0]().begin_aggregation(1, random_weights(np.random.default_rng(0))).finish()


def test_krum_strategy_requires_enough_clients():
    strategy = Krum(num_byzantine=2)
    assert (strategy.min_fit, strategy.min_available) == (7, 7)
    assert Krum(num_byzantine=1, min_fit=6).min_available == 6
    with pytest.raises(CoordinatorError, match="min_fit >= 2f \\+ 3 = 5"):
        Krum(num_byzantine=1, min_fit=4)
    # Fewer updates than Krum needs (e.g. stragglers dropped): a clear error at finish().
    with pytest.raises(AggregationError, match="needs more than 2f \\+ 2"):
        aggregate(Krum(num_byzantine=1), random_weights(np.random.default_rng(0)), random_results(0, 4))


def test_trimmed_mean_strategy_refuses_a_min_fit_it_cannot_trim():
    strategy = FedTrimmedAvg(beta=0.2)
    assert (strategy.min_fit, strategy.min_available) == (5, 5)
    assert FedTrimmedAvg(beta=0.1, min_fit=12).min_available == 12
    assert FedTrimmedAvg(beta=0.0, min_fit=1).min_fit == 1  # beta = 0: an explicit plain mean
    with pytest.raises(CoordinatorError, match="min_fit=4 .* non-robust mean.*--min-fit >= 5.*--trim-beta >= 0.25"):
        FedTrimmedAvg(beta=0.2, min_fit=4, min_available=10)
    with pytest.raises(CoordinatorError, match="--min-fit >= 5"):
        FedTrimmedAvg(beta=0.2, min_fit=2, min_available=2)


def test_trimmed_mean_round_with_fewer_updates_than_planned_is_refused():
    # min_fit 5, but only 4 updates reached the aggregation (e.g. one rejected): no silent plain mean.
    global_weights = random_weights(np.random.default_rng(0))
    with pytest.raises(AggregationError, match="trims nothing"):
        aggregate(FedTrimmedAvg(beta=0.2), global_weights, random_results(0, 4))


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedTrimmedAvg(beta=0.5),
        lambda: FedTrimmedAvg(beta=-0.1),
        lambda: Krum(num_byzantine=-1),
        lambda: Krum(multi=0),
    ],
)
def test_strategy_rejects_bad_parameters(make):
    with pytest.raises(CoordinatorError):
        make()


def test_selection_is_fedavgs():
    available = [f"c{i}" for i in range(20)]
    for ours in (FedMedian(fraction_fit=0.5), FedTrimmedAvg(fraction_fit=0.5), Krum(fraction_fit=0.5)):
        theirs = FedAvg(fraction_fit=0.5, min_fit=ours.min_fit, min_available=ours.min_available)
        a, b = (s.configure_round(1, available, np.random.default_rng(9)) for s in (ours, theirs))
        assert a == b


def test_examples_do_not_matter_for_median_and_trimmed_mean():
    results = random_results(2, 5)
    relabelled = [(w, n) for (w, _), n in zip(results, itertools.cycle([1, 10**6]), strict=False)]
    for combine in (coordinate_median, lambda r: trimmed_mean(r, 0.2)):
        for (_, a), (_, b) in zip(combine(results), combine(relabelled), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_strategy_checks_each_update_once_when_added_not_again_at_finish(name, monkeypatch):
    import coordinator.strategies.robust as robust

    checked: list[int] = []
    original = robust.check_update
    monkeypatch.setattr(robust, "check_update", lambda *a, **k: checked.append(1) or original(*a, **k))
    results = random_results(40, 6)
    global_weights = random_weights(np.random.default_rng(41))
    got = aggregate(ROBUST[name][0](), global_weights, results)
    assert len(checked) == len(results)  # at add(); finish() combines the checked updates as they are
    expected = apply_delta_reference(global_weights, ROBUST[name][1](results))
    for (_, a), b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def apply_delta_reference(global_weights, delta) -> list[np.ndarray]:
    return [g.astype(np.float64) + d.astype(np.float64) for (_, g), (_, d) in zip(global_weights, delta, strict=True)]


def test_validated_updates_are_combined_as_checked_ones():
    results = random_results(42, 5)
    global_weights = random_weights(np.random.default_rng(43))
    aggregation = FedMedian().begin_aggregation(1, global_weights)
    for k, (delta, n) in enumerate(results):
        aggregation.add(ClientUpdate(f"c{k}", delta, n, validated=True))
    expected = aggregate(FedMedian(), global_weights, results)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(aggregation.finish(), expected, strict=True))


@pytest.mark.parametrize("make", [lambda: FedTrimmedAvg(0.2), lambda: Krum(1), lambda: FedMedian(0.5)])
def test_strategy_constructors_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional"):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FedTrimmedAvg(beta=0.5), r"beta must be a number in \[0, 0.5\), got 0.5"),
        (lambda: FedTrimmedAvg(beta="0.1"), r"beta must be a number in \[0, 0.5\), got '0.1'"),
        (lambda: FedTrimmedAvg(beta=0.2, min_fit=4), "non-robust mean"),
        (lambda: Krum(num_byzantine=-1), "num_byzantine must be an int >= 0, got -1"),
        (lambda: Krum(multi=0), "multi must be an int >= 1, got 0"),
        (lambda: Krum(num_byzantine=1, min_fit=4), r"needs min_fit >= 2f \+ 3 = 5, got 4"),
    ],
)
def test_strategy_parameter_errors_are_strategy_config_errors(make, message):
    from coordinator.strategies import StrategyConfigError

    with pytest.raises(StrategyConfigError, match=message):
        make()


def test_numpy_integers_are_ints():
    assert Krum(num_byzantine=np.int64(1), multi=np.int32(2)).min_fit == 5


def test_a_subnormal_beta_is_refused_as_trimming_nothing_not_an_overflow():
    # 1 / beta is inf in float64: the count needed is taken exactly (Hypothesis found this).
    beta = 2.225073858507e-311
    needed = min_trimmed_updates(beta)
    assert needed > 10**310 and len(str(needed)) == 311
    with pytest.raises(AggregationError, match="trims nothing"):
        trimmed_mean(random_results(0, 1), beta)
