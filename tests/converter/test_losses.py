"""Categorical cross-entropy (one-hot labels), label smoothing, Huber and MAE match Keras.

Two levels: the head's hand-written per-example loss and output gradient
against the Keras loss under ``tf.GradientTape`` (every option, cheap), and
whole models trained in LiteRT against Keras' ``train_on_batch``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from converter import ConvertConfig, UnsupportedModelError, convert_model
from converter.api import resolve_loss_options
from converter.losses import Head, keras_loss
from converter.reference import Batch
from edge_client.runtime import TrainableModel
from tests.converter.keras_steps import L, compiled, keras_train_on_batch, litert_steps
from tests.helpers import max_abs_diff

BATCH = 4
STEPS = 3
K = 3
TOLERANCE = 1e-5
CCE = "categorical_crossentropy"


def _labels(loss: str, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if loss == "sparse_categorical_crossentropy":
        return rng.integers(0, k, n).astype(np.int32)
    if loss == CCE:
        return np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
    if loss == "binary_crossentropy":
        return rng.integers(0, 2, (n, k)).astype(np.float32)
    return rng.normal(0.0, 2.0, (n, k)).astype(np.float32)  # errors on both sides of Huber's delta


HEADS = [
    # (loss, on_logits, options, what the last op outputs)
    (CCE, True, {}, "logits"),
    (CCE, False, {}, "positive"),  # probabilities not from a softmax: Keras renormalises them
    (CCE, True, {"label_smoothing": 0.2}, "logits"),
    (CCE, False, {"label_smoothing": 0.1}, "positive"),
    ("binary_crossentropy", True, {"label_smoothing": 0.2}, "logits"),
    ("binary_crossentropy", False, {"label_smoothing": 0.1}, "probabilities"),
    ("sparse_categorical_crossentropy", True, {}, "logits"),
    ("mean_absolute_error", False, {}, "logits"),
    ("huber", False, {}, "logits"),
    ("huber", False, {"delta": 0.5}, "logits"),
    ("huber", False, {"delta": 3.0}, "logits"),
]


@pytest.mark.parametrize(("loss", "on_logits", "options", "kind"), HEADS, ids=lambda v: str(v))
def test_head_loss_and_gradient_match_keras(loss, on_logits, options, kind):
    rng = np.random.default_rng(0)
    out = rng.normal(0.0, 2.0, (8, K)).astype(np.float32)
    if kind == "positive":
        out = rng.uniform(0.05, 1.0, (8, K)).astype(np.float32)
    elif kind == "probabilities":
        out = rng.uniform(0.02, 0.98, (8, K)).astype(np.float32)
    y = _labels(loss, rng, 8, K)
    scale = rng.uniform(0.1, 2.0, 8).astype(np.float32)
    head = Head(loss, on_logits=on_logits, num_outputs=K, **options)
    assert head.options == options

    reference = keras_loss(loss, from_logits=on_logits, reduction="none", **options)
    out_t = tf.constant(out)
    with tf.GradientTape() as tape:
        tape.watch(out_t)
        per_example = reference(y, out_t)
        total = tf.reduce_sum(per_example * scale)
    expected_grad = tape.gradient(total, out_t).numpy()

    assert max_abs_diff(head.per_example(out_t, tf.constant(y)).numpy(), per_example.numpy()) <= TOLERANCE
    got_grad = head.output_grad(out_t, tf.constant(y), tf.constant(scale)).numpy()
    assert max_abs_diff(got_grad, expected_grad) <= TOLERANCE


# -- whole models in LiteRT --------------------------------------------------------

MODELS = {
    "cce_softmax_fused": (lambda: [L.Dense(8, activation="tanh"), L.Dense(K, activation="softmax")], CCE, False),
    "cce_from_logits": (lambda: [L.Dense(8, activation="tanh"), L.Dense(K)], CCE, True),
    # Positive outputs not from a softmax (nor a sigmoid, whose logits Keras would take instead): renormalised.
    "cce_relu_probabilities": (
        lambda: [L.Dense(8, activation="tanh"), L.Dense(K, activation="relu", bias_initializer="ones")],
        CCE,
        False,
    ),
    "mae": (lambda: [L.Dense(8, activation="tanh"), L.Dense(K)], "mean_absolute_error", False),
    "huber": (lambda: [L.Dense(8, activation="tanh"), L.Dense(K)], "huber", False),
}


def _batches(loss: str, seed: int = 1) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [
        Batch(
            rng.uniform(-1.0, 1.0, (BATCH, 5)).astype(np.float32),
            _labels(loss, rng, BATCH, K),
            np.ones(BATCH, np.float32),
        )
        for _ in range(STEPS)
    ]


def _compiled(case_id: str, keras_loss_object=None) -> keras.Model:
    layers, loss, from_logits = MODELS[case_id]
    loss_object = keras_loss_object or keras_loss(loss, from_logits)
    return compiled(layers(), (5,), loss_object, keras.optimizers.SGD(0.3), seed=5, name=case_id)


def _assert_trains_like_keras(model: keras.Model, converted, loss: str):
    runtime = TrainableModel(converted.tflite, converted.manifest)
    batches = _batches(loss)
    got_losses, got_weights = litert_steps(runtime, batches)
    ref_losses, ref_weights = keras_train_on_batch(model, batches)
    assert max_abs_diff(got_losses, ref_losses) <= TOLERANCE, (got_losses, ref_losses)
    for name, array in got_weights.items():
        diff = max_abs_diff(array, ref_weights[name])
        assert diff <= TOLERANCE, f"{name} differs from Keras by {diff:.3g}"


@pytest.mark.parametrize("case_id", MODELS)
def test_models_train_like_keras(case_id: str):
    _, loss, from_logits = MODELS[case_id]
    model = _compiled(case_id)
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False))
    manifest = converted.manifest
    assert manifest.loss == {"name": loss, "from_logits": from_logits}
    # What a board feeds: one-hot float32 [B, K] for categorical cross-entropy, values for regression.
    assert (manifest.label.shape, manifest.label.dtype) == ((BATCH, K), "float32")
    assert manifest.task == ("multiclass" if loss == CCE else "regression")
    assert manifest.num_classes == (K if loss == CCE else 0)
    _assert_trains_like_keras(model, converted, loss)


def test_categorical_accuracy_counts_argmax_of_one_hot_labels():
    model = _compiled("cce_from_logits")
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False))
    runtime = TrainableModel(converted.tflite, converted.manifest)
    b = _batches(CCE)[0]
    predicted = np.argmax(keras.ops.convert_to_numpy(model(b.x)), axis=-1)
    expected = float(np.sum(predicted == np.argmax(b.y, axis=-1)))
    assert runtime.train_step(b.x, b.y, b.sample_weight).correct == expected


# -- options (label smoothing, Huber delta) -------------------------------------------

OPTIONED = {
    "cce_label_smoothing": ("cce_softmax_fused", keras.losses.CategoricalCrossentropy(label_smoothing=0.2)),
    "cce_logits_label_smoothing": (
        "cce_from_logits",
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    ),
    "huber_delta": ("huber", keras.losses.Huber(delta=0.4)),
}


@pytest.mark.parametrize("name", OPTIONED)
def test_loss_options_train_like_keras(name: str):
    case_id, loss_object = OPTIONED[name]
    model = _compiled(case_id, loss_object)
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False))
    options = resolve_loss_options(model, ConvertConfig(batch_size=BATCH))
    assert converted.manifest.loss == {"name": MODELS[case_id][1], "from_logits": MODELS[case_id][2], **options}
    _assert_trains_like_keras(model, converted, MODELS[case_id][1])


def test_loss_options_are_read_from_the_compiled_loss_and_flags_override_them():
    model = _compiled("cce_softmax_fused", keras.losses.CategoricalCrossentropy(label_smoothing=0.2))
    assert resolve_loss_options(model, ConvertConfig(batch_size=BATCH)) == {"label_smoothing": 0.2}
    assert resolve_loss_options(model, ConvertConfig(batch_size=BATCH, label_smoothing=0.05)) == {
        "label_smoothing": 0.05
    }
    assert resolve_loss_options(model, ConvertConfig(batch_size=BATCH, loss=CCE)) == {}  # --loss: Keras' defaults
    huber = _compiled("huber", keras.losses.Huber(delta=2.0))
    assert resolve_loss_options(huber, ConvertConfig(batch_size=BATCH)) == {"delta": 2.0}


@pytest.mark.parametrize(
    ("loss", "options", "match"),
    [
        ("sparse_categorical_crossentropy", {"label_smoothing": 0.1}, "label smoothing applies"),
        (CCE, {"label_smoothing": 1.5}, r"\[0, 1\]"),
        ("huber", {"delta": 0.0}, "delta"),
    ],
)
def test_invalid_loss_options_are_refused(loss, options, match):
    with pytest.raises(UnsupportedModelError, match=match):
        Head(loss, on_logits=False, num_outputs=K, **options)


def test_categorical_with_one_output_is_refused():
    model = compiled([L.Dense(1, activation="softmax")], (5,), CCE, "sgd")
    with pytest.raises(UnsupportedModelError, match="at least 2 outputs"):
        convert_model(model, ConvertConfig(batch_size=2, verify=False))
