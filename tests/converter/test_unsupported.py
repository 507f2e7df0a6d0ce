"""Models, losses and optimizers outside the supported set are refused clearly.

Refusal happens while lowering, before any (slow) TFLite conversion, so
these tests are cheap.
"""

from __future__ import annotations

import keras
import pytest

from converter import ConvertConfig, UnsupportedModelError, convert_model
from converter.errors import ConverterError

L = keras.layers
SUPPORTED_NAMES = ("Dense", "Conv2D", "MaxPooling2D", "AveragePooling2D", "Flatten", "Reshape", "Dropout", "Rescaling")


def sequential(input_shape, *layers, loss="sparse_categorical_crossentropy"):
    model = keras.Sequential([keras.Input(input_shape), *layers])
    model.compile(loss=loss, optimizer="sgd")
    return model


UNSUPPORTED_LAYERS = {
    "lstm": lambda: sequential((5, 3), L.LSTM(4, name="bad_lstm"), L.Dense(2, activation="softmax")),
    "batch_norm": lambda: sequential(
        (6,), L.Dense(4), L.BatchNormalization(name="bad_bn"), L.Dense(2, activation="softmax")
    ),
    "conv1d": lambda: sequential(
        (8, 2), L.Conv1D(3, 3, name="bad_conv1d"), L.Flatten(), L.Dense(2, activation="softmax")
    ),
    "dense_elu": lambda: sequential(
        (6,), L.Dense(4, activation="elu", name="bad_elu"), L.Dense(2, activation="softmax")
    ),
    "conv_dilated": lambda: sequential(
        (8, 8, 1), L.Conv2D(2, 3, dilation_rate=2, name="bad_dilated"), L.Flatten(), L.Dense(2, activation="softmax")
    ),
    "dense_regularizer": lambda: sequential(
        (6,), L.Dense(4, activity_regularizer="l2", name="bad_regularized"), L.Dense(2, activation="softmax")
    ),
    "leaky_relu_layer": lambda: sequential(
        (6,), L.Dense(4), L.ReLU(negative_slope=0.1, name="bad_leaky"), L.Dense(2, activation="softmax")
    ),
    "dropout_noise_shape": lambda: sequential(
        (6,), L.Dense(4), L.Dropout(0.5, noise_shape=(1, 4), name="bad_dropout"), L.Dense(2, activation="softmax")
    ),
    "global_pool_1d": lambda: sequential(
        (6, 2), L.GlobalAveragePooling1D(name="bad_global_pool"), L.Dense(2, activation="softmax")
    ),
}


@pytest.mark.parametrize("build", UNSUPPORTED_LAYERS.values(), ids=UNSUPPORTED_LAYERS.keys())
def test_unsupported_layer_is_named_with_the_supported_list(build):
    model = build()
    bad = next(layer for layer in model.layers if layer.name.startswith("bad_"))
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(model, ConvertConfig(batch_size=2, verify=False))
    message = str(info.value)
    assert repr(bad.name) in message or bad.name in message
    assert type(bad).__name__ in message
    assert "supports" in message
    for name in SUPPORTED_NAMES:
        assert name in message


def test_skip_connection_is_refused():
    inputs = keras.Input((6,))
    h = L.Dense(6, activation="relu", name="first")(inputs)
    h2 = L.Dense(6, activation="relu", name="second")(h)
    merged = L.Add(name="skip_add")([h, h2])
    outputs = L.Dense(2, activation="softmax", name="head")(merged)
    model = keras.Model(inputs, outputs)
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(model, ConvertConfig(batch_size=2, loss="sparse_categorical_crossentropy", verify=False))
    message = str(info.value)
    assert "skip_add" in message
    assert "supports" in message and "sequential" in message


def test_two_input_model_is_refused():
    a, b = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a, b], L.Dense(2, activation="softmax")(L.Concatenate()([a, b])))
    with pytest.raises(UnsupportedModelError, match="one input"):
        convert_model(model, ConvertConfig(batch_size=2, loss="sce", verify=False))


def test_model_without_trainable_layer_is_refused():
    model = keras.Sequential([keras.Input((4, 4, 1)), L.Flatten(), L.Softmax()])
    with pytest.raises(UnsupportedModelError, match="no trainable"):
        convert_model(model, ConvertConfig(batch_size=2, loss="sce", verify=False))


def _small_model():
    return keras.Sequential([keras.Input((4,)), L.Dense(3, activation="softmax")])


def test_unsupported_loss_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(_small_model(), ConvertConfig(batch_size=2, loss="hinge", verify=False))
    message = str(info.value)
    assert "hinge" in message
    for name in ("sparse_categorical_crossentropy", "binary_crossentropy", "mean_squared_error"):
        assert name in message


def test_unsupported_compiled_loss_is_refused():
    model = _small_model()
    model.compile(loss=keras.losses.CategoricalHinge(), optimizer="sgd")
    with pytest.raises(UnsupportedModelError, match="sparse_categorical_crossentropy"):
        convert_model(model, ConvertConfig(batch_size=2, verify=False))


def test_ignore_class_is_refused():
    model = _small_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=0), optimizer="sgd")
    with pytest.raises(UnsupportedModelError, match="ignore_class"):
        convert_model(model, ConvertConfig(batch_size=2, verify=False))


def test_unsupported_optimizer_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(_small_model(), ConvertConfig(batch_size=2, loss="sce", optimizer="nadam", verify=False))
    message = str(info.value)
    assert "nadam" in message and "sgd" in message and "adam" in message


def test_unsupported_compiled_optimizer_is_refused():
    model = _small_model()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Nadam())
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(model, ConvertConfig(batch_size=2, verify=False))
    assert "Nadam" in str(info.value) and "sgd" in str(info.value) and "adam" in str(info.value)


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (keras.optimizers.SGD(0.1, use_ema=True), "use_ema"),
        (keras.optimizers.Adam(0.1, gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (keras.optimizers.Adam(0.1, amsgrad=True), "amsgrad"),
        (keras.optimizers.SGD(keras.optimizers.schedules.CosineDecayRestarts(0.1, 10)), "learning-rate"),
    ],
    ids=["use_ema", "gradient_accumulation", "amsgrad", "schedule"],
)
def test_unsupported_optimizer_options_are_refused(optimizer, match):
    model = _small_model()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=optimizer)
    with pytest.raises(UnsupportedModelError, match=match):
        convert_model(model, ConvertConfig(batch_size=2, verify=False))


def test_uncompiled_model_without_loss_asks_for_loss_flag():
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(_small_model(), ConvertConfig(batch_size=2, verify=False))
    assert "--loss" in str(info.value)
    assert isinstance(info.value, ConverterError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 2, "learning_rate": -1.0, "loss": "sce"},
        {"batch_size": 2, "momentum": 1.5, "loss": "sce"},
    ],
    ids=["batch_0", "negative_lr", "momentum_1.5"],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(UnsupportedModelError):
        convert_model(_small_model(), ConvertConfig(verify=False, **kwargs))


def test_single_output_sparse_categorical_is_refused():
    model = keras.Sequential([keras.Input((4,)), L.Dense(1, activation="sigmoid")])
    with pytest.raises(UnsupportedModelError, match="at least 2 outputs"):
        convert_model(model, ConvertConfig(batch_size=2, loss="sparse_categorical_crossentropy", verify=False))
