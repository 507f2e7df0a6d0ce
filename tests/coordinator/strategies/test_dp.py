"""Client-level DP: clipping bounds every contribution, noise has the stated scale,
epsilon comes from dp-accounting, and the state survives a checkpoint."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import CoordinatorError
from coordinator.strategies import ClientUpdate, FedAdam, FedAvg
from coordinator.strategies.dp import DifferentialPrivacy, clip_update, epsilon_spent, update_norm
from edge_client.weights import NamedArray

SHAPES = {"kernel": (4, 3), "bias": (3,)}


def weights(seed: int, scale: float = 1.0) -> list[NamedArray]:
    rng = np.random.default_rng(seed)
    return [NamedArray(n, (rng.normal(size=s) * scale).astype(np.float32)) for n, s in SHAPES.items()]


def zeros() -> list[NamedArray]:
    return [NamedArray(n, np.zeros(s, np.float32)) for n, s in SHAPES.items()]


def flat(ws) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for _, a in ws])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-4, 1e4), clip=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_norm_and_keeps_the_direction(seed, scale, clip):
    delta = weights(seed, scale)
    clipped = clip_update(delta, clip)
    norm = update_norm(delta)
    assert update_norm(clipped) <= clip * (1 + 1e-6)
    if norm <= clip:
        np.testing.assert_array_equal(flat(clipped), flat(delta))
    else:
        np.testing.assert_allclose(flat(clipped), flat(delta) * clip / norm, rtol=1e-6)
    assert update_norm(delta) == pytest.approx(np.linalg.norm(flat(delta)))


def dp_round(dp, updates, selected: int | None = None, global_weights=None):
    ids = [f"c{i}" for i in range(selected or len(updates))]
    dp.configure_round(1, ids, np.random.default_rng(0))
    aggregation = dp.begin_aggregation(1, global_weights or zeros())
    for i, (delta, n) in enumerate(updates):
        aggregation.add(ClientUpdate(f"c{i}", delta, n))
    return aggregation.finish()


def test_without_noise_the_mean_of_clipped_updates_with_equal_weights():
    clip = 1.0
    updates = [(weights(1, 0.01), 10), (weights(2, 5.0), 1000), (weights(3, 0.5), 1)]
    dp = DifferentialPrivacy(FedAvg(), clip_norm=clip, noise_multiplier=0.0)
    got = dp_round(dp, updates)
    expected = sum(flat(d) * min(1.0, clip / np.linalg.norm(flat(d))) for d, _ in updates) / len(updates)
    np.testing.assert_allclose(flat(got), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("huge", [1e3, 1e8])
def test_one_client_moves_the_aggregate_by_at_most_clip_over_selected(huge):
    """The sensitivity bound DP needs: replacing one client's update changes the sum by <= 2 C."""
    clip, others = 0.5, [(weights(s, 0.1), 50) for s in range(4)]
    dp = DifferentialPrivacy(FedAvg(), clip_norm=clip, noise_multiplier=0.0)
    base = flat(dp_round(dp, [*others, (zeros(), 1)]))
    attacked = flat(dp_round(dp, [*others, (weights(9, huge), 10**6)]))
    assert np.linalg.norm(attacked - base) <= clip / 5 * (1 + 1e-6)


def test_noise_std_is_multiplier_times_clip_over_selected():
    big = {"kernel": (200, 100)}
    delta = [NamedArray("kernel", np.zeros(big["kernel"], np.float32))]
    dp = DifferentialPrivacy(FedAvg(), clip_norm=2.0, noise_multiplier=1.5, seed=0)
    dp.configure_round(1, [f"c{i}" for i in range(10)], np.random.default_rng(0))
    aggregation = dp.begin_aggregation(1, delta)
    for i in range(6):  # 6 of the 10 selected answered: the denominator stays 10
        aggregation.add(ClientUpdate(f"c{i}", delta, 1))
    noise = aggregation.finish()[0].array
    assert noise.std() == pytest.approx(1.5 * 2.0 / 10, rel=0.03)
    assert abs(noise.mean()) < 0.01


def test_seeded_noise_is_reproducible_and_unseeded_is_not():
    def run(seed):
        dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, seed=seed)
        return flat(dp_round(dp, [(weights(1), 1)]))

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(None), run(None))


def test_epsilon_matches_dp_accounting_and_grows_with_rounds():
    dp = DifferentialPrivacy(FedAvg(fraction_fit=0.1), clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    population = [f"c{i:03d}" for i in range(100)]
    spent = []
    for r in range(1, 4):
        chosen, _ = dp.configure_round(r, population, np.random.default_rng(r))
        aggregation = dp.begin_aggregation(r, zeros())
        for c in chosen:
            aggregation.add(ClientUpdate(c, weights(r), 1))
        aggregation.finish()
        spent.append(dp.privacy_spent())
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 3)
    assert spent[-1] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert 0 < spent[0] < spent[1] < spent[2]
    assert epsilon_spent([0.1] * 3, 1.1, 1e-5) == pytest.approx(spent[-1])


def test_clipping_without_noise_reports_infinite_epsilon():
    dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=0.0)
    assert dp.privacy_spent() == 0.0
    dp_round(dp, [(weights(1), 1)])
    assert math.isinf(dp.privacy_spent())


def test_the_wrapped_server_optimizer_gets_the_noisy_mean_and_its_state_round_trips():
    inner = FedAdam(server_lr=0.1)
    dp = DifferentialPrivacy(inner, clip_norm=1.0, noise_multiplier=0.0)
    start = weights(0)
    updates = [(weights(1, 0.1), 5), (weights(2, 0.1), 7)]
    got = dp_round(dp, updates, global_weights=start)
    mean = [NamedArray(n, (a1 + a2) / 2) for (n, a1), (_, a2) in zip(updates[0][0], updates[1][0], strict=True)]
    reference = FedAdam(server_lr=0.1)
    aggregation = reference.begin_aggregation(1, start)
    aggregation.add(ClientUpdate("x", mean, 1))
    np.testing.assert_allclose(flat(got), flat(aggregation.finish()), rtol=1e-6)

    state = dp.state_dict()
    assert set(state) >= {"dp/sampling_rates"} and any(k.startswith("m/") for k in state)
    restored = DifferentialPrivacy(FedAdam(server_lr=0.1), clip_norm=1.0, noise_multiplier=0.0)
    restored.load_state_dict(state)
    assert restored.state_dict().keys() == state.keys()
    np.testing.assert_array_equal(restored.state_dict()["dp/sampling_rates"], [1.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip norm"),
        ({"clip_norm": float("nan"), "noise_multiplier": 1.0}, "clip norm"),
        ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "noise multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
    ],
)
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(CoordinatorError, match=match):
        DifferentialPrivacy(FedAvg(), **kwargs)


def test_a_malformed_checkpointed_history_is_refused():
    dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(CoordinatorError, match="sampling-rate"):
        dp.load_state_dict({"dp/sampling_rates": np.array([0.1, 2.0])})


def test_the_wrapper_announces_the_wrapped_strategys_decayed_lr():
    from coordinator.strategies import RoundConfig

    decayed = FedAvg(round_config=RoundConfig(lr=0.2), lr_decay=0.5)
    private = DifferentialPrivacy(decayed, clip_norm=1.0, noise_multiplier=0.0)
    _, config = private.configure_round(3, ["a", "b"], np.random.default_rng(0))
    assert config.lr == pytest.approx(0.05) and private.config_for_round(3).lr == pytest.approx(0.05)


def test_everything_but_the_wrapped_strategy_is_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        DifferentialPrivacy(FedAvg(), 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_norm": -1.0, "noise_multiplier": 1.0}, "the DP clip norm must be a positive number, got -1.0"),
        ({"clip_norm": float("inf"), "noise_multiplier": 1.0}, "the DP clip norm must be a positive number, got inf"),
        ({"clip_norm": 1.0, "noise_multiplier": float("nan")}, "the DP noise multiplier must be >= 0, got nan"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, r"the DP delta must be in \(0, 1\), got 0.0"),
    ],
)
def test_bad_parameters_are_strategy_config_errors_with_the_range(kwargs, message):
    from coordinator.strategies import StrategyConfigError

    with pytest.raises(StrategyConfigError, match=message):
        DifferentialPrivacy(FedAvg(), **kwargs)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([NamedArray("kernel", np.full((4, 3), np.nan, np.float32)), zeros()[1]], "'kernel' contains NaN or Inf"),
        ([zeros()[0]], "update has 1 tensors, expected 2"),
    ],
)
def test_a_bad_update_is_refused_as_sent_and_changes_nothing(bad, message):
    from coordinator.errors import AggregationError

    dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=0.0)
    dp.configure_round(1, ["a", "b"], np.random.default_rng(0))
    aggregation = dp.begin_aggregation(1, zeros())
    aggregation.add(ClientUpdate("a", weights(1, 0.1), 3))
    with pytest.raises(AggregationError, match=message):
        aggregation.add(ClientUpdate("b", bad, 3))
    assert aggregation.count == 1
    # The mean over the 2 selected of the one clipped update: nothing of the refused one.
    expected = flat(clip_update(weights(1, 0.1), 1.0)) / 2
    np.testing.assert_allclose(flat(aggregation.finish()), expected, rtol=1e-6, atol=1e-7)
