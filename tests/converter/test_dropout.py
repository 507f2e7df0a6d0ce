"""Dropout in the converted model: random masks while training, none at inference.

Model: Input(64) -> Dropout(0.5) -> Dense(1, no bias, kernel of ones), MSE,
plain SGD, batch 1, trained on x = ones, y = 0. With inverted dropout the
output is ``out = sum_i keep_i * k_i`` with ``keep_i`` in {0, 2}, and the
kernel gradient is ``2 * out * keep_i``: the kernel entry of every dropped
feature does not move, and every kept one moves by the same amount.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converter import ConvertConfig, convert_model

FEATURES = 64
LR = 1e-4
STEPS = 8


@pytest.fixture(scope="module")
def dropout_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="dense"),
        ],
        name="dropout_probe",
    )
    model.compile(loss="mean_squared_error", optimizer=keras.optimizers.SGD(LR))
    # verify=True: the dropout-free twin must match TensorFlow.
    return convert_model(model, ConvertConfig(batch_size=1, verify=True))


def _runtime(converted):
    from edge_client.runtime import TrainableModel

    return TrainableModel(converted.tflite, converted.manifest)


def _kernel(model) -> np.ndarray:
    ((name, kernel),) = model.get_weights()
    assert name == "dense/kernel"
    return kernel[:, 0].astype(np.float64)


def test_dropout_model_verifies_through_its_twin(dropout_model):
    assert dropout_model.report is not None
    assert dropout_model.report.worst <= 1e-4
    assert dropout_model.manifest.weights[0].shape == (FEATURES, 1)


def test_dropped_features_get_no_update_and_masks_vary(dropout_model):
    model = _runtime(dropout_model)
    x, y = np.ones((1, FEATURES), np.float32), np.zeros((1, 1), np.float32)
    masks = []
    for _ in range(STEPS):
        before = _kernel(model)
        loss = model.train_step(x, y, lr=LR).loss
        delta = _kernel(model) - before
        dropped = delta == 0
        kept = ~dropped
        masks.append(dropped)
        assert 0.15 < dropped.mean() < 0.85, f"{dropped.sum()} of {FEATURES} features dropped in one step"

        # Inverted dropout: kept features are scaled by 1 / (1 - 0.5) = 2.
        out = 2.0 * before[kept].sum()
        assert loss == pytest.approx(out**2, rel=1e-5)
        np.testing.assert_allclose(delta[kept], -LR * 2.0 * out * 2.0, rtol=1e-4)

    fraction = np.mean(masks)
    assert 0.3 < fraction < 0.7, f"overall dropped fraction {fraction:.2f}"
    distinct = {mask.tobytes() for mask in masks}
    assert len(distinct) == STEPS, "the dropout mask repeats: it is not random per step"


def test_inference_is_deterministic_without_dropout(dropout_model):
    model = _runtime(dropout_model)
    model.train_step(np.ones((1, FEATURES), np.float32), np.zeros((1, 1), np.float32), lr=LR)  # non-trivial kernel
    kernel = _kernel(model)
    assert len(np.unique(kernel)) > 1
    x = np.random.default_rng(0).uniform(size=(1, FEATURES)).astype(np.float32)
    first, second = model.infer_batch(x), model.infer_batch(x)
    assert np.array_equal(first, second)
    np.testing.assert_allclose(first[0, 0], x[0].astype(np.float64) @ kernel, rtol=1e-5)
    evaluated = model.evaluate(x, np.zeros((1, 1), np.float32))
    assert evaluated.loss == pytest.approx(float(first[0, 0]) ** 2, rel=1e-5)
