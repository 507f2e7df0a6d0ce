"""Sample and class weights scale the step as in Keras: ``sum(w*l) / N``.

``N`` is the number of real examples in the batch: the weight-0 rows that
pad a partial last batch (``TrainableModel.fit``) do not count, as Keras'
own last batch is simply shorter.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converter.reference import Batch
from tests.converter.keras_steps import L, compiled, convert, keras_train_on_batch, keras_twin, litert_steps, padded
from tests.helpers import max_abs_diff

BATCH = 4
TOLERANCE = 1e-5


def _model(optimizer=None) -> keras.Model:
    layers = [L.Dense(8, activation="tanh"), L.Dense(3, activation="softmax")]
    return compiled(layers, (5,), "sparse_categorical_crossentropy", optimizer or keras.optimizers.SGD(0.5), seed=3)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    return x, y


@pytest.mark.parametrize("optimizer", [keras.optimizers.SGD(0.5), keras.optimizers.Adam(0.05)], ids=["sgd", "adam"])
def test_train_on_batch_with_sample_weights_matches_keras(optimizer):
    model = _model(optimizer)
    runtime = convert(model, BATCH)
    x, y = _data(14)
    w = np.random.default_rng(1).uniform(0.2, 3.0, 14).astype(np.float32)  # mean far from 1
    batches = padded(x, y, w, BATCH)  # 3 full batches and one with 2 real rows + 2 padding
    got_losses, got_weights = litert_steps(runtime, batches)
    ref_losses, ref_weights = keras_train_on_batch(model, batches)
    assert max_abs_diff(got_losses, ref_losses) <= TOLERANCE, (got_losses, ref_losses)
    for name, array in got_weights.items():
        assert max_abs_diff(array, ref_weights[name]) <= TOLERANCE, name


def test_fit_with_class_weights_matches_keras_fit():
    """Keras' fit(class_weight=...) over 10 examples in batches of 4: the last batch has 2."""
    class_weight = {0: 0.25, 1: 4.0, 2: 1.5}
    model = _model()
    runtime = convert(model, BATCH)
    x, y = _data(10, seed=2)
    w = np.array([class_weight[int(c)] for c in y], np.float32)
    litert_steps(runtime, padded(x, y, w, BATCH))

    twin = keras_twin(model)
    twin.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, class_weight=class_weight, verbose=0)
    for spec_weight in runtime.get_weights():
        layer, var = spec_weight.name.split("/")
        expected = next(v for v in twin.get_layer(layer).trainable_weights if v.name == var)
        diff = max_abs_diff(spec_weight.array, keras.ops.convert_to_numpy(expected))
        assert diff <= TOLERANCE, f"{spec_weight.name} differs by {diff:.3g}"


def test_padding_rows_do_not_count():
    """A batch of 2 real rows + 2 padding trains as a batch of just those 2 would (any reduction)."""
    model = _model()
    x, y = _data(2, seed=4)
    w = np.array([1.0, 1.0], np.float32)
    padded_run = litert_steps(convert(model, BATCH), padded(x, y, w, BATCH))
    exact_run = litert_steps(convert(model, 2), [Batch(x, y, w)])
    assert max_abs_diff(padded_run[0], exact_run[0]) <= TOLERANCE
    for name, array in padded_run[1].items():
        assert max_abs_diff(array, exact_run[1][name]) <= TOLERANCE, name


def test_weights_change_the_step_as_keras_does_not_by_their_mean():
    """Doubling every weight doubles Keras' step (sum(w*l)/N); sum(w*l)/sum(w) would ignore it."""
    model = _model()
    x, y = _data(4, seed=5)
    ones = keras_train_on_batch(model, [Batch(x, y, np.ones(4, np.float32))])
    twos = keras_train_on_batch(model, [Batch(x, y, np.full(4, 2.0, np.float32))])
    assert twos[0][0] == pytest.approx(2 * ones[0][0], rel=1e-5)  # the reference really is sum(w*l)/N
