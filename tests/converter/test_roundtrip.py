"""get_weights / set_weights: exact round trips, Keras weights, validation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converter.reference import named_weights
from edge_client.errors import WeightsError
from edge_client.weights import NamedArray
from tests.helpers import build_small_cnn, max_abs_diff, separable_binary_data


def snapshot(model, include_optimizer: bool = True) -> list[NamedArray]:
    return [NamedArray(n, a.copy()) for n, a in model.get_weights(include_optimizer=include_optimizer)]


def assert_bit_exact(a: list[NamedArray], b: list[NamedArray]) -> None:
    assert [w.name for w in a] == [w.name for w in b]
    for (name, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), f"{name} differs"


def train_a_little(model, steps: int = 3, seed: int = 0) -> None:
    manifest = model.manifest
    rng = np.random.default_rng(seed)
    x, y = separable_binary_data(manifest.batch_size * steps, num_features=manifest.input.shape[1], seed=seed)
    for i in range(steps):
        sl = slice(i * manifest.batch_size, (i + 1) * manifest.batch_size)
        model.train_step(x[sl], y[sl], rng.uniform(0.5, 1.5, manifest.batch_size))


def test_adam_state_round_trips_bit_exactly(tabular):
    model = tabular.runtime()
    initial = snapshot(model)
    train_a_little(model)
    trained = snapshot(model)
    state = {n: a for n, a in trained[len(tabular.manifest.weights) :]}
    assert state["optimizer/iterations"].shape == (1,) and state["optimizer/iterations"][0] == 3.0
    assert all(np.any(a != 0) for n, a in state.items() if n.startswith("optimizer/m/"))

    # Into a fresh interpreter: weights and optimizer state arrive unchanged.
    other = tabular.runtime()
    assert not all(np.array_equal(a, b) for (_, a), (_, b) in zip(snapshot(other), trained, strict=True))
    other.set_weights(trained)
    assert_bit_exact(snapshot(other), trained)

    # Back into the original one after it moved on.
    train_a_little(model, seed=1)
    model.set_weights(trained)
    assert_bit_exact(snapshot(model), trained)
    model.set_weights(initial)
    assert_bit_exact(snapshot(model), initial)


def test_identical_state_gives_identical_next_step(tabular):
    """Restoring weights + Adam state fully restores the trainer."""
    a, b = tabular.runtime(), tabular.runtime()
    train_a_little(a)
    b.set_weights(a.get_weights(include_optimizer=True))
    x, y = separable_binary_data(tabular.manifest.batch_size, seed=5)
    assert a.train_step(x, y).loss == b.train_step(x, y).loss
    assert_bit_exact(snapshot(a), snapshot(b))


def test_trainable_only_set_weights_resets_optimizer_state(tabular, small_cnn):
    for converted in (tabular, small_cnn):  # Adam (m, v, iterations) and SGD momentum
        model = converted.runtime()
        manifest = converted.manifest
        if manifest.task == "binary":
            train_a_little(model)
        else:
            rng = np.random.default_rng(0)
            for _ in range(2):
                model.train_step(rng.uniform(size=manifest.input.shape), rng.integers(0, 3, manifest.label.shape))
        state_before = snapshot(model)[len(manifest.weights) :]
        assert state_before and all(np.any(a != 0) for _, a in state_before)

        trainable = snapshot(model, include_optimizer=False)
        model.set_weights(trainable)
        after = snapshot(model)
        assert_bit_exact(after[: len(trainable)], trainable)
        for name, array in after[len(trainable) :]:
            assert np.all(array == 0), f"{name} was not reset"


def test_weights_from_a_different_keras_init_reproduce_keras_predictions(small_cnn):
    other = build_small_cnn(seed=12345)
    x = np.random.default_rng(0).uniform(size=(10, 6, 6, 2)).astype(np.float32)
    expected = other.predict(x, verbose=0)

    model = small_cnn.runtime()
    assert max_abs_diff(model.predict(x), expected) > 1e-3, "the two initialisations should predict differently"

    keras_weights = named_weights(other)
    model.set_weights([NamedArray(s.name, keras_weights[s.name]) for s in small_cnn.manifest.weights])
    got = model.predict(x)
    assert got.shape == (10, 3)
    assert max_abs_diff(got, expected) <= 1e-5
    assert_bit_exact(
        snapshot(model, include_optimizer=False),
        [NamedArray(s.name, keras_weights[s.name]) for s in small_cnn.manifest.weights],
    )


def _corrupt(weights: list[NamedArray], how: str) -> list[NamedArray]:
    weights = [NamedArray(n, a.copy()) for n, a in weights]
    name, array = weights[1]
    if how == "wrong_shape":
        weights[1] = NamedArray(name, np.zeros((*array.shape, 1), np.float32))
    elif how == "transposed_kernel":
        name0, k = weights[0]
        weights[0] = NamedArray(name0, np.ascontiguousarray(k.reshape(k.shape[::-1])) if k.ndim == 2 else k[..., None])
    elif how == "wrong_name":
        weights[1] = NamedArray(name + "_x", array)
    elif how == "swapped_order":
        weights[0], weights[1] = weights[1], weights[0]
    elif how == "too_few":
        weights = weights[:-1]
    elif how == "too_many":
        weights = weights + [NamedArray("extra", np.zeros(3, np.float32))]
    elif how == "float64":
        weights[1] = NamedArray(name, array.astype(np.float64))
    elif how == "nan_last":
        last_name, last = weights[-1]
        bad = last.copy()
        bad.flat[0] = np.nan
        weights[-1] = NamedArray(last_name, bad)
    elif how == "inf":
        array[...] = np.inf
        weights[1] = NamedArray(name, array)
    else:
        raise AssertionError(how)
    return weights


CORRUPTIONS = [
    "wrong_shape",
    "transposed_kernel",
    "wrong_name",
    "swapped_order",
    "too_few",
    "too_many",
    "float64",
    "nan_last",
    "inf",
]


@pytest.mark.parametrize("include_optimizer", [False, True], ids=["trainable", "with_state"])
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_bad_weights_are_refused_and_change_nothing(tabular, how, include_optimizer):
    model = tabular.runtime()
    train_a_little(model)  # non-zero optimizer state that a bad call must not reset
    before = snapshot(model)
    good = snapshot(model, include_optimizer=include_optimizer)
    # Make the intended new values different, so a partial assignment would show.
    good = [NamedArray(n, a + 1.0) for n, a in good]
    with pytest.raises(WeightsError):
        model.set_weights(_corrupt(good, how))
    assert_bit_exact(snapshot(model), before)


def test_nan_in_optimizer_state_is_refused(tabular):
    model = tabular.runtime()
    weights = snapshot(model)
    name, array = weights[-1]
    assert name.startswith("optimizer/")
    weights[-1] = NamedArray(name, np.full_like(array, np.nan))
    before = snapshot(model)
    with pytest.raises(WeightsError, match="NaN"):
        model.set_weights(weights)
    assert_bit_exact(snapshot(model), before)


def test_keras_model_round_trip_through_litert(small_cnn):
    """LiteRT weights loaded back into Keras give Keras' own predictions."""
    model = small_cnn.runtime()
    rng = np.random.default_rng(3)
    for _ in range(2):
        model.train_step(
            rng.uniform(size=small_cnn.manifest.input.shape), rng.integers(0, 3, small_cnn.manifest.label.shape)
        )
    trained = {n: a for n, a in model.get_weights()}
    clone = keras.models.clone_model(small_cnn.keras_model)
    for layer in clone.layers:
        if layer.trainable_weights:
            layer.set_weights([trained[f"{layer.name}/{v.name}"] for v in layer.trainable_weights])
    x = rng.uniform(size=(7, 6, 6, 2)).astype(np.float32)
    assert max_abs_diff(model.predict(x), clone.predict(x, verbose=0)) <= 1e-5
