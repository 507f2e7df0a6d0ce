"""Server optimisers: agreement with hand-written update loops, state persistence and checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import AggregationError, CoordinatorError
from coordinator.strategies import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedOpt,
    FedProx,
    FedYogi,
    RoundConfig,
)
from edge_client.weights import NamedArray

LAYOUT = (("conv/kernel", (3, 3, 1, 4)), ("conv/bias", (4,)), ("dense/kernel", (6, 5)), ("dense/bias", (5,)))
# Outputs are float32, rounded once per round from float64 math; the reference stays in float64.
RTOL, ATOL = 1e-5, 1e-6


def random_weights(rng: np.random.Generator, scale: float = 1.0) -> list[NamedArray]:
    return [NamedArray(name, (scale * rng.normal(size=shape)).astype(np.float32)) for name, shape in LAYOUT]


def random_rounds(seed: int, num_rounds: int, num_clients: int) -> list[list[ClientUpdate]]:
    rng = np.random.default_rng(seed)
    return [
        [
            ClientUpdate(f"c{k}", random_weights(rng, 0.1), int(rng.integers(1, 500)))
            for k in range(int(rng.integers(1, num_clients + 1)))
        ]
        for _ in range(num_rounds)
    ]


def run(strategy, global_weights, rounds) -> list[list[NamedArray]]:
    """The global model after each round."""
    history = []
    for r, updates in enumerate(rounds, start=1):
        aggregation = strategy.begin_aggregation(r, global_weights)
        for update in updates:
            aggregation.add(update)
        assert aggregation.count == len(updates)
        global_weights = aggregation.finish()
        history.append(global_weights)
    return history


def mean_delta(updates: list[ClientUpdate], i: int) -> np.ndarray:
    """sum n_k d_k / sum n_k for tensor i, as an explicit float64 loop."""
    total = np.zeros(LAYOUT[i][1])
    count = 0
    for u in updates:
        total += u.num_examples * u.delta[i].array.astype(np.float64)
        count += u.num_examples
    return total / count


def reference(kind: str, global_weights, rounds, eta, beta_1=0.9, beta_2=0.99, tau=1e-9, momentum=0.9):
    """The update formulas of Hsu et al. 2019 / Reddi et al. 2021 Alg. 2, one tensor at a time."""
    history = []
    w = [g.array.astype(np.float64) for g in global_weights]
    m = [np.zeros(s) for _, s in LAYOUT]
    v = [np.zeros(s) if kind == "avgm" else np.full(s, tau**2) for _, s in LAYOUT]
    for updates in rounds:
        for i in range(len(LAYOUT)):
            d = mean_delta(updates, i)
            if kind == "avgm":
                v[i] = momentum * v[i] + d
                w[i] = w[i] + eta * v[i]
                continue
            m[i] = beta_1 * m[i] + (1 - beta_1) * d
            if kind == "adagrad":
                v[i] = v[i] + d**2
            elif kind == "adam":
                v[i] = beta_2 * v[i] + (1 - beta_2) * d**2
            else:
                v[i] = v[i] - (1 - beta_2) * d**2 * np.sign(v[i] - d**2)
            w[i] = w[i] + eta * m[i] / (np.sqrt(v[i]) + tau)
        history.append([x.copy() for x in w])
    return history


def assert_close(got, expected) -> None:
    assert [n for n, _ in got] == [n for n, _ in LAYOUT]
    for (_, array), ref in zip(got, expected, strict=True):
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, ref, rtol=RTOL, atol=ATOL)


# -- agreement with the reference loops -------------------------------------------------


CASES = {
    "avgm": lambda: FedAvgM(server_lr=0.7, server_momentum=0.9),
    "adagrad": lambda: FedAdagrad(server_lr=0.1, beta_1=0.9, tau=1e-3),
    "adam": lambda: FedAdam(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9),
    "yogi": lambda: FedYogi(server_lr=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
}
REFERENCE_ARGS = {
    "avgm": dict(eta=0.7, momentum=0.9),
    "adagrad": dict(eta=0.1, beta_1=0.9, tau=1e-3),
    "adam": dict(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9),
    "yogi": dict(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_clients=st.integers(1, 6))
def test_three_rounds_match_reference_loop(kind, seed, num_clients):
    rounds = random_rounds(seed, 3, num_clients)
    global_weights = random_weights(np.random.default_rng(seed + 1))
    got = run(CASES[kind](), global_weights, rounds)
    expected = reference(kind, global_weights, rounds, **REFERENCE_ARGS[kind])
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


def test_defaults_are_documented_values():
    # Measured on the default non-IID job and within Reddi et al. 2021's tuned ranges (see FedOpt).
    for cls, server_lr in ((FedAdagrad, 0.1), (FedAdam, 0.03), (FedYogi, 0.03)):
        strategy = cls()
        assert (strategy.server_lr, strategy.beta_1, strategy.beta_2, strategy.tau) == (server_lr, 0.9, 0.99, 1e-3)
    assert (FedAvgM().server_lr, FedAvgM().server_momentum) == (1.0, 0.9)
    assert (FedAvg().server_lr, FedProx().server_lr, FedProx().mu) == (1.0, 1.0, 0.01)
    assert FedAdam(server_lr=0.5).server_lr == 0.5


def test_default_adam_matches_reference():
    rounds = random_rounds(7, 3, 4)
    global_weights = random_weights(np.random.default_rng(8))
    expected = reference("adam", global_weights, rounds, eta=0.03, tau=1e-3)
    for g, e in zip(run(FedAdam(), global_weights, rounds), expected, strict=True):
        assert_close(g, e)


def test_variants_differ_only_in_second_moment_hook_and_server_rate():
    for cls in (FedAdagrad, FedAdam, FedYogi):
        assert issubclass(cls, FedOpt) and issubclass(cls, FedAvg)
        own = {k for k in vars(cls) if not k.startswith("__") and k != "_abc_impl"}  # _abc_impl: ABC machinery
        assert own == {"_second_moment", "DEFAULT_SERVER_LR"}
    with pytest.raises(CoordinatorError, match="base class"):
        FedOpt()


def test_first_adagrad_step_is_sign_of_delta_times_eta_one_minus_beta():
    # m = (1 - b1) d, v = tau^2 + d^2 ~ d^2, so the step is eta (1 - b1) sign(d).
    delta = [NamedArray("w", np.array([2.0, -0.5, 1e-3], np.float32))]
    aggregation = FedAdagrad(server_lr=0.1, beta_1=0.9, tau=1e-9).begin_aggregation(
        1, [NamedArray("w", np.zeros(3, np.float32))]
    )
    aggregation.add(ClientUpdate("a", delta, 3))
    np.testing.assert_allclose(aggregation.finish()[0].array, [0.01, -0.01, 0.01], rtol=1e-5)


# -- FedAvgM ----------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lr=st.floats(0.1, 2.0))
def test_fedavgm_without_momentum_is_fedavg_with_server_lr(seed, lr):
    rounds = random_rounds(seed, 3, 5)
    global_weights = random_weights(np.random.default_rng(seed))
    for a, b in zip(
        run(FedAvgM(server_lr=lr, server_momentum=0.0), global_weights, rounds),
        run(FedAvg(server_lr=lr), global_weights, rounds),
        strict=True,
    ):
        for (na, xa), (nb, xb) in zip(a, b, strict=True):
            assert na == nb and xa.dtype == xb.dtype
            np.testing.assert_array_equal(xa, xb)


def test_fedavgm_momentum_accumulates_across_rounds():
    # The same delta d three times: v = d, 1.5 d, 1.75 d with beta = 0.5.
    zero = [NamedArray("w", np.zeros(2, np.float32))]
    update = ClientUpdate("a", [NamedArray("w", np.array([1.0, -2.0], np.float32))], 10)
    history = run(FedAvgM(server_lr=1.0, server_momentum=0.5), zero, [[update]] * 3)
    np.testing.assert_allclose([h[0].array for h in history], [[1, -2], [2.5, -5], [4.25, -8.5]])


# -- state ----------------------------------------------------------------------------


def test_fedadam_state_persists_across_rounds():
    rounds = random_rounds(3, 3, 4)
    global_weights = random_weights(np.random.default_rng(4))
    strategy = FedAdam()
    assert strategy.state_dict() == {}
    history = run(strategy, global_weights, rounds[:1])
    state = strategy.state_dict()
    assert sorted(state) == sorted(f"{slot}/{name}" for slot in ("m", "v") for name, _ in LAYOUT)
    assert all(a.dtype == np.float64 for a in state.values())

    # Continuing with the same object, with a restored copy, and from scratch.
    continued = run(strategy, history[-1], rounds[1:2])[-1]
    restored = FedAdam()
    restored.load_state_dict(state)
    resumed = run(restored, history[-1], rounds[1:2])[-1]
    fresh = run(FedAdam(), history[-1], rounds[1:2])[-1]
    for (_, a), (_, b) in zip(continued, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, c) for (_, a), (_, c) in zip(continued, fresh, strict=True))
    # The state moved on, and the earlier snapshot was not aliased.
    assert any(not np.array_equal(state[k], v) for k, v in strategy.state_dict().items())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_state_dict_round_trip_reproduces_the_run(kind):
    rounds = random_rounds(11, 3, 4)
    global_weights = random_weights(np.random.default_rng(12))
    full = run(CASES[kind](), global_weights, rounds)
    first = CASES[kind]()
    history = run(first, global_weights, rounds[:2])
    second = CASES[kind]()
    second.load_state_dict(first.state_dict())
    last = run(second, history[-1], rounds[2:])[-1]
    for (_, a), (_, b) in zip(full[-1], last, strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_empty_state_resets():
    strategy = FedYogi()
    run(strategy, random_weights(np.random.default_rng(0)), random_rounds(0, 1, 3))
    strategy.load_state_dict({})
    assert strategy.state_dict() == {}


@pytest.mark.parametrize(
    "state, message",
    [
        ({"x/w": np.zeros(2)}, "unexpected state key"),
        ({"m": np.zeros(2)}, "unexpected state key"),
        ({"m/w": np.zeros(2)}, "slot 'v'"),
        ({"m/w": np.zeros(2), "v/w": np.zeros(3)}, "slot 'v'"),
        ({"m/w": np.zeros(2), "v/w": np.array([0.0, np.nan])}, "NaN"),
        ({"m/w": np.zeros(2), "v/w": np.array([0.0, -1.0])}, "negative"),
    ],
)
def test_bad_state_is_rejected_and_leaves_state_alone(state, message):
    strategy = FedAdam()
    run(strategy, random_weights(np.random.default_rng(0)), random_rounds(0, 1, 3))
    before = strategy.state_dict()
    with pytest.raises(CoordinatorError, match=message):
        strategy.load_state_dict(state)
    after = strategy.state_dict()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_layout_change_is_an_error():
    strategy = FedAvgM()
    run(strategy, random_weights(np.random.default_rng(0)), random_rounds(0, 1, 2))
    other = [NamedArray("w", np.zeros(3, np.float32))]
    aggregation = strategy.begin_aggregation(2, other)
    aggregation.add(ClientUpdate("a", other, 1))
    with pytest.raises(CoordinatorError, match="layout"):
        aggregation.finish()


def test_finish_twice_steps_once():
    strategy = FedAdam()
    global_weights = random_weights(np.random.default_rng(1))
    aggregation = strategy.begin_aggregation(1, global_weights)
    for update in random_rounds(1, 1, 3)[0]:
        aggregation.add(update)
    first = aggregation.finish()
    state = strategy.state_dict()
    second = aggregation.finish()
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True))
    assert all(np.array_equal(state[k], v) for k, v in strategy.state_dict().items())
    with pytest.raises(CoordinatorError, match="already aggregated"):
        aggregation.add(random_rounds(2, 1, 1)[0][0])


def test_finish_without_updates_is_an_error():
    with pytest.raises(CoordinatorError, match="no accepted update"):
        FedAdam().begin_aggregation(1, random_weights(np.random.default_rng(0))).finish()


def test_output_keeps_global_dtype():
    global_weights = [NamedArray("w", np.ones(4, np.float16))]
    aggregation = FedAdam().begin_aggregation(1, global_weights)
    aggregation.add(ClientUpdate("a", [NamedArray("w", np.full(4, 0.5, np.float16))], 2))
    assert aggregation.finish()[0].array.dtype == np.float16


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvgM(server_momentum=1.0),
        lambda: FedAvgM(server_momentum=-0.1),
        lambda: FedAvgM(server_lr=float("nan")),
        lambda: FedAdam(beta_1=1.0),
        lambda: FedYogi(beta_2=1.5),
        lambda: FedAdagrad(tau=0.0),
        lambda: FedAdam(fraction_fit=0.0),
        lambda: FedProx(mu=-1.0),
    ],
)
def test_bad_hyper_parameters_are_rejected(make):
    with pytest.raises(CoordinatorError):
        make()


# -- selection is FedAvg's ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx])
def test_selection_is_fedavgs(cls):
    available = [f"c{i}" for i in range(20)]
    ours = cls(fraction_fit=0.3, min_fit=2, min_available=5)
    theirs = FedAvg(fraction_fit=0.3, min_fit=2, min_available=5)
    chosen, _ = ours.configure_round(1, available, np.random.default_rng(5))
    assert chosen == theirs.configure_round(1, available, np.random.default_rng(5))[0]


# -- FedProx ----------------------------------------------------------------------------


def test_fedprox_round_config_carries_mu_and_aggregates_like_fedavg():
    strategy = FedProx(mu=0.1, round_config=RoundConfig(epochs=3, lr=0.05))
    _, config = strategy.configure_round(1, ["a", "b"], np.random.default_rng(0))
    assert config == RoundConfig(epochs=3, lr=0.05, mu=0.1)
    assert FedProx().configure_round(1, ["a"], np.random.default_rng(0))[1].mu == 0.01
    rounds = random_rounds(5, 2, 4)
    global_weights = random_weights(np.random.default_rng(5))
    for a, b in zip(run(strategy, global_weights, rounds), run(FedAvg(), global_weights, rounds), strict=True):
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


# -- client learning-rate decay ---------------------------------------------------------


@pytest.mark.parametrize("cls", [FedAvg, FedAvgM, FedAdam, FedProx])
def test_lr_decay_scales_the_announced_lr_per_round(cls):
    strategy = cls(round_config=RoundConfig(epochs=2, lr=0.1), lr_decay=0.9)
    rng = np.random.default_rng(0)
    lrs = [strategy.configure_round(t, ["a", "b"], rng)[1].lr for t in (1, 2, 3, 11)]
    np.testing.assert_allclose(lrs, [0.1, 0.09, 0.081, 0.1 * 0.9**10], rtol=1e-12)
    assert strategy.config_for_round(3).epochs == 2 and strategy.round_config.lr == 0.1  # base untouched


def test_without_decay_every_round_announces_the_same_config():
    config = RoundConfig(epochs=3, lr=0.05, codec="int8")
    strategy = FedAvg(round_config=config)
    assert all(strategy.configure_round(t, ["a"], np.random.default_rng(t))[1] == config for t in (1, 7, 500))


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.01])
def test_lr_decay_outside_unit_interval_is_refused(decay):
    with pytest.raises(CoordinatorError, match="lr_decay"):
        FedAvg(lr_decay=decay)


BIG = float(np.finfo(np.float32).max)


# FedAdam steps by about server_lr per coordinate whatever the size of the delta, so only a huge rate overflows it.
@pytest.mark.parametrize(("make", "server_lr"), [(FedAvg, 1.0), (FedAvgM, 1.0), (FedAdam, 0.6 * BIG)])
def test_a_step_that_overflows_float32_is_refused_and_changes_nothing(make, server_lr):
    strategy = make(server_lr=server_lr)
    first = run(strategy, [NamedArray("w", np.zeros(2, np.float32))], [[update([1e-3, 1e-3])]])
    assert np.isfinite(first[0][0].array).all()
    state = {k: v.copy() for k, v in strategy.state_dict().items()} if hasattr(strategy, "state_dict") else {}
    global_weights = [NamedArray("w", np.array([BIG, 0.5], np.float32))]
    aggregation = strategy.begin_aggregation(2, global_weights)
    aggregation.add(update([BIG, 0.1]))
    with pytest.raises(AggregationError, match="NaN or Inf"):
        aggregation.finish()  # finite inputs, but the new model is beyond float32's range
    assert global_weights[0].array.tolist() == [BIG, 0.5]  # the global model the caller holds is untouched
    if state:  # the optimiser state is rolled back, as if the round had not happened
        after = strategy.state_dict()
        assert after.keys() == state.keys() and all(np.array_equal(after[k], state[k]) for k in state)


def update(values: list[float]) -> ClientUpdate:
    return ClientUpdate("a", [NamedArray("w", np.array(values, np.float32))], 1)


# -- the public optimiser step ------------------------------------------------------------


def test_step_is_public_and_is_the_reference_update():
    # FedAvgM, beta 0.5, eta 2: v = d then 1.5 d; increments eta v.
    strategy = FedAvgM(server_lr=2.0, server_momentum=0.5)
    delta = [NamedArray("w", np.array([1.0, -2.0]))]
    first = strategy.step(delta)
    assert [n for n, _ in first] == ["w"] and first[0].array.dtype == np.float64
    np.testing.assert_allclose(first[0].array, [2.0, -4.0])
    saved = strategy.state_dict()
    np.testing.assert_allclose(strategy.step(delta)[0].array, [3.0, -6.0])
    strategy.load_state_dict(saved)  # the documented way to discard a step
    np.testing.assert_allclose(strategy.step(delta)[0].array, [3.0, -6.0])
    with pytest.raises(CoordinatorError, match="layout"):
        strategy.step([NamedArray("other", np.zeros(2))])
    assert not any(hasattr(strategy, name) for name in ("_step", "_snapshot", "_rollback"))


def test_adam_step_matches_one_round_of_the_reference():
    rounds = random_rounds(30, 1, 3)
    global_weights = random_weights(np.random.default_rng(31))
    strategy = FedAdam(server_lr=0.1, tau=1e-9)
    delta = [NamedArray(name, mean_delta(rounds[0], i)) for i, (name, _) in enumerate(LAYOUT)]
    increment = strategy.step(delta)
    (expected,) = reference("adam", global_weights, rounds, eta=0.1, tau=1e-9)
    for (_, inc), (_, g), e in zip(increment, global_weights, expected, strict=True):
        np.testing.assert_allclose(g.astype(np.float64) + inc, e, rtol=1e-12, atol=1e-12)


# -- constructors: keyword-only, one error type ------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(0.5),
        lambda: FedAvgM(1.0),
        lambda: FedAdam(0.1),
        lambda: FedYogi(0.1, 0.9),
        lambda: FedProx(0.1),
    ],
)
def test_constructors_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional"):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FedAvg(fraction_fit=0.0), r"fraction_fit must be in \(0, 1\], got 0.0"),
        (lambda: FedAvg(fraction_fit="all"), r"fraction_fit must be in \(0, 1\], got 'all'"),
        (lambda: FedAvg(min_fit=3, min_available=2), r"need 1 <= min_fit \(3\) <= min_available \(2\)"),
        (lambda: FedAvg(min_fit=1.5, min_available=2), r"need 1 <= min_fit \(1.5\)"),
        (lambda: FedAvg(lr_decay=1.5), r"lr_decay must be in \(0, 1\], got 1.5"),
        (lambda: FedAvg(server_lr=float("inf")), "server_lr must be finite, got inf"),
        (lambda: FedAvgM(server_lr="1"), "server_lr must be a number, got str"),
        (lambda: FedAvgM(server_momentum=float("nan")), "server_momentum must be finite, got nan"),
        (lambda: FedAvgM(server_momentum=1.0), r"server_momentum must be in \[0, 1\), got 1.0"),
        (lambda: FedAdam(beta_2=True), "beta_2 must be a number, got bool"),
        (lambda: FedAdam(tau=-1.0), r"tau must be positive \(it keeps m / \(sqrt\(v\) \+ tau\) finite\), got -1.0"),
        (lambda: FedProx(mu=-0.5), r"mu must be >= 0 \(0 is plain FedAvg\), got -0.5"),
        (lambda: FedOpt(), "FedOpt is a base class"),
    ],
)
def test_bad_hyper_parameters_raise_one_error_type_with_the_range(make, message):
    from coordinator.strategies import StrategyConfigError

    with pytest.raises(StrategyConfigError, match=message) as info:
        make()
    assert isinstance(info.value, CoordinatorError)
